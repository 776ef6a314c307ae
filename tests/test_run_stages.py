"""The stage driver of `tdq run` (extension points) and the `Distributed` process-group helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tdq.eval.distributed import Distributed, get_distributed
from tdq.eval.metrics import extract_features
from tdq.testing.runs import tiny_random_run

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from test_distributed import SEEDS, _free_port, make_feature, make_sampler  # noqa: E402

SMALL = tiny_random_run(schedule={"planner": "uniform", "samples_per_bucket": 2, "batch_size": 2})


def test_stage_and_report_section_extension_points(tmp_path, monkeypatch, one_thread):
    from tdq.run import report as report_mod
    from tdq.run import stages
    from tdq.run.job import run_experiment

    seen = []

    def record(name):
        def run(ctx):
            seen.append((name, type(ctx.dist), ctx.schedule is not None, ctx.q is not None))

        return run

    def count_quantized(ctx):
        # a stage between quantize and calibrate sees the quantized denoiser and adds a report section
        n = sum(1 for name, _ in ctx.model.denoiser.named_modules() if name.endswith("_quantizer"))
        ctx.sections["extra"] = {"quantizer_modules": n}

    names = [s.name for s in stages.STAGES]
    assert names == [
        "load", "reference", "features", "profile", "plan", "quantize", "calibrate", "backend", "sample",
        "evaluate", "report",
    ]  # fmt: skip
    new = list(stages.STAGES)
    new.insert(names.index("quantize") + 1, stages.Stage("count_quantized", count_quantized))
    new.insert(names.index("plan") + 2, stages.Stage("after_plan", record("after_plan")))
    new.append(stages.Stage("last", record("last"), main_only=True))
    monkeypatch.setattr(stages, "STAGES", new)
    md = [
        *report_mod.MARKDOWN_SECTIONS,
        lambda r: ["## Extra", "", f"{r['extra']['quantizer_modules']} quantizers"],
    ]
    monkeypatch.setattr(report_mod, "MARKDOWN_SECTIONS", md)

    out = run_experiment(SMALL, tmp_path)
    assert seen == [("after_plan", Distributed, True, False), ("last", Distributed, True, True)]
    written = json.loads((tmp_path / "report.json").read_text())
    assert out == written
    n = written["extra"]["quantizer_modules"]
    assert n > 0
    keys = list(written)
    assert keys.index("timings_s") < keys.index("extra") < keys.index("schedule")
    assert (
        written["schedule"]["planner"] == "uniform" and "noise_floor" not in written and "data" not in written
    )
    assert written["profile_distribution"] == {
        "sharded": False,
        "world_size": 1,
        "assignment": "round_robin",
        "num_units": 3,  # 3 buckets (tiny_random_run) x 1 batch of 2 samples
        "units_per_rank": [3],
    }
    text = (tmp_path / "report.md").read_text()
    assert f"## Extra\n\n{n} quantizers" in text and text.index("## Extra") < text.index("## Figures")


def test_single_process_is_the_plain_call(one_thread):
    dist = get_distributed(cpu=True)
    assert type(dist) is Distributed and dist.is_main and dist.num_processes == 1 and dist.process_index == 0
    assert dist.resolve_device("cpu") == torch.device("cpu")
    ref = make_sampler()(SEEDS)
    res = dist.sample(make_sampler(), SEEDS)
    assert torch.equal(res.images, ref.images) and res.seeds == SEEDS
    assert torch.equal(
        dist.extract_features(res.images, make_feature(), batch_size=2),
        extract_features(ref.images, make_feature(), batch_size=2),
    )
    t = torch.arange(3)
    assert dist.broadcast(t) is t and dist.broadcast_flag(1) is True
    assert dist.sync_buffers(torch.nn.Linear(2, 2)) == 0
    with pytest.raises(ValueError, match="required on the main process"):
        dist.broadcast(None, (1,), torch.long)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    import tdq
    from tdq.eval.distributed import MultiProcess, get_distributed
    assert tdq.__file__.startswith({root!r}), tdq.__file__
    sys.path.insert(0, {tests!r})
    from test_distributed import SEEDS, make_sampler, make_feature

    dist = get_distributed(cpu=True)
    assert isinstance(dist, MultiProcess) and dist.num_processes == 2, dist
    assert dist.is_main == (dist.process_index == 0)
    res = dist.sample(make_sampler(), SEEDS)
    feats = dist.extract_features(res.images, make_feature(), batch_size=2)
    rank = dist.process_index
    value = dist.broadcast(torch.full((3,), float(rank + 7)))  # every process: the main process's 7s
    absent = dist.broadcast(torch.tensor([5, 6]) if rank == 0 else None, (2,), torch.long)
    flag = dist.broadcast_flag(rank == 0)
    model = torch.nn.Module()
    model.act_quantizer = torch.nn.Module()
    model.act_quantizer.register_buffer("scale", torch.full((2,), float(rank + 1)))
    model.register_buffer("other", torch.full((2,), float(rank + 1)))
    synced = dist.sync_buffers(model)
    assert synced == 1 and flag, (synced, flag)
    assert torch.equal(value, torch.full((3,), 7.0)) and torch.equal(absent, torch.tensor([5, 6])), (value, absent)
    assert torch.equal(model.act_quantizer.scale, torch.ones(2)), model.act_quantizer.scale
    assert torch.equal(model.other, torch.full((2,), float(rank + 1)))
    if dist.is_main:
        save_file({{"images": res.images, "features": feats}}, sys.argv[1])
    dist.wait_for_everyone()
    torch.distributed.destroy_process_group()  # else gloo's threads can abort the process at exit
    """
)


@pytest.mark.timeout(240)
def test_multi_process_shards_and_broadcasts(tmp_path, one_thread):
    script = tmp_path / "dist.py"
    script.write_text(SCRIPT.format(tests=TESTS, root=os.path.dirname(TESTS)))
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # the launched script runs in tmp_path: import this checkout's tdq (not whichever the environment installed)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(TESTS), env.get("PYTHONPATH")) if p)
    cmd = [
        # see test_distributed: `--multi_gpu` (torchrun) starts two processes, `cpu=True` makes them gloo CPU ranks
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = load_file(out)
    ref = make_sampler()(SEEDS)
    assert torch.equal(got["images"], ref.images)
    assert torch.equal(got["features"], extract_features(ref.images, make_feature(), batch_size=2))


def test_run_on_the_x86_backend_reports_it(tmp_path, one_thread):
    """`tdq run backend=x86`: the quantized samples come from the integer kernels and the report says so."""
    from tdq.run.job import run_experiment

    sim = run_experiment(SMALL, tmp_path / "sim")
    out = run_experiment({**SMALL, "backend": "x86"}, tmp_path / "x86")
    be = out["backend"]
    onednn = sum(n for k, n in be["kernels"].items() if k.startswith("onednn."))
    assert be["backend"] == "x86" and onednn > 0, be["kernels"]
    assert 0 < be["resident_bytes_ratio"] < 0.5
    assert be["latency"]["ratio_median"] > 0
    assert "## Backend" in (tmp_path / "x86" / "report.md").read_text()
    assert "backend" not in sim
    # the integer kernels reproduce the simulator's samples closely (same seeds, same scales)
    assert abs(out["psnr"] - sim["psnr"]) < 1.0, (out["psnr"], sim["psnr"])
