"""Real-execution backends: per-layer equality with the simulator, whole-sampler agreement, memory, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from _layer_match import assert_layers_match
from _layer_match import close as _close
from torch import nn

import tdq
from tdq.config import QuantSpec, TDQConfig
from tdq.quant.backends import (
    BackendError,
    IntMMLinear,
    WeightOnlyModule,
    X86Int8Module,
    backend_info,
    get_cpu_capability,
    resident_bytes,
    select_backend,
    to_backend,
)
from tdq.quant.modules import QUANT_MODULES
from tdq.quant.quantizers import NotCalibratedError, TimestepContext
from tdq.serialization import load_quantization, save_quantization
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d

HAS_X86 = get_cpu_capability()["onednn_int8"]
needs_x86 = pytest.mark.skipif(not HAS_X86, reason="PyTorch without oneDNN int8 kernels")
K = 3  # buckets of the layer-level tests


def _layer(float_mod: nn.Module, act_symmetric: bool = False, in_shape=(4, 16), seed: int = 0):
    """A calibrated simulated layer with its own context: bucket k sees inputs of scale 0.5 * (k + 1)."""
    torch.manual_seed(seed)
    ctx = TimestepContext(K)
    ctx.active = True
    wspec = QuantSpec(bits=8, granularity="per_channel", symmetric=True)
    aspec = QuantSpec(bits=8, granularity="per_tensor", symmetric=act_symmetric)
    q = QUANT_MODULES[type(float_mod)].from_float(float_mod, "layer", wspec, aspec, ctx)
    q.act_quantizer.start_observing()
    for k in range(K):
        ctx.set(k)
        q(torch.randn(*in_shape) * 0.5 * (k + 1) + 0.3)
    q.act_quantizer.finish_observing()
    return q, ctx


CONVS = {
    "3x3": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    "stride2": dict(in_channels=16, out_channels=8, kernel_size=3, stride=2, padding=1),
    "groups_dilation": dict(in_channels=16, out_channels=32, kernel_size=3, padding=2, dilation=2, groups=4),
    "1x1_nobias": dict(in_channels=16, out_channels=16, kernel_size=1, bias=False),
}


@needs_x86
@pytest.mark.parametrize("act_symmetric", [False, True], ids=["affine_act", "symmetric_act"])
@pytest.mark.parametrize("conv", list(CONVS), ids=list(CONVS))
def test_x86_conv_matches_simulator(conv, act_symmetric):
    q, ctx = _layer(nn.Conv2d(**CONVS[conv]), act_symmetric, in_shape=(2, 16, 9, 9))
    real = X86Int8Module(q)
    x = torch.randn(3, 16, 9, 9) + 0.3
    for k in range(K):
        ctx.set(k)
        with torch.no_grad():
            _close(real(x), q(x))


@needs_x86
@pytest.mark.parametrize("act_symmetric", [False, True], ids=["affine_act", "symmetric_act"])
def test_x86_linear_matches_simulator_any_rank_and_low_act_bits(act_symmetric):
    q, ctx = _layer(nn.Linear(16, 24), act_symmetric)
    real = X86Int8Module(q)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for k in range(K):
            ctx.set(k)
            _close(real(x), q(x))
        out8 = real(x)
        # lower activation bits at a bucket: same 8-bit kernel, coarser scale, the simulator's codes
        q.set_bits(act_bits=torch.tensor([4, 6, 16]))
        for k in range(K):
            ctx.set(k)
            _close(real(x), q(x))
        assert not torch.allclose(real(x), out8)  # sanity: the bits did change the output


@needs_x86
def test_x86_mixed_buckets_split_per_sample():
    q, ctx = _layer(nn.Conv2d(16, 8, 3, padding=1), in_shape=(2, 16, 6, 6))
    real = X86Int8Module(q)
    x = torch.randn(4, 16, 6, 6) * 2
    buckets = torch.tensor([2, 0, 2, 1])
    ref = []
    with torch.no_grad():
        for i, k in enumerate(buckets.tolist()):  # the simulator, one sample at a time in its own bucket
            ctx.set(k)
            ref.append(q(x[i : i + 1]))
        ref = torch.cat(ref)
        ctx.set(None, buckets)
        out = real(x)
        _close(out, ref)
        ctx.set(2)
        assert not torch.allclose(real(x), ref, atol=1e-3)  # one bucket for all samples is wrong here


@needs_x86
def test_x86_act_smooth_contract():
    # SmoothQuant contract: the quantizer sees x / act_smooth, the weight already holds W * act_smooth
    q, ctx = _layer(nn.Linear(16, 8))
    smooth = torch.rand(16) + 0.5
    q.register_buffer("act_smooth", smooth)
    real = X86Int8Module(q)
    x = torch.randn(6, 16)
    ctx.set(1)
    with torch.no_grad():
        _close(real(x), q(x))  # the simulated layer divides by act_smooth itself
    conv, ctx = _layer(nn.Conv2d(16, 8, 3, padding=1), in_shape=(2, 16, 5, 5))
    conv.register_buffer("act_smooth", smooth)
    real = X86Int8Module(conv)
    xc = torch.randn(2, 16, 5, 5)
    ctx.set(0)
    with torch.no_grad():
        _close(real(xc), conv(xc))
        assert not torch.allclose(conv(xc), conv(xc / smooth.view(-1, 1, 1)))  # the smoothing matters


@pytest.mark.parametrize("pack4", [False, True])
def test_weight_only_is_bit_exact(pack4):
    float_mod = nn.Linear(16, 24)
    q, ctx = _layer(float_mod)
    if pack4:
        q.set_bits(weight_bits=4)
    wo = WeightOnlyModule(q, pack4=pack4)
    assert wo.weight_codes.numel() == (16 * 24 // 2 if pack4 else 16 * 24)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for k in range(K):
            ctx.set(k)
            assert torch.equal(wo(x), q(x))


def test_int_mm_linear_arithmetic_on_cpu():
    # the CUDA backend's module; aten._int_mm also has a CPU kernel, so its arithmetic is checked here
    for sym in (False, True):
        q, ctx = _layer(nn.Linear(16, 24), act_symmetric=sym)
        real = IntMMLinear(q)
        x = torch.randn(2, 7, 16)
        with torch.no_grad():
            for k in range(K):
                ctx.set(k)
                _close(real(x), q(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_simulator(saved_tiny):
    model = _calibrated_unet(saved_tiny).cuda()
    inp = {k: v.cuda() if torch.is_tensor(v) else v for k, v in denoiser_inputs(model, t=700.0).items()}
    with torch.no_grad():
        ref = output_tensor(model(**inp))
        to_backend(model, "cuda")
        out = output_tensor(model(**inp))
    assert backend_info(model)["kernels"].get("aten._int_mm", 0) > 0
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------------- models
def _calibrate_tiny(config: TDQConfig | None = None):
    model = tdq.quantize_(tiny_unet2d(), config or TDQConfig())
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    return model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Calibrated tiny UNets (W8 and W4 weights), saved once: tests load them instead of recalibrating."""
    out = {}
    for bits in (8, 4):
        d = tmp_path_factory.mktemp(f"w{bits}")
        torch.manual_seed(0)
        save_quantization(
            _calibrate_tiny(TDQConfig(weight=QuantSpec(bits=bits, granularity="per_channel"))), d
        )
        out[bits] = d
    return out


