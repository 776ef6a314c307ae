"""Timestep-selective evaluation: quantization on in only one third of the steps, float elsewhere."""

import pytest
import torch
from diffusers import DDIMScheduler

import tdq
from tdq.eval.selective import quantize_only_timesteps, step_thirds, timestep_selective_eval
from tdq.sampling import DiffusionSampler

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # one thread: two-thread OpenMP is many times slower on a build machine shared with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(_one_thread):
    # the trained bundled model: on a random-weight model the samples are noise (PSNR to FP ~9 dB) and which third
    # matters is a coin toss that flipped between CPUs
    from tdq import zoo

    model = zoo.load("mnist-ddpm").unet.eval()
    sampler = DiffusionSampler(
        model,
        DDIMScheduler.from_pretrained(zoo.path("mnist-ddpm"), subfolder="scheduler"),
        (1, 28, 28),
        num_inference_steps=6,
        batch_size=4,
        progress=False,
    )
    with torch.no_grad():
        fp = sampler(SEEDS).images
        tdq.quantize_(model, tdq.TDQConfig(activation={"bits": 4}))
        with tdq.calibration(model):
            sampler([10, 11, 12, 13])
        full = sampler(SEEDS).images
    return model, sampler, fp, full


def test_step_thirds():
    assert step_thirds([9, 8, 7, 6, 5, 4, 3]) == {"early": [9, 8], "middle": [7, 6, 5], "late": [4, 3]}
    with pytest.raises(ValueError, match="at least 3"):
        step_thirds([1, 2])


def test_selection_switches_quantization_per_call(setup):
    model, sampler, fp, full = setup
    with torch.no_grad():
        with quantize_only_timesteps(model, []):
            torch.testing.assert_close(sampler(SEEDS).images, fp, rtol=0, atol=0)  # nothing selected: FP
        with quantize_only_timesteps(model, sampler.timesteps()):
            torch.testing.assert_close(sampler(SEEDS).images, full, rtol=0, atol=0)  # all: fully quantized
        # after the block the model quantizes every step again
        torch.testing.assert_close(sampler(SEEDS).images, full, rtol=0, atol=0)


def test_timestep_selective_eval(setup):
    model, sampler, fp, full = setup
    with torch.no_grad():
        res = timestep_selective_eval(sampler, model, SEEDS, fp_images=fp)
    assert res["timesteps"]["early"] == sampler.timesteps()[:2]
    torch.testing.assert_close(res["all"]["images"], full, rtol=0, atol=0)
    for row in ("early", "middle", "late"):
        # each row is exactly the sampler run with quantization on only in that third, and it is not FP
        with quantize_only_timesteps(model, res["timesteps"][row]):
            torch.testing.assert_close(res[row]["images"], sampler(SEEDS).images, rtol=0, atol=0)
        assert res[row]["psnr"] < float("inf")
    # measured on mnist-ddpm A4, 6 DDIM steps: all 14.1 dB, early 13.9, middle 18.3, late 25.8 (early steps carry
    # the damage; quantizing only the last third is far closer to FP than quantizing every step)
    assert res["late"]["psnr"] > res["all"]["psnr"] + 5
    assert res["middle"]["psnr"] > res["all"]["psnr"]
