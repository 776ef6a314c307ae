"""Timestep-selective evaluation: quantization on in only one third of the steps, float elsewhere."""

import pytest
import torch
from diffusers import DDIMScheduler

import tdq
from tdq import testing as T
from tdq.eval.selective import quantize_only_timesteps, step_thirds, timestep_selective_eval
from tdq.sampling import DiffusionSampler


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # one thread: two-thread OpenMP is many times slower on a build machine shared with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(_one_thread):
    torch.manual_seed(0)
    model = T.tiny_unet2d()
    sampler = DiffusionSampler(
        model,
        DDIMScheduler(num_train_timesteps=1000),
        (1, 16, 16),
        num_inference_steps=6,
        batch_size=2,
        progress=False,
    )
    with torch.no_grad():
        fp = sampler([0, 1]).images
        tdq.quantize_(model, tdq.TDQConfig(activation={"bits": 4}))
        with tdq.calibration(model):
            sampler([10, 11])
        full = sampler([0, 1]).images
    return model, sampler, fp, full


def test_step_thirds():
    assert step_thirds([9, 8, 7, 6, 5, 4, 3]) == {"early": [9, 8], "middle": [7, 6, 5], "late": [4, 3]}
    with pytest.raises(ValueError, match="at least 3"):
        step_thirds([1, 2])


def test_selection_switches_quantization_per_call(setup):
    model, sampler, fp, full = setup
    with torch.no_grad():
        with quantize_only_timesteps(model, []):
            torch.testing.assert_close(sampler([0, 1]).images, fp, rtol=0, atol=0)  # nothing selected: FP
        with quantize_only_timesteps(model, sampler.timesteps()):
            torch.testing.assert_close(sampler([0, 1]).images, full, rtol=0, atol=0)  # all: fully quantized
        # after the block the model quantizes every step again
        torch.testing.assert_close(sampler([0, 1]).images, full, rtol=0, atol=0)


def test_timestep_selective_eval(setup):
    model, sampler, fp, full = setup
    with torch.no_grad():
        res = timestep_selective_eval(sampler, model, [0, 1], fp_images=fp)
    assert res["timesteps"]["early"] == sampler.timesteps()[:2]
    torch.testing.assert_close(res["all"]["images"], full, rtol=0, atol=0)
    for row in ("early", "middle", "late"):
        # one third quantized: closer to FP than all steps quantized, but not FP
        assert res["all"]["psnr"] < res[row]["psnr"] < float("inf"), (
            row,
            res[row]["psnr"],
            res["all"]["psnr"],
        )
