"""experiments/lowbit.py on the conditional latent models (issue #12): the conditioned path at a tiny size, and the
sign of the committed mnist-t2i / mnist-dit claims (README "Low-bit weights")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOWBIT = ROOT / "experiments" / "lowbit.py"
RESULTS = ROOT / "experiments" / "results"
SEEDS, STEPS = 10, 4


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory):
    """lowbit.py on mnist-t2i: 10 eval seeds, 2 calibration seeds, DDIM 4, rows RTN W4A8 and GPTQ W4A8."""
    d = tmp_path_factory.mktemp("lowbit_latent")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(LOWBIT), "--model", "mnist-t2i", "--seeds", str(SEEDS), "--calib-seeds", "2"]
    cmd += ["--steps", str(STEPS), "--batch", str(SEEDS), "--no-fid", "--rows", "w4a8-nearest,w4a8-gptq"]
    cmd += ["--out", str(d / "t2i"), "--cache", str(d / "cache")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((d / "t2i.json").read_text()), (d / "t2i.md").read_text()


def test_gptq_w4_beats_round_to_nearest_on_t2i(tiny_t2i):
    rows = tiny_t2i[0]["rows"]
    near, gptq = rows["w4a8-nearest"], rows["w4a8-gptq"]
    assert (near["rounding"], gptq["rounding"]) == ("nearest", "gptq")
    # same weight grid (4-bit, MSE observer) and activations: only the rounding differs
    assert gptq["psnr"] > near["psnr"] + 3.0, (gptq["psnr"], near["psnr"])
    assert gptq["lpips_alex"] < near["lpips_alex"]


def test_judge_columns_match_a_direct_computation(tiny_t2i):
    from tdq.run.config import to_run_config
    from tdq.run.models import load_model
    from tdq.sampling import make_sampler, make_scheduler
    from tdq.zoo.judge import load_judge

    result, md = tiny_t2i
    torch.set_num_threads(1)
    import yaml

    mcfg = yaml.safe_load((ROOT / "tdq" / "configs" / "model" / "mnist-t2i.yaml").read_text())
    m = load_model(to_run_config({"model": mcfg}).model)
    images = make_sampler(
        m, make_scheduler(m.scheduler, "ddim"), num_inference_steps=STEPS, batch_size=SEEDS, progress=False
    )(list(range(SEEDS))).images
    c = m.crop
    with torch.no_grad():
        pred = load_judge()(images[..., c:-c, c:-c]).argmax(-1)
    labels = torch.arange(SEEDS) % 10  # seed s is prompted with digit s % 10
    assert result["judge_fp_predictions"] == pred.tolist()
    assert result["judge_fp_accuracy"] == pytest.approx(float((pred == labels).double().mean()))
    for r in result["rows"].values():
        j = r["judge"]
        assert j["fp_accuracy"] == result["judge_fp_accuracy"]
        assert j["delta"] == pytest.approx(j["accuracy"] - j["fp_accuracy"])
        assert j["delta_ci95"][0] <= j["delta"] <= j["delta_ci95"][1]
    assert "Δ judge vs FP" in md and "judge acc." in md and "classifier-free guidance 4.0" in md


@pytest.mark.parametrize("model", ["mnist-t2i", "mnist-dit"])
def test_committed_w4a8_claim(model):
    """README: the w4a8 preset keeps the prompted digit (judge accuracy at most 2 points below FP) and its GPTQ
    rounding beats round-to-nearest W4A8 in PSNR to FP beyond the CIs."""
    result = json.loads((RESULTS / f"lowbit_{model}.json").read_text())
    rows = result["rows"]
    w4a8, rtn = rows["w4a8"], rows["w4a8-nearest"]
    assert w4a8["preset"] == "tdq/configs/quant/w4a8.yaml" and w4a8["rounding"] == "gptq"
    assert w4a8["judge"]["delta"] >= -0.02, w4a8["judge"]
    assert w4a8["psnr_ci95"][0] > rtn["psnr_ci95"][1], (w4a8["psnr_ci95"], rtn["psnr_ci95"])
    assert rows["w4a8-int"]["psnr_ci95"][0] > rtn["psnr_ci95"][1]