def _skeleton(seed: int = 123):
    """A tiny UNet with other random weights than the saved one: loading must take every weight from the file."""
    model = tiny_unet2d()  # seeds itself: perturb every parameter so that no weight equals the saved model's
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return model


def _calibrated_unet(saved, bits: int = 8):
    return load_quantization(_skeleton(), saved[bits])


@needs_x86
def test_auto_selection_is_recorded_and_layers_listed(saved_tiny):
    model = _calibrated_unet(saved_tiny)
    inp = denoiser_inputs(model, t=480.0)
    with torch.no_grad():
        ref = output_tensor(model(**inp))
    sim = copy.deepcopy(model)
    to_backend(model, "auto")
    info = backend_info(model)
    assert info["requested"] == "auto"
    assert info["backend"] == select_backend(model, info["capability"]) == "x86"
    assert info["capability"]["cpu_model"]
    assert set(info["layers"]) == {n for n, _ in tdq.iter_quant_layers(model)}
    assert info["kernels"]["onednn.qconv2d_pointwise"] > 0 and info["kernels"]["onednn.qlinear_pointwise"] > 0
    assert "no int8 gain" in info["layers"]["conv_in"]["reason"]  # 3-channel input conv stays on int8 storage
    assert_layers_match(model, sim, inp)
    with torch.no_grad():  # the simulated copy is untouched by the conversion
        assert torch.equal(output_tensor(sim(**inp)), ref)
    with pytest.raises(BackendError, match="already converted"):
        to_backend(model, "x86")
    with pytest.raises(BackendError, match="weight bits cannot change"):
        dict(tdq.iter_quant_layers(model))["conv_out"].set_bits(weight_bits=4)


