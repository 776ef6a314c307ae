"""Boundary layers (model input, output, timestep/conditioning path): found by behaviour, kept at 8-bit activations."""

from __future__ import annotations

import pytest
import torch

import tdq
from tdq.boundary import find_boundary_layers
from tdq.config import LayerOverride, TDQConfig
from tdq.errors import ConfigError
from tdq.serialization import load_quantization, save_quantization
from tdq.testing import denoiser_inputs, tiny_dit, tiny_flux, tiny_unet2d, tiny_unet2d_condition

A6 = {"bits": 6, "symmetric": False}


def _roles(model):
    q = tdq.quantize_(model, TDQConfig(activation=A6))
    with tdq.disabled(q):
        return find_boundary_layers(q, (), denoiser_inputs(q, t=500.0), dict(tdq.iter_quant_layers(q)))


def test_roles_of_a_pixel_unet():
    roles = _roles(tiny_unet2d())
    assert roles["conv_in"] == "input" and roles["conv_out"] == "output"
    cond = {n for n, r in roles.items() if r == "conditioning"}
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= cond
    assert cond and all(n.startswith("time_embedding") or n.endswith("time_emb_proj") for n in cond)
    assert not any("conv1" in n or "conv2" in n for n in roles)  # the sample path is not a boundary


def test_roles_of_text_and_transformer_models():
    roles = _roles(tiny_unet2d_condition())
    assert roles["conv_in"] == "input" and roles["conv_out"] == "output"
    assert any(n.endswith("attn2.to_k") and r == "conditioning" for n, r in roles.items())  # text keys/values
    assert not any(n.endswith(("attn1.to_q", "attn2.to_q")) for n in roles)  # queries read the sample
    roles = _roles(tiny_dit())
    assert roles["pos_embed.proj"] == "input"  # patchify conv: reads the sample itself
    assert roles["proj_out_2"] == "output"  # its output is the prediction before unpatchify
    roles = _roles(tiny_flux())
    assert roles["x_embedder"] == "input" and roles["proj_out"] == "output"


def _calibrated(config: TDQConfig, schedule_bits: dict | None = None):
    torch.manual_seed(0)
    model = tdq.quantize_(tiny_unet2d(), config)
    for name, bits in (schedule_bits or {}).items():  # as a precision schedule does, before calibration
        model.get_submodule(name).set_bits(act_bits=bits)
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    return model


def _act_bits(model):
    return {n: set(m.act_quantizer.bits.tolist()) for n, m in tdq.iter_quant_layers(model)}


def test_calibration_raises_boundary_layers_to_8_bits(tmp_path):
    model = _calibrated(
        TDQConfig(activation=A6, outliers={"handle": False})
    )  # (handling: slow, not needed here)
    bits = _act_bits(model)
    boundary = tdq.get_quantization(model).boundary
    assert boundary["conv_in"]["role"] == "input" and boundary["conv_in"]["bits_after"] == [8] * 10
    for name, b in bits.items():
        assert b == ({8} if name in boundary else {6}), name
    # the raised bits are part of the saved state
    save_quantization(model, tmp_path / "q")
    loaded = load_quantization(tiny_unet2d(), tmp_path / "q")
    assert _act_bits(loaded) == bits
    # off: every layer keeps the configured 6 bits
    off = _calibrated(TDQConfig(activation=A6, boundary_act_bits=None, outliers={"handle": False}))
    assert set().union(*_act_bits(off).values()) == {6}
    assert tdq.get_quantization(off).boundary is None


def test_explicit_choices_are_kept():
    cfg = TDQConfig(
        activation=A6, overrides={"conv_in": LayerOverride(act_bits=4)}, outliers={"handle": False}
    )  # no 16-bit fallback of the 4-bit layer
    bits = _act_bits(_calibrated(cfg, schedule_bits={"conv_out": 5}))
    assert bits["conv_in"] == {4}  # explicit override
    assert bits["conv_out"] == {5}  # a precision schedule's choice
    assert bits["time_embedding.linear_1"] == {8}


@pytest.mark.parametrize("bad", [1, 17, "8", True, 7.5])
def test_bad_boundary_bits_are_named(bad):
    with pytest.raises(ConfigError, match="boundary_act_bits="):
        TDQConfig(boundary_act_bits=bad).validate()


def test_boundary_layers_hold_mnist_ddpm_w8a6():
    """The README's claim: at W8A6 the 8-bit boundary layers are worth many dB on the trained mnist-ddpm."""
    import copy

    from diffusers import DDIMScheduler

    from tdq import zoo
    from tdq.eval.metrics import psnr_per_image

    fp = zoo.load("mnist-ddpm").unet.eval()
    sched = DDIMScheduler.from_pretrained(zoo.path("mnist-ddpm"), subfolder="scheduler")

    def sample(unet, seeds):
        sched.set_timesteps(10)
        x = torch.cat([torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in seeds])
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x).prev_sample
        return (x.clamp(-1, 1) + 1) / 2

    seeds = [0, 1, 2, 3]
    ref = sample(fp, seeds)
    psnr = {}
    for b in (8, None):
        # (outlier handling off: it is slow at A6 and not what this test is about)
        cfg = TDQConfig(activation=A6, boundary_act_bits=b, outliers={"handle": False})
        q = tdq.quantize_(copy.deepcopy(fp), cfg)
        with tdq.calibration(q):
            sample(q, [100, 101, 102, 103])
        psnr[b] = float(psnr_per_image(sample(q, seeds), ref).mean())
    print("W8A6 PSNR to FP with / without boundary layers at A8:", psnr)  # measured (handling on) 31.8 / 23.3
    assert psnr[8] > psnr[None] + 4.0, psnr


def test_a_module_of_boundary_layers_only_keeps_its_bits():
    """One Linear reads the input and writes the output: raising it would override the whole config."""
    m = tdq.quantize_static_(torch.nn.Sequential(torch.nn.Linear(8, 8)), TDQConfig(activation={"bits": 4}))
    with tdq.calibration(m), torch.no_grad():
        m(torch.randn(16, 8))
    assert m[0].act_quantizer.bits.tolist() == [4]
    assert tdq.get_quantization(m).boundary == {}
