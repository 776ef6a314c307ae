"""`tdq run` end to end on a small code-built model (fast); the bundled model is exercised by `make demo`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tdq.grid import TimestepGrid


def _ddim_timesteps(steps: int) -> np.ndarray:
    from tdq.run.models import ModelConfig, load_model
    from tdq.sampling.noise import make_scheduler

    scheduler = make_scheduler(load_model(ModelConfig(name="tiny-random", source="random")).scheduler, "ddim")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.numpy()


EXPECTED = [
    "report.json",
    "report.md",
    "grid.png",
    "drift.png",
    "lpips_hist.png",
    "sensitivity.json",
    "sensitivity.safetensors",
    "sensitivity_act.png",
    "schedule.json",
    "schedule.png",
    "config.json",
]

SMALL = [
    "model=tiny-random",
    "eval.num_samples=4",
    "eval.num_inference_steps=10",
    "calibration.num_samples=2",
    "calibration.num_inference_steps=10",
    "schedule.samples_per_bucket=2",
    "schedule.batch_size=2",
    "quant.grid.num_buckets=4",
    "progress=false",
    "threads=1",  # two-thread OpenMP is many times slower on a build machine shared with other jobs
]


@pytest.mark.timeout(600)
def test_tdq_run_cli_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    gptq = "quant.weight_rounding.method=gptq"
    cmd = [sys.executable, "-m", "tdq", "run", *SMALL, gptq, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in EXPECTED:
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_samples"] == 4
    assert len(report["drift"]) == 10 and report["drift"][-1] > 0  # quality is bounded in test_run_mnist.py
    sc = report["schedule"]
    assert sc["planner"] == "milp"
    assert sc["average_bits"]["act"] <= 6.0 + 1e-9 and sc["average_bits"]["weight"] <= 6.0 + 1e-9
    assert sc["budget_rows"]["avg_act_bits"] == pytest.approx(sc["average_bits"]["act"])
    # the MILP's own schedule was used, and the report says so
    assert sc["fallback"] is None and sc["solver"]["status"] == "milp"
    assert "no fallback to uniform" in (run_dir / "report.md").read_text()
    # buckets weighted by the evaluation sampler's step occupancy (10 DDIM steps over 4 buckets)
    sched = json.loads((run_dir / "schedule.json").read_text())
    steps = _ddim_timesteps(10)
    edges = TimestepGrid(**sched["grid"]).edges().numpy()
    counts = np.histogram(steps, bins=edges)[0]
    assert sc["bucket_weights"] == pytest.approx((counts * 4 / counts.sum()).tolist())
    assert len(set(sc["bucket_weights"])) > 1  # not all equal: the weighting matters here
    # costs: BOPs and integer weight bytes of the schedule
    w = np.array(sched["weight_bits"], dtype=float)
    numel = np.array(json.loads((run_dir / "sensitivity.json").read_text())["meta"]["weight_numel"])
    assert sc["costs"]["weight_bytes"] == pytest.approx(float((numel * w).sum() / 8))
    assert 0 < sc["costs"]["bops_ratio"] <= 64 / 1024
    assert report["weight_rounding"]["method"] == "gptq"
    assert report["weight_rounding"]["methods_count"].get("gptq", 0) > 0  # per layer: which rounding ran
    # boundary layers are found and reported; the MILP schedule's bits are kept (nothing raised over it)
    bl = report["boundary_layers"]
    assert bl["roles"]["conv_in"] == "input" and bl["roles"]["conv_out"] == "output" and bl["raised"] == []
    for key in ("psnr", "ssim", "lpips_alex", "fid", "kid_mean"):
        assert key in report, key
    assert len(sched["act_bits"][0]) == 4


def test_bad_override_is_named(tmp_path):
    cmd = [sys.executable, "-m", "tdq", "run", *SMALL, "quant.weight.bits=12", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "weight.bits=12" in proc.stderr + proc.stdout