def test_bad_backend_and_uncalibrated_errors(saved_tiny):
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        to_backend(_calibrated_unet(saved_tiny), "nope")
    with pytest.raises(NotCalibratedError, match="not calibrated"):
        to_backend(tdq.quantize_(tiny_unet2d(), TDQConfig()), "weight_only_int8")
    with pytest.raises(BackendError, match="CUDA"):
        if torch.cuda.is_available():
            pytest.skip("has CUDA")
        to_backend(_calibrated_unet(saved_tiny), "cuda")


def _mnist_unet():
    zoo = pytest.importorskip("tdq.zoo")
    if "mnist-ddpm" not in zoo.available():
        pytest.skip("mnist-ddpm checkpoint not present")
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(zoo.path("mnist-ddpm") / "unet").eval()


def _sample(unet, seeds=(0, 1), steps: int = 6):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def _psnr(a, b):
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()


@needs_x86
def test_sampler_x86_vs_simulator_psnr_and_memory():
    fp = _mnist_unet()
    fp_bytes = resident_bytes(fp)
    model = tdq.quantize_(copy.deepcopy(fp), TDQConfig())
    with tdq.calibration(model):
        _sample(model, seeds=(100, 101))
    sims = _sample(model)
    to_backend(model, "x86")
    reals = _sample(model)
    print(
        "PSNR real vs simulated, pooled and per seed:",
        _psnr(reals, sims),
        [_psnr(r, s) for s, r in zip(sims, reals, strict=True)],
    )
    # A quantized model is discontinuous: a 1e-6 relative change of its input moves the simulator's own output by
    # ~0.3 % per call, and the int8 kernels' exact integer sums differ from the simulator's float sums by that much.
    # So the bar is on the pooled samples (>= 40 dB), with a looser per-seed floor.
    assert _psnr(reals, sims) >= 40.0
    for s, r in zip(sims, reals, strict=True):
        assert _psnr(r, s) >= 35.0
    assert resident_bytes(model) <= 0.27 * fp_bytes
    # weight-only int4 of a W4 model: packed codes
    w4 = tdq.quantize_(copy.deepcopy(fp), TDQConfig(weight=QuantSpec(bits=4, granularity="per_channel")))
    with tdq.calibration(w4), torch.no_grad():
        w4(torch.randn(1, 1, 28, 28), torch.tensor(500))
    to_backend(w4, "weight_only_int4")
    assert resident_bytes(w4) <= 0.15 * fp_bytes
    assert set(backend_info(w4)["kernels"]) == {"dequant_int4+float"}


@needs_x86
@pytest.mark.parametrize("backend", ["x86", "weight_only_int4"])
def test_save_load_with_backend_roundtrip(tmp_path, saved_tiny, backend):
    bits = 4 if backend == "weight_only_int4" else 8
    model = _calibrated_unet(saved_tiny, bits)  # the simulator
    inp = denoiser_inputs(model, t=700.0)
    with torch.no_grad():
        ref = output_tensor(model(**inp))
    loaded = load_quantization(_skeleton(), saved_tiny[bits], backend=backend)
    assert backend_info(loaded)["backend"] == backend
    with torch.no_grad():
        out = output_tensor(loaded(**inp))
    assert_layers_match(loaded, model, inp)
    # a converted model saves the same codes: save -> load(backend) -> identical outputs
    save_quantization(loaded, tmp_path / "real")
    again = load_quantization(_skeleton(7), tmp_path / "real", backend=backend)
    with torch.no_grad():
        assert torch.equal(output_tensor(again(**inp)), out)
    sim_again = load_quantization(_skeleton(8), tmp_path / "real")
    with torch.no_grad():
        assert torch.equal(output_tensor(sim_again(**inp)), ref)


