"""Interruption (issue #14, faults): `tdq run`, calibration, profiling, `save_quantization`,
`TDQPipeline.save_pretrained` and the FP reference cache, stopped by SIGKILL or SIGINT at chosen points, leave no
half-written file that a later run trusts, and a rerun finishes with the result of an uninterrupted run.

The real operation runs in a forked child on a tiny model. A kill point is armed inside the child only: before
the rename that publishes a given file (`os.replace`, which every atomic write ends with), with that file's
temporary cut to half its size first ("torn": the process died while writing it), or at the n-th denoiser call.
At the point the child sends the signal to itself, so the point is exact and the tests do not flake; one test also
interrupts from outside (the parent sends SIGINT once the child reports that it is calibrating).
"""

import json
import multiprocessing as mp
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch

import tdq
from tdq import TDQConfig, TimestepGrid
from tdq import testing as T
from tdq.eval.reference import ReferenceCache
from tdq.mixed_precision import SensitivityProfile
from tdq.quant.quantizers import NotCalibratedError
from tdq.serialization import load_quantization, save_quantization

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

CTX = mp.get_context("fork")
_REAL_REPLACE = os.replace


# ----------------------------------------------------------------------------------------------------
# the child side: kill points


def _die(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(5)  # SIGKILL never returns; SIGINT raises KeyboardInterrupt here
    raise AssertionError("signal was not delivered")


def _arm_replace(name: str, sig: int, torn: bool = False, after: int = 0) -> None:
    """Signal the process before the `after`-th rename (0-based) that publishes a file called `name`; with `torn`
    the temporary being published is first cut to half its size (the writer died in the middle of it)."""
    seen = [0]

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            if seen[0] == after:
                if torn and Path(src).is_file():
                    size = Path(src).stat().st_size
                    os.truncate(src, size // 2)
                _die(sig)
            seen[0] += 1
        return _REAL_REPLACE(src, dst, *args, **kwargs)

    os.replace = replace


def _child(target, args, result_file: Path):
    """Run `target(*args)` in a forked child; its return value (JSON) goes to `result_file`, a KeyboardInterrupt
    is recorded as {"interrupted": true}."""
    torch.set_num_threads(1)
    logging_off()
    # a process started in the background by a non-interactive shell inherits SIGINT ignored; Ctrl-C must interrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            out = target(*args)
        except KeyboardInterrupt:
            out = {"interrupted": True}
        result_file.write_text(json.dumps(out))
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent through the exit code and stderr
        traceback.print_exc()
        code = 3
    os._exit(code)


def logging_off():
    import logging

    logging.getLogger("tdq").setLevel(logging.ERROR)


def _fork(target, *args, tmp: Path, timeout: float = 120):
    """Run `target(*args)` in a forked child; return (exit code, its JSON result or None)."""
    result = tmp / f"result-{time.monotonic_ns()}.json"
    proc = CTX.Process(target=_child, args=(target, args, result))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"{target.__name__} did not finish in {timeout} s")
    return proc.exitcode, json.loads(result.read_text()) if result.exists() else None


def _cache_entries(root: Path) -> dict[str, str]:
    """Every file the reference cache's manifests list, read back through the cache: name -> status."""
    cache = ReferenceCache(root)
    out = {}
    for manifest in root.glob("*/*/manifest.json"):
        spec = json.loads(manifest.read_text())["spec"]
        for name in json.loads(manifest.read_text())["files"]:
            out[f"{manifest.parent.name[:8]}/{name}"] = cache.read(spec, name)[1].status
    return out


# ----------------------------------------------------------------------------------------------------
# tdq run


def _run_config(cache_dir: Path):
    from tdq.run.config import RunConfig
    from tdq.run.models import ModelConfig

    cfg = RunConfig(model=ModelConfig(name="tiny-random", source="random", sample_size=16), progress=False)
    cfg.threads = 1
    ev, cal, sc = cfg.eval, cfg.calibration, cfg.schedule
    ev.num_samples, ev.num_inference_steps, ev.feature, ev.lpips_nets = 2, 4, "none", []
    ev.noise_floor, ev.cache_dir = False, str(cache_dir)
    cal.num_samples, cal.num_inference_steps = 2, 4
    sc.samples_per_bucket, sc.batch_size, sc.planner = 1, 2, "uniform"
    cfg.quant.grid.num_buckets = 2
    cfg.quant.outliers.enabled = False  # a second of diagnosis per run; not what is tested here
    return cfg


def _tdq_run(run_dir: Path, cache_dir: Path, point: tuple | None = None):
    """`run_experiment` with an optional kill point: ("replace", file name, signal, torn) or ("calibrate_call", n,
    signal). Plots of the profile and schedule are skipped (seconds of matplotlib each; not what is tested)."""
    from tdq.mixed_precision import PrecisionSchedule
    from tdq.run import stages
    from tdq.run.job import run_experiment

    SensitivityProfile.plot_heatmap = lambda self, path, kind="act": None
    PrecisionSchedule.plot = lambda self, path: None
    if point and point[0] == "replace":
        _arm_replace(point[1], point[2], torn=point[3])
    if point and point[0] == "calibrate_call":
        n, sig = point[1], point[2]
        inner = stages.calibrate

        def calibrate(ctx):
            calls = [0]

            def pre_hook(module, args):
                calls[0] += 1
                if calls[0] == n:
                    _die(sig)

            ctx.model.denoiser.register_forward_pre_hook(pre_hook)
            inner(ctx)

        stages.STAGES[[s.name for s in stages.STAGES].index("calibrate")] = stages.Stage(
            "calibrate", calibrate
        )
    report = run_experiment(_run_config(cache_dir), run_dir)
    return {k: report[k] for k in ("psnr", "ssim", "drift", "schedule", "reference_cache")}


def test_interrupted_tdq_run_leaves_no_trusted_partial_state_and_resumes(tmp_path):
    from tdq.run.models import load_model

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    # import and warm once what every run needs (model loading, metrics, matplotlib's mathtext), before forking
    load_model(_run_config(cache).model)
    import tdq.eval.metrics  # noqa: F401
    from tdq.eval.report import _save_drift

    _save_drift(tmp_path / "warm.png", [1.0, 0.5])
    # a complete run (the reference result) in the folder: its report must not survive an interrupted run
    code, clean = _fork(_tdq_run, run_dir, tmp_path / "clean-cache", tmp=tmp_path)
    assert code == 0 and clean["reference_cache"]["fp_samples"]["status"] == "miss"
    assert (run_dir / "report.json").is_file()

    points = [
        # FP samples written to the cache, killed before the manifest records them
        ("replace", "manifest.json", signal.SIGKILL, False),
        # killed half-way through the sensitivity manifest (its tensors are already written)
        ("replace", "sensitivity.json", signal.SIGKILL, True),
        # Ctrl-C in the middle of calibration
        ("calibrate_call", 3, signal.SIGINT),
        # killed half-way through the report, after every other file
        ("replace", "report.json", signal.SIGKILL, True),
    ]
    for i, point in enumerate(points):
        code, out = _fork(_tdq_run, run_dir, cache, point, tmp=tmp_path)
        if point[2] == signal.SIGKILL:
            assert code == -signal.SIGKILL, point
        else:
            assert code == 0 and out == {"interrupted": True}, point
        names = sorted(p.name for p in run_dir.iterdir())
        assert "report.json" not in names, (point, names)  # no report: the folder is not a finished run
        entries = _cache_entries(cache)
        assert all(s == "hit" for s in entries.values()), entries  # whatever the cache lists verifies
        if i == 0:
            assert entries == {}  # the samples file without its manifest record is not trusted
        else:
            assert len(entries) >= 1  # FP samples written by the resumed run
        if (run_dir / "sensitivity.json").exists():
            SensitivityProfile.load(run_dir / "sensitivity")  # present means whole
        if point[1] == "report.json":
            # everything but the report was written: the profile and schedule are this run's, whole
            assert (run_dir / "schedule.json").is_file() and (run_dir / "sensitivity.json").is_file()
            assert [p for p in run_dir.iterdir() if p.name.startswith(".report.json")]  # the torn temporary
    code, out = _fork(_tdq_run, run_dir, cache, tmp=tmp_path)
    assert code == 0
    assert out["reference_cache"]["fp_samples"]["status"] == "hit"  # resumed from the cache
    for key in ("psnr", "ssim", "drift", "schedule"):
        assert out[key] == clean[key], key
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # the rerun removed temporaries
    assert not list(cache.rglob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------
# calibration


def _config(**kw):
    """A config for these tests: outlier diagnosis off (seconds per calibration under load; not tested here)."""
    cfg = TDQConfig(**kw)
    cfg.outliers.enabled = False
    return cfg


def _toy():
    return tdq.quantize_(T.ToySigmaDenoiser(), _config(grid=TimestepGrid(num_buckets=3)))


SIGMAS = [0.01, 0.1, 1.0, 5.0, 50.0, 0.5]


def _calibrate(model, stop_at=None, sig=signal.SIGINT, flag: Path | None = None):
    with torch.no_grad(), tdq.calibration(model):
        for i, s in enumerate(SIGMAS * 2):
            if i == stop_at:
                if flag is not None:  # the parent interrupts us from outside
                    flag.write_text("calibrating")
                    while True:
                        model(**T.denoiser_inputs(model, t=s))
                _die(sig)
            model(**T.denoiser_inputs(model, t=s))


def _predict(model):
    with torch.no_grad():
        return model(**T.denoiser_inputs(model, t=1.0, generator=torch.Generator().manual_seed(3)))


def _interrupted_calibration(out: Path, stop_at: int, recalibrate_first: bool, flag: Path | None = None):
    model = _toy()
    before = None
    if recalibrate_first:
        _calibrate(model)
        before = _predict(model)
    try:
        _calibrate(model, stop_at=stop_at, flag=flag)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("not interrupted")
    layers = list(tdq.iter_quant_layers(model))
    state = {
        "observing": [n for n, m in layers if m.act_quantizer.mode == "observe"],
        "observers_left": [n for n, m in layers if m.act_quantizer.observers is not None],
    }
    if before is None:
        try:
            _predict(model)
            state["after"] = "ran"
        except NotCalibratedError as e:
            state["after"] = f"NotCalibratedError: {e}"
    else:
        state["after"] = "unchanged" if torch.equal(_predict(model), before) else "changed"
    _calibrate(model)  # the rerun
    torch.save(_predict(model), out)
    return state


@pytest.mark.parametrize(
    "stop_at,recalibrate_first,outside",
    [(4, False, False), (11, True, False), (4, False, True)],
    ids=["first-calibration", "recalibration", "sigint-from-outside"],
)
def test_interrupted_calibration_leaves_a_defined_model_and_reruns(
    tmp_path, stop_at, recalibrate_first, outside
):
    expected = _toy()
    _calibrate(expected)
    expected = _predict(expected)
    out, flag = tmp_path / "out.pt", tmp_path / "calibrating"
    if not outside:
        code, state = _fork(_interrupted_calibration, out, stop_at, recalibrate_first, tmp=tmp_path)
    else:
        result = tmp_path / "result.json"
        proc = CTX.Process(
            target=_child, args=(_interrupted_calibration, (out, stop_at, False, flag), result)
        )
        proc.start()
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert time.monotonic() < deadline and proc.is_alive(), "child never started calibrating"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGINT)
        proc.join(60)
        code, state = proc.exitcode, json.loads(result.read_text())
    assert code == 0, state
    assert state["observing"] == [] and state["observers_left"] == []
    if recalibrate_first:
        assert state["after"] == "unchanged"  # an interrupted recalibration keeps the previous scales
    else:
        assert state["after"].startswith("NotCalibratedError: layer ")
    assert torch.equal(torch.load(out, weights_only=True), expected)  # the rerun equals a clean calibration


# ----------------------------------------------------------------------------------------------------
# profiling


def _profile(model, **kw):
    from diffusers import DDPMScheduler

    from tdq.mixed_precision.fisher import profile_sensitivity

    x0 = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    grid = TimestepGrid(num_buckets=2).resolve("train_timestep", 0, 999)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return profile_sensitivity(
        model, scheduler, x0, grid, samples_per_bucket=2, batch_size=1, progress=False, **kw
    )


def _interrupted_profile(base: Path, n: int):
    model = T.tiny_unet2d()
    flags = [p.requires_grad for p in model.parameters()]
    calls = [0]

    def pre_hook(module, args, kwargs):
        calls[0] += 1
        if calls[0] == n:
            _die(signal.SIGINT)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        _profile(model)
    except KeyboardInterrupt:
        pass
    handle.remove()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    same_flags = flags == [p.requires_grad for p in model.parameters()]
    _profile(model).save(base)  # the rerun
    return {"hooks": hooks, "grads": grads, "same_flags": same_flags, "training": model.training}


def _save_profiles(directory: Path):
    model = T.tiny_unet2d()
    _profile(model).save(directory / "first")
    _profile(model, seed=1).save(directory / "second")


def _save_profile_killed(profile_pair, base: Path, torn: bool):
    _arm_replace("sensitivity.json", signal.SIGKILL, torn=torn)
    profile_pair[1].save(base)


def test_interrupted_profiling_restores_the_model_and_a_killed_save_is_refused(tmp_path):
    code, _ = _fork(_save_profiles, tmp_path, tmp=tmp_path)  # with the child's thread count
    first, second = (SensitivityProfile.load(tmp_path / name) for name in ("first", "second"))
    assert not torch.equal(first.act_fisher, second.act_fisher)
    code, state = _fork(_interrupted_profile, tmp_path / "rerun", 3, tmp=tmp_path)
    assert code == 0, state
    assert state == {"hooks": 0, "grads": [], "same_flags": True, "training": False}
    assert torch.equal(SensitivityProfile.load(tmp_path / "rerun").act_fisher, first.act_fisher)

    base = tmp_path / "sensitivity"
    first.save(base)
    for torn in (False, True):  # killed before the manifest's rename; killed while writing the manifest
        code, _ = _fork(_save_profile_killed, (first, second), base, torn, tmp=tmp_path)
        assert code == -signal.SIGKILL
        # second's tensors are in place, first's manifest is not theirs: refused, never loaded as a mix
        with pytest.raises(ValueError, match="does not match"):
            SensitivityProfile.load(base)
    second.save(base)  # the rerun
    assert torch.equal(SensitivityProfile.load(base).act_fisher, second.act_fisher)


# ----------------------------------------------------------------------------------------------------
# save_quantization and TDQPipeline.save_pretrained


def _toy_calibrated(bits):
    model = tdq.quantize_(
        T.ToySigmaDenoiser(), _config(weight=tdq.QuantSpec(bits=bits), grid=TimestepGrid(num_buckets=2))
    )
    _calibrate(model)
    return model


@pytest.fixture(scope="module")
def old_and_new():
    models = {"old": _toy_calibrated(8), "new": _toy_calibrated(4)}
    return models, {k: _predict(m) for k, m in models.items()}


def _save_killed(model, directory: Path, name: str | None, torn: bool, after: int):
    if name is not None:
        _arm_replace(name, signal.SIGKILL, torn=torn, after=after)
    else:  # the staged tensors file has a random name `tdq_state.<hex>.safetensors`: torn, then killed

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name.startswith("tdq_state.") and Path(dst).name != "tdq_state.safetensors":
                os.truncate(src, Path(src).stat().st_size // 2)
                _die(signal.SIGKILL)
            return _REAL_REPLACE(src, dst, *args, **kwargs)

        os.replace = replace
    save_quantization(model, directory)


@pytest.mark.parametrize(
    "name,torn,after,loads",
    [
        (None, True, 0, "old"),  # the staged tensors file torn
        ("tdq_config.json", False, 0, "old"),  # staged, the sidecar not yet switched to it
        ("tdq_config.json", True, 0, "old"),  # the sidecar torn while switching (the commit)
        ("tdq_state.safetensors", False, 0, "new"),  # committed, not yet promoted
        ("tdq_config.json", True, 1, "new"),  # promoted, the sidecar torn while switching back
    ],
    ids=["staged-torn", "before-commit", "commit-torn", "before-promote", "final-sidecar-torn"],
)
def test_save_quantization_killed_at_each_step_loads_old_or_new(
    tmp_path, old_and_new, name, torn, after, loads
):
    models, outputs = old_and_new
    directory = tmp_path / "q"
    save_quantization(models["old"], directory)
    code, _ = _fork(_save_killed, models["new"], directory, name, torn, after, tmp=tmp_path)
    assert code == -signal.SIGKILL
    got = _predict(load_quantization(T.ToySigmaDenoiser(), directory))
    assert [k for k, v in outputs.items() if torch.equal(got, v)] == [loads]
    save_quantization(models["new"], directory)  # the rerun
    assert torch.equal(_predict(load_quantization(T.ToySigmaDenoiser(), directory)), outputs["new"])
    assert sorted(p.name for p in directory.iterdir()) == ["tdq_config.json", "tdq_state.safetensors"]


def _pipe_image(pipe):
    return pipe(
        "lower newer", num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np"
    ).images


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A quantized tiny SD pipeline saved once ("old"); the pipeline itself then changed to 4-bit weights ("new")."""
    from tdq.pipelines import TDQPipeline
    from tdq.testing.pipelines import save_tiny_sd

    tmp = tmp_path_factory.mktemp("pipe")
    pipe = TDQPipeline.from_pretrained(
        save_tiny_sd(tmp / "sd"),
        tdq_config=_config(grid=TimestepGrid(num_buckets=2)),
        calibration_prompts=["lower newer", "wider lowest"],
        calibration_steps=2,
        calibration_kwargs={"batch_size": 2},
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp / "saved")
    old_image = _pipe_image(pipe)
    for _, layer in tdq.iter_quant_layers(pipe.unet):
        layer.set_bits(weight_bits=4)
    new_image = _pipe_image(pipe)
    assert not (old_image == new_image).all()
    return pipe, tmp / "saved", old_image, new_image


def _load_image(directory: Path):
    from tdq.pipelines import TDQPipeline

    pipe = TDQPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return _pipe_image(pipe)


def _save_pretrained_killed(pipe, directory: Path, point: tuple):
    if point[0] == "replace":
        _arm_replace(point[1], signal.SIGKILL, torn=point[2])
    else:  # killed right after diffusers' own save of the float components
        from diffusers import StableDiffusionPipeline

        inner = StableDiffusionPipeline.save_pretrained

        def save_pretrained(self, *args, **kwargs):
            inner(self, *args, **kwargs)
            _die(signal.SIGKILL)

        StableDiffusionPipeline.save_pretrained = save_pretrained
    pipe.save_pretrained(directory)


def test_save_pretrained_killed_is_refused_and_a_rerun_saves(saved_pipeline, tmp_path):
    from tdq.pipelines import TDQPipeline
    from tdq.serialization import SavedQuantizationError

    pipe, _, _, new_image = saved_pipeline
    out = tmp_path / "saved"
    pipe.save_pretrained(out)
    for point in [
        ("diffusers",),
        ("replace", "tdq_config.json", True),
        ("replace", "tdq_pipeline.json", True),
    ]:
        code, _ = _fork(_save_pretrained_killed, pipe, out, point, tmp=tmp_path)
        assert code == -signal.SIGKILL
        with pytest.raises(SavedQuantizationError, match="incomplete tdq save"):
            TDQPipeline.from_pretrained(out)
    pipe.save_pretrained(out)  # the rerun
    assert (_load_image(out) == new_image).all()
    assert not list(out.rglob(".*.tmp"))


def test_save_pretrained_refuses_before_touching_an_existing_save(saved_pipeline):
    pipe, out, old_image, _ = saved_pipeline
    listing = sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*"))
    layer = next(m for _, m in tdq.iter_quant_layers(pipe.unet))
    calibrated = layer.act_quantizer.calibrated.clone()
    layer.act_quantizer.calibrated.zero_()  # not calibrated any more: the save must fail
    try:
        with pytest.raises(NotCalibratedError):
            pipe.save_pretrained(out)
    finally:
        layer.act_quantizer.calibrated.copy_(calibrated)
    assert sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*")) == listing
    assert (_load_image(out) == old_image).all()
