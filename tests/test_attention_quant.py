"""Quantized attention matmuls (`TDQConfig.attention`): simulated Q/K/V/P quantizers, the int8 kernel, save/load."""

from __future__ import annotations

import pytest
import torch

import tdq
from tdq.config import QuantSpec, TDQConfig
from tdq.errors import ConfigError
from tdq.quant.attention import (
    QuantAttnProcessor,
    iter_attention_processors,
    iter_attention_quantizers,
)
from tdq.quant.backends import backend_info, get_cpu_capability, to_backend
from tdq.quant.quantizers import NotCalibratedError, TimestepContext
from tdq.serialization import load_quantization, save_quantization
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d

CAP = get_cpu_capability()
needs_int_mm = pytest.mark.skipif(
    not (CAP["avx512_vnni"] or CAP["amx_int8"]), reason="torch._int_mm is only used on VNNI/AMX CPUs"
)
K = 3


def _attention(tokens_side: int = 8):
    """A diffusers `Attention` (4 heads of 16) with a calibrated `QuantAttnProcessor`; bucket k sees scale k + 1."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16, residual_connection=True, norm_num_groups=8).eval()
    ctx = TimestepContext(K)
    ctx.active = True
    proc = QuantAttnProcessor.attach(attn, "attn", QuantSpec(bits=8, symmetric=False), ctx)
    x = torch.randn(2, 64, tokens_side, tokens_side)
    for _, q in proc.quantizers():
        q.start_observing()
    with torch.no_grad():
        for k in range(K):
            ctx.set(k)
            attn(x * (k + 1))
    for _, q in proc.quantizers():
        q.finish_observing()
    return attn, proc, ctx, x


def test_processor_quantizes_q_k_v_and_probabilities():
    attn, proc, ctx, x = _attention()
    pq = proc.prob_quantizer
    # probabilities: unsigned codes on [0, max P] with max P <= 1
    assert torch.all(pq.zero_point == 0) and torch.all(pq.scale <= 1 / 255 + 1e-9)
    # unsigned 8-bit codes
    assert all((qmin, qmax) == (0, 255) for _, _, qmin, qmax, _, _ in pq._bucket_params())
    assert all(q.spec.symmetric for n, q in proc.quantizers() if n != "prob_quantizer")
    with torch.no_grad():
        ctx.set(1)
        quant = attn(x * 2)
        ctx.active = False  # no hook: the original processor runs
        ref = attn(x * 2)
        ctx.active = True
        # each quantizer matters: the output moves when one of them is switched off
        for _, q in proc.quantizers():
            q.mode = "off"
            assert not torch.equal(attn(x * 2), quant)
            q.mode = "quant"
    assert 0 < float((quant - ref).norm() / ref.norm()) < 0.05


@needs_int_mm
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_int8_attention_matches_simulator_per_bucket(monkeypatch, channels_last):
    import tdq.quant.attention as A

    calls = []
    orig = A.int8_attention
    monkeypatch.setattr(A, "int8_attention", lambda *a: (calls.append(1), orig(*a))[1])
    attn, proc, ctx, x = _attention()
    if channels_last:  # the x86 backend's layout on VNNI/AMX CPUs
        x = x.contiguous(memory_format=torch.channels_last)
    norm_dims = []
    attn.group_norm.register_forward_pre_hook(lambda m, a: norm_dims.append(a[0].dim()))
    with torch.no_grad():
        ctx.set(0)
        proc.kernel = "simulate"
        attn(x)
        proc.kernel = "aten._int_mm"
        attn(x)
    # the simulator keeps diffusers' order (group norm of the [B, C, HW] view); the int8 path normalises a
    # channels-last input as it lies, so the projections read contiguous tokens
    assert norm_dims == ([3, 4] if channels_last else [3, 3])
    calls.clear()
    with torch.no_grad():
        for k in range(K):
            ctx.set(k)
            proc.kernel = "simulate"
            sim = attn(x * (k + 1))
            proc.kernel = "aten._int_mm"
            real = attn(x * (k + 1))
            # the codes are the simulator's; only the float epilogues round differently
            torch.testing.assert_close(real, sim, rtol=1e-5, atol=1e-5 * float(sim.abs().max()))
    assert len(calls) == K  # the int8 kernel ran for every bucket


def test_model_quantize_calibrate_save_load_and_float_path(tmp_path):
    cfg = TDQConfig(attention=True)
    model = tdq.quantize_(tiny_unet2d(), cfg)
    procs = dict(iter_attention_processors(model))
    assert procs and all(n.endswith(".processor") for n in procs)
    inp = denoiser_inputs(model, t=480.0)
    with pytest.raises(NotCalibratedError):
        with torch.no_grad():
            model(**inp)
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    assert all(bool(q.calibrated.all()) for _, q in iter_attention_quantizers(model))
    with torch.no_grad():
        out = output_tensor(model(**inp))
        with tdq.disabled(model):
            fp = output_tensor(model(**inp))
        float_model = tiny_unet2d()
        assert torch.equal(
            output_tensor(float_model(**inp)), fp
        )  # the original processor runs without the hook
    plain = tdq.quantize_(tiny_unet2d(), TDQConfig())
    with tdq.calibration(plain), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            plain(**denoiser_inputs(plain, t=t))
    with torch.no_grad():
        assert not torch.equal(output_tensor(plain(**inp)), out)  # attention quantization changes the output
    for include_float in (True, False):
        d = tmp_path / f"f{include_float}"
        save_quantization(model, d, include_float=include_float)
        loaded = load_quantization(tiny_unet2d(), d)
        with torch.no_grad():
            assert torch.equal(output_tensor(loaded(**inp)), out)


def test_attention_config_field_is_validated():
    with pytest.raises(ConfigError, match="attention"):
        TDQConfig(attention="yes").validate()
    assert TDQConfig().attention is False
    assert TDQConfig.from_dict(TDQConfig(attention=True).to_dict()).attention is True


def test_backend_picks_attention_kernel_by_capability(monkeypatch):
    import tdq.quant.backends as B

    model = tdq.quantize_(tiny_unet2d(), TDQConfig(attention=True))
    with tdq.calibration(model), torch.no_grad():
        model(**denoiser_inputs(model, t=480.0))
    avx2_only = dict(CAP, avx512_vnni=False, amx_int8=False, avx2=True, onednn_int8=True)
    monkeypatch.setattr(B, "get_cpu_capability", lambda: avx2_only)
    to_backend(model, "x86")
    info = backend_info(model)
    assert {r["kernel"] for r in info["attention"].values()} == {"simulate"}
    assert all("VNNI" in r["reason"] for r in info["attention"].values())
    assert all(p.kernel == "simulate" for _, p in iter_attention_processors(model))


@needs_int_mm
def test_x86_model_with_int8_attention_matches_simulator(monkeypatch):
    import tdq.quant.attention as A

    model = tdq.quantize_(tiny_unet2d(), TDQConfig(attention=True))
    torch.manual_seed(0)
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    inp = denoiser_inputs(model, batch=2, t=480.0)
    with torch.no_grad():
        sim = output_tensor(model(**inp))
    to_backend(model, "x86")
    info = backend_info(model)
    assert info["kernels"]["attention:aten._int_mm"] == len(list(iter_attention_processors(model)))
    # Inside the converted model, every attention call runs both kernels on the same Q, K, V: they agree within
    # accumulation order. (Downstream, such last-bit differences flip a few activation codes, and a quantized
    # model amplifies flips, so whole-model outputs are compared loosely; see experiments/results/backend_psnr.md.)
    orig_attend = A.QuantAttnProcessor.attend
    calls = []
    orig_int8 = A.int8_attention
    monkeypatch.setattr(A, "int8_attention", lambda *a: (calls.append(1), orig_int8(*a))[1])

    def both(self, q, k, v, mask, scale):
        real = orig_attend(self, q, k, v, mask, scale)
        self.kernel = "simulate"
        ref = orig_attend(self, q, k, v, mask, scale)
        self.kernel = "aten._int_mm"
        torch.testing.assert_close(real, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        return real

    monkeypatch.setattr(A.QuantAttnProcessor, "attend", both)
    with torch.no_grad():
        out = output_tensor(model(**inp))
    assert len(calls) == len(info["attention"])  # every attention call ran the int8 kernel
    assert float((out - sim).norm() / sim.norm()) < 0.05


def test_corrupted_saved_attention_quantizer_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from tdq.serialization import CONFIG_FILE, STATE_FILE, SavedQuantizationError
    from tdq.utils.io import sha256_file

    model = tdq.quantize_(tiny_unet2d(), TDQConfig(attention=True))
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    save_quantization(model, tmp_path / "ok")
    tensors = load_file(str(tmp_path / "ok" / STATE_FILE))
    key = next(k for k in tensors if k.endswith("processor.prob_quantizer.scale"))
    for bad in (float("nan"), -1.0):
        d = tmp_path / f"bad{bad}"
        save_quantization(model, d)
        t = dict(tensors)
        t[key] = t[key].clone()
        t[key][0] = bad
        save_file(t, str(d / STATE_FILE))
        sidecar = json.loads((d / CONFIG_FILE).read_text())
        sidecar["state_sha256"] = sha256_file(d / STATE_FILE)  # a consistent pair: the values must be checked
        (d / CONFIG_FILE).write_text(json.dumps(sidecar))
        with pytest.raises(SavedQuantizationError, match="attention quantizer .*prob_quantizer.scale"):
            load_quantization(tiny_unet2d(), d)


def test_int8_codes_saturate_huge_inputs_and_refuse_nonfinite():
    from tdq.quant.attention import _codes_i8

    x = torch.tensor([1e30, -1e30, 3e9, -3e9, 3.0e38, 0.3, -0.2] * 9)
    for scale, zp, lo, hi in ((0.01, 0, -127, 127), (1 / 255, -128, -128, 127)):
        got = _codes_i8(x, scale, zp, lo, hi)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi).div(scale).round().add(zp)
        assert got[0] == hi and got[1] == lo and got[2] == hi and got[3] == lo
        assert torch.equal(got.to(torch.float32), ref)
        assert _codes_i8(torch.cat([x, torch.tensor([float("nan")])]), scale, zp, lo, hi) is None


@needs_int_mm
def test_int8_attention_huge_and_nonfinite_inputs_match_simulator(monkeypatch):
    import tdq.quant.attention as A

    results = []
    orig = A.int8_attention
    monkeypatch.setattr(A, "int8_attention", lambda *a: (results.append(orig(*a)), results[-1])[1])
    attn, proc, ctx, x = _attention()
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    q[0, 0, 0, 0], k[1, 2, 3, 4], v[0, 1, 5, 6] = (
        1e30,
        -3e9,
        1e30,
    )  # saturate at qmax/qmin, as in the simulator
    with torch.no_grad():
        ctx.set(1)
        proc.kernel = "simulate"
        sim = proc.attend(q, k, v, None, 0.25)
        proc.kernel = "aten._int_mm"
        real = proc.attend(q, k, v, None, 0.25)
        assert results and results[-1] is not None  # the int8 kernel ran
        torch.testing.assert_close(real, sim, rtol=1e-5, atol=1e-5 * float(sim.abs().max()))
        q[1, 3, 2, 1] = float("nan")  # not hidden behind a code: the simulator's attention runs, NaN kept
        proc.kernel = "simulate"
        sim = proc.attend(q, k, v, None, 0.25)
        proc.kernel = "aten._int_mm"
        real = proc.attend(q, k, v, None, 0.25)
        assert results[-1] is None and torch.isnan(sim).any()
        torch.testing.assert_close(real, sim, equal_nan=True, rtol=0, atol=0)