@needs_x86
def test_backend_report_converts_and_measures():
    from tdq.quant.backends import backend_report, record_call

    model = tdq.quantize_(tiny_unet2d(), TDQConfig())
    with tdq.calibration(model), record_call(model) as call, torch.no_grad():
        model(**denoiser_inputs(model, t=480.0))
    assert call["kwargs"] or call["args"]
    rep = backend_report(model, "x86", call, pairs=2)
    assert rep["backend"] == "x86" and backend_info(model)["backend"] == "x86"
    assert rep["latency"]["pairs"] == 2 and rep["latency"]["ratio_median"] > 0
    assert 0 < rep["resident_bytes_ratio"] < 1
    assert rep["kernels"]["onednn.qconv2d_pointwise"] > 0


def test_resident_bytes_counts_shared_storage_once():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # tied
    assert resident_bytes(nn.Sequential(a, b)) == (16 + 4 + 4) * 4


# |x / scale| far beyond 2^31: PyTorch's vectorised quantizer wraps these through int32 (1e30 became code 0)
HUGE = [1e30, -1e30, 3e9, -3e9, 3.0e38, -3.0e38, 2.5e9]


def _ref_codes(x, scale, zp, lo, hi):
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi).div(scale).round().add(zp)


@pytest.mark.parametrize("zp,lo,hi", [(128, 0, 255), (3, 0, 15), (128, 1, 255)])
def test_quantize_u8_saturates_huge_inputs_and_refuses_nonfinite(zp, lo, hi):
    from tdq.quant.backends.x86 import _inv_scale, quantize_u8

    scale = 0.05
    x = torch.tensor(HUGE + [0.3, -0.2, 0.025] * 20)  # long enough for the vectorised path
    got = quantize_u8(x, scale, _inv_scale(scale), zp, lo, hi)
    assert got[0] == hi and got[1] == lo and got[2] == hi and got[3] == lo
    assert torch.equal(got.to(torch.float32), _ref_codes(x, scale, zp, lo, hi))
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert quantize_u8(torch.cat([x, torch.tensor([bad])]), scale, _inv_scale(scale), zp, lo, hi) is None


@needs_x86
@pytest.mark.parametrize("act_symmetric", [False, True], ids=["affine_act", "symmetric_act"])
@pytest.mark.parametrize("conv", [True, False], ids=["conv", "linear"])
def test_x86_huge_and_nonfinite_inputs_match_simulator(conv, act_symmetric):
    # symmetric activations run as uint8 codes with zero point 128, where the unclamped quantizer wrapped
    if conv:
        q, ctx = _layer(nn.Conv2d(**CONVS["3x3"]), act_symmetric, in_shape=(2, 16, 9, 9))
        x = torch.randn(3, 16, 9, 9) + 0.3
        big, bad = (0, 0, 4, 4), (2, 1, 3, 3)
    else:
        q, ctx = _layer(nn.Linear(16, 24), act_symmetric)
        x = torch.randn(2, 5, 16)
        big, bad = (0, 1, 3), (1, 2, 5)
    real = X86Int8Module(q)
    x[big] = 1e30  # saturates at qmax in the simulator: a finite output
    x.view(-1)[-1] = -3e9
    with torch.no_grad():
        for k in range(K):
            ctx.set(k)
            sim = q(x)
            assert torch.isfinite(sim).all()
            _close(real(x), sim)
        for v in (float("nan"), float("inf")):
            xb = x.clone()
            xb[bad] = v  # not hidden behind a finite code: the simulator's arithmetic, NaN/inf kept
            sim, out = q(xb), real(xb)
            assert not torch.isfinite(sim).all()
            assert torch.equal(torch.isfinite(out), torch.isfinite(sim))
            torch.testing.assert_close(out, sim, equal_nan=True, rtol=1e-5, atol=1e-3)
