"""Probe tdq with bad inputs and record what each gets (issue #14 neighbours): a clear error, documented correct
behaviour, an unclear error (a Python internal error) or silence (accepted with a wrong result).

Run: `python experiments/probe_reliability.py` -> `experiments/results/probe_reliability.{json,md}`. Each case is a
function that must raise; the class and first line of the error are recorded. A case that returns is "silent".
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tdq, not another install's
import tdq  # noqa: E402
from tdq import TDQConfig, TimestepGrid  # noqa: E402
from tdq import testing as T  # noqa: E402
from tdq.serialization import CONFIG_FILE, STATE_FILE, load_quantization, save_quantization  # noqa: E402

torch.set_num_threads(1)
OUT = Path(__file__).parent / "results"
TMP = Path(tempfile.mkdtemp(prefix="tdq-probe-"))
CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn

    return deco


def _cfg(**kw):
    cfg = TDQConfig(**kw)
    cfg.outliers.enabled = False
    return cfg


def _toy(k=2):
    m = tdq.quantize_(T.ToySigmaDenoiser(), _cfg(grid=TimestepGrid(num_buckets=k)))
    with torch.no_grad(), tdq.calibration(m):
        for s in (0.01, 1.0, 50.0):
            m(**T.denoiser_inputs(m, t=s))
    return m


def _saved(name):
    d = TMP / name
    shutil.rmtree(d, ignore_errors=True)
    save_quantization(_toy(), d)
    return d


def _edit_state(d, fn):
    from safetensors.torch import load_file, save_file

    from tdq.utils.io import sha256_file

    t = load_file(d / STATE_FILE)
    fn(t)
    save_file(t, d / STATE_FILE, metadata={"format": "tdq", "schema_version": "1"})
    side = json.loads((d / CONFIG_FILE).read_text())
    side["state_sha256"] = sha256_file(d / STATE_FILE)  # a consistent but wrong pair
    (d / CONFIG_FILE).write_text(json.dumps(side))


def _profile(**kw):
    from diffusers import DDPMScheduler

    from tdq.mixed_precision.fisher import profile_sensitivity

    m = T.tiny_unet2d()
    x0 = kw.pop("x0", torch.randn(2, 1, 16, 16))
    grid = TimestepGrid(num_buckets=2).resolve("train_timestep", 0, 999)
    args = dict(samples_per_bucket=2, batch_size=2, progress=False)
    args.update(kw)
    return profile_sensitivity(m, DDPMScheduler(), x0, grid, **args)


# ---- timesteps
@case("inf timestep, out_of_range=error")
def _():
    m = tdq.quantize_(T.ToySigmaDenoiser(), _cfg(grid=TimestepGrid(num_buckets=2, out_of_range="error")))
    m(**T.denoiser_inputs(m, t=float("inf")))


@case("inf timestep, out_of_range=nearest")
def _():
    m = _toy()
    m(**T.denoiser_inputs(m, t=float("inf")))


@case("-inf timestep tensor in a batch")
def _():
    m = _toy()
    m(**T.denoiser_inputs(m, t=torch.tensor([1.0, -float("inf")])))


@case("timestep tensor of 3 for a batch of 2")
def _():
    m = _toy()
    m(**T.denoiser_inputs(m, t=torch.tensor([1.0, 2.0, 3.0])))


@case("timestep tensor of shape [2, 1]")
def _():
    m = _toy()
    m(**T.denoiser_inputs(m, t=torch.tensor([[1.0], [2.0]])))


# ---- quantize_ / calibration
@case("quantize_ a model with zero quantizable layers")
def _():
    tdq.quantize_(nn.Sequential(nn.ReLU()), _cfg(), adapter=tdq.adapters.ConstantTimestepAdapter())


@case("quantize_ twice")
def _():
    m = _toy()
    tdq.quantize_(m, _cfg())


@case("calibration() on a model that is not quantized")
def _():
    with tdq.calibration(T.ToySigmaDenoiser()):
        pass


@case("calibration() that makes no denoiser call")
def _():
    m = tdq.quantize_(T.ToySigmaDenoiser(), _cfg())
    with tdq.calibration(m):
        pass


@case("set_bits(weight_bits=1)")
def _():
    m = _toy()
    next(layer for _, layer in tdq.iter_quant_layers(m)).set_bits(weight_bits=1)


@case("set_bits(act_bits=[8, 8, 8]) for 2 buckets")
def _():
    m = _toy()
    next(layer for _, layer in tdq.iter_quant_layers(m)).set_bits(act_bits=[8, 8, 8])


@case("TDQConfig.from_dict(None)")
def _():
    TDQConfig.from_dict(None)


@case("TDQConfig.from_dict('w8a8')")
def _():
    TDQConfig.from_dict("w8a8")


@case("grid t_min > t_max")
def _():
    TDQConfig.from_dict({"grid": {"t_min": 10.0, "t_max": 1.0}})


@case("grid t_min == t_max")
def _():
    TDQConfig.from_dict({"grid": {"t_min": 5.0, "t_max": 5.0}})


@case("outliers.alphas='0.5' (a string)")
def _():
    TDQConfig.from_dict({"outliers": {"alphas": "0.5"}})


@case("weight_rounding.method unknown")
def _():
    TDQConfig.from_dict({"weight_rounding": {"method": "gptq2"}})


# ---- saved state
@case("saved state: truncated safetensors (sha256 not updated)")
def _():
    d = _saved("trunc")
    data = (d / STATE_FILE).read_bytes()
    (d / STATE_FILE).write_bytes(data[: len(data) // 2])
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: truncated safetensors (sha256 updated)")
def _():
    from tdq.utils.io import sha256_file

    d = _saved("trunc2")
    data = (d / STATE_FILE).read_bytes()
    (d / STATE_FILE).write_bytes(data[: len(data) // 2])
    side = json.loads((d / CONFIG_FILE).read_text())
    side["state_sha256"] = sha256_file(d / STATE_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(side))
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: a scale stored as float16")
def _():
    d = _saved("dtype")

    def fn(t):
        k = next(k for k in t if k.endswith("act_quantizer.scale"))
        t[k] = t[k].half()

    _edit_state(d, fn)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: a scale with the wrong shape")
def _():
    d = _saved("shape")

    def fn(t):
        k = next(k for k in t if k.endswith("act_quantizer.scale"))
        t[k] = torch.cat([t[k], t[k]])

    _edit_state(d, fn)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: a missing tensor")
def _():
    d = _saved("missing")
    _edit_state(d, lambda t: t.pop(next(k for k in t if k.endswith("act_quantizer.scale"))))
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: an extra tensor")
def _():
    d = _saved("extra")
    _edit_state(d, lambda t: t.update({"bogus.weight": torch.zeros(3)}))
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: weight codes of the wrong dtype (int32)")
def _():
    d = _saved("codes")

    def fn(t):
        k = next(k for k in t if "codes" in k)
        t[k] = t[k].to(torch.int32)

    _edit_state(d, fn)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state: float weight (include_float) of the wrong shape")
def _():
    d = _saved("floatshape")

    def fn(t):
        k = next(k for k in t if k.endswith(".bias"))
        t[k] = torch.zeros(t[k].numel() + 1)

    _edit_state(d, fn)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("saved state loaded into a model of another architecture")
def _():
    d = _saved("arch")
    load_quantization(T.GrowingActivationDenoiser(), d)


@case("saved state: a zero-point outside the code range")
def _():
    d = _saved("zp")

    def fn(t):
        k = next(k for k in t if k.endswith("act_quantizer.zero_point"))
        t[k] = torch.full_like(t[k], 1e6)

    _edit_state(d, fn)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("load_quantization from an empty folder")
def _():
    d = TMP / "empty"
    d.mkdir(exist_ok=True)
    load_quantization(T.ToySigmaDenoiser(), d)


@case("save_quantization into a path that is a file")
def _():
    f = TMP / "afile"
    f.write_text("x")
    save_quantization(_toy(), f)


# ---- profiling, schedules
@case("profile_sensitivity(layers='conv_in') (a string)")
def _():
    _profile(layers="conv_in")


@case("profile_sensitivity(layers=['nope']) (no such layer)")
def _():
    _profile(layers=["nope"])


@case("profile_sensitivity(samples_per_bucket=0)")
def _():
    _profile(samples_per_bucket=0)


@case("profile_sensitivity(batch_size=-1)")
def _():
    _profile(batch_size=-1)


@case("profile_sensitivity x0 holding NaN")
def _():
    x0 = torch.randn(2, 1, 16, 16)
    x0[0, 0, 0, 0] = float("nan")
    _profile(x0=x0)


@case("profile_sensitivity x0 of the wrong channel count")
def _():
    _profile(x0=torch.randn(2, 3, 16, 16))


@case("profile_sensitivity x0 empty (0 samples)")
def _():
    _profile(x0=torch.randn(0, 1, 16, 16))


@case("schedule.apply_ to a model whose layers it does not name")
def _():
    from tdq.mixed_precision import PrecisionSchedule

    m = _toy()
    PrecisionSchedule(
        layers=["nope"],
        act_bits=torch.full((1, 2), 8),
        weight_bits=torch.tensor([8]),
        grid={"num_buckets": 2},
    ).apply_(m)


@case("schedule.apply_ with another bucket count")
def _():
    from tdq.mixed_precision import PrecisionSchedule

    m = _toy(k=2)
    names = [n for n, _ in tdq.iter_quant_layers(m)]
    PrecisionSchedule(
        layers=names,
        act_bits=torch.full((len(names), 5), 8),
        weight_bits=torch.full((len(names),), 8),
        grid={"num_buckets": 5},
    ).apply_(m)


@case("plan_precision with a budget below every candidate")
def _():
    from tdq.mixed_precision.planners import PrecisionBudget, plan_precision

    plan_precision(_profile(), PrecisionBudget(avg_act_bits=3.0, avg_weight_bits=3.0))


@case("PrecisionBudget(avg_act_bits='6')")
def _():
    from tdq.mixed_precision.planners import PrecisionBudget

    PrecisionBudget(avg_act_bits="6")


@case("PrecisionBudget(act_candidates=[])")
def _():
    from tdq.mixed_precision.planners import PrecisionBudget, plan_precision

    plan_precision(_profile(), PrecisionBudget(avg_act_bits=6.0, act_candidates=()))


@case("SensitivityProfile with NaN Fisher values loaded")
def _():
    from tdq.mixed_precision import SensitivityProfile

    p = _profile()
    p.act_fisher[0, 0] = float("nan")
    p.save(TMP / "nanprof")
    SensitivityProfile.load(TMP / "nanprof")


# ---- pipelines / metrics
@case("TDQPipeline calibration_prompts=[] (empty list)")
def _():
    from tdq.pipelines import TDQPipeline
    from tdq.testing.pipelines import save_tiny_sd

    d = save_tiny_sd(TMP / "sd")
    TDQPipeline.from_pretrained(d, tdq_config=_cfg(), calibration_prompts=[], calibration_steps=1)


@case("paired_metrics with 2 FP images and 3 quantized")
def _():
    from tdq.eval import paired_metrics

    paired_metrics(torch.rand(2, 1, 16, 16), torch.rand(3, 1, 16, 16), feature=None, lpips_nets=())


@case("paired_metrics with images holding NaN")
def _():
    from tdq.eval import paired_metrics

    x = torch.rand(2, 1, 16, 16)
    y = x.clone()
    y[0, 0, 0, 0] = float("nan")
    r = paired_metrics(x, y, feature=None, lpips_nets=())
    print("   ->", {k: r[k] for k in ("psnr", "ssim") if k in r})


@case("trajectory_drift with trajectories of different lengths")
def _():
    from tdq.eval import trajectory_drift

    trajectory_drift([torch.rand(2, 4)] * 3, [torch.rand(2, 4)] * 2)


@case("to_backend('bogus')")
def _():
    tdq.to_backend(_toy(), "bogus")


def main():
    results = []
    for name, fn in CASES.items():
        try:
            fn()
            outcome, msg = "returned", ""
        except Exception as e:  # noqa: BLE001
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}"
            outcome, msg = type(e).__name__, f"{str(e).splitlines()[0][:300] if str(e) else ''}  [{where}]"
        results.append({"case": name, "outcome": outcome, "message": msg})
        print(f"{name}\n   {outcome}: {msg}", flush=True)
    OUT.mkdir(exist_ok=True)
    env = {"torch": torch.__version__, "python": sys.version.split()[0]}
    (OUT / "probe_reliability.json").write_text(json.dumps({"env": env, "cases": results}, indent=1) + "\n")
    lines = [
        "# Bad-input probe (issue #14 neighbours)",
        "",
        "Regenerate: `python experiments/probe_reliability.py`. A case that returns is accepted (see",
        "docs/reliability.md for why each accepted case is correct).",
        "",
        "| case | outcome | message |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['case']} | {r['outcome']} | {r['message'].replace('|', '/')} |")
    (OUT / "probe_reliability.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
