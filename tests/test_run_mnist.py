"""`tdq run` on the bundled mnist-ddpm at W8A8: quality bounded, and timestep-aware beats static.

The bounds come from `experiments/run_test_bounds.py` (results in `experiments/results/run_test_bounds.md`): at this
size (8 eval seeds, 10 DDIM steps, 4 calibration samples) four disjoint seed sets gave timestep-aware W8A8 PSNR
34.8..37.3 dB, LPIPS(alex) 0.0015..0.0077 and final drift 0.035..0.078, and static (one bucket) W8A8 5.3..6.4 dB
lower PSNR with higher LPIPS in every set. The bounds sit at about twice the worst measured error (PSNR 3 dB below,
LPIPS and drift doubled) and at under half the smallest measured static-vs-timestep-aware gap.

At 6-bit activations the static config scored *better* PSNR than the timestep-aware one in all four seed sets at
this size (by 0.3..2.3 dB; 10 buckets over 10 steps leaves one step and 4 samples per bucket scale), so no sign is
asserted there. Both signs depend on the calibration: with 16 calibration samples at 20 steps
(`experiments/results/run_test_bounds_calib16.md`, 3 seed sets) timestep-aware won at A6 in all three (+0.1..2.2
dB) but lost at A8 in two of three, so the A8 sign below holds for this test's settings, not in general.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tdq.testing.runs import MNIST_TEST_RUN, compose_run

SMALL = list(MNIST_TEST_RUN)


def _run(overrides: list[str], run_dir: Path) -> dict:
    from tdq.run.job import run_experiment

    return run_experiment(compose_run(overrides), run_dir)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run-mnist")
    n = torch.get_num_threads()
    try:
        common = [*SMALL, f"eval.cache_dir={tmp / 'cache'}"]
        return {
            "tdq": _run([*common, "quant=w8a8"], tmp / "tdq"),
            "static": _run([*common, "quant=w8a8-static"], tmp / "static"),
        }
    finally:
        torch.set_num_threads(n)


@pytest.mark.timeout(600)
def test_w8a8_timestep_aware_close_to_fp(reports):
    r = reports["tdq"]
    assert r["num_samples"] == 8 and len(r["drift"]) == 10
    assert r["psnr"] >= 31.5, r["psnr"]  # measured 34.8..37.3 dB
    assert r["lpips_alex"] <= 0.016, r["lpips_alex"]  # measured 0.0015..0.0077
    assert 0 < r["drift"][-1] <= 0.16, r["drift"]  # measured 0.035..0.078
    # class agreement with FP under the MNIST judge (measured 1.0)
    assert r["data"]["judge_classes"]["class_agreement_fp_vs_quantized"] >= 0.75
    # judge-IS beside FID/KID: between 1 and the 10 classes for every set
    for label in ("real", "fp", "quantized"):
        assert 1.0 <= r["data"]["judge_classes"][label]["inception_score"] <= 10.0 + 1e-9, label


@pytest.mark.timeout(600)
def test_w8a8_static_worse_than_timestep_aware(reports):
    tdq_r, static = reports["tdq"], reports["static"]
    assert static["psnr"] <= tdq_r["psnr"] - 2.5, (static["psnr"], tdq_r["psnr"])  # measured gap 5.3..6.4 dB
    assert static["lpips_alex"] > tdq_r["lpips_alex"]  # in all four measured seed sets
