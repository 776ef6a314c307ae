"""Capability-dependent choices of the x86 backend: ISA limits from the environment, channels-last conv output."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tdq
from tdq.config import QuantSpec, TDQConfig
from tdq.quant.backends import X86Int8Module, backend_info, get_cpu_capability, to_backend
from tdq.quant.backends import x86 as x86_mod
from tdq.quant.backends.capability import isa_limits
from tdq.quant.modules import QUANT_MODULES
from tdq.quant.quantizers import TimestepContext
from tdq.testing import denoiser_inputs, tiny_unet2d

CAP = get_cpu_capability()
needs_x86 = pytest.mark.skipif(not CAP["onednn_int8"], reason="PyTorch without oneDNN int8 kernels")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "TDQ_X86_CHANNELS_LAST")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(x86_mod, "KEEP_CHANNELS_LAST", None)
    return monkeypatch


@pytest.mark.parametrize(
    "env, vnni, amx",
    [
        ({}, True, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, False),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}, True, False),
        ({"DNNL_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True, True),
        ({"ONEDNN_MAX_CPU_ISA": "NO_SUCH_ISA"}, False, False),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, False, False),
        ({"ATEN_CPU_CAPABILITY": "avx512"}, True, True),
        ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX2"}, False, False),
    ],
)
def test_isa_limits_from_environment(env, vnni, amx):
    lim = isa_limits(env)
    assert (lim["vnni_allowed"], lim["amx_allowed"]) == (vnni, amx)


def test_capability_honours_env_limits(clean_env):
    raw = get_cpu_capability()
    clean_env.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cap = get_cpu_capability()
    assert not cap["avx512_vnni"] and not cap["amx_int8"]
    assert cap["isa"] == ("avx2" if cap["avx2"] else "none")
    assert cap["onednn_max_cpu_isa"] == "AVX2"
    # the CPU's own flags are still recorded
    assert (cap["cpuinfo_amx_int8"], cap["cpuinfo_avx512_vnni"]) == (
        raw["cpuinfo_amx_int8"],
        raw["cpuinfo_avx512_vnni"],
    )


def test_capability_in_an_avx2_emulating_process():
    # a fresh process, as `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python ...` runs the AVX2 benchmark
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = "import json; from tdq.quant.backends import get_cpu_capability as g; print(json.dumps(g()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cap = json.loads(out.stdout.strip().splitlines()[-1])
    assert cap["torch_cpu_capability"] == "AVX2"
    assert not cap["avx512_vnni"] and not cap["amx_int8"] and cap["isa"] in ("avx2", "none")


def test_conv_output_layout_by_capability_and_overrides(clean_env):
    amx = dict(CAP, amx_int8=True, avx512_vnni=True, isa="amx")
    vnni = dict(CAP, amx_int8=False, avx512_vnni=True, isa="avx512_vnni")
    avx2 = dict(CAP, amx_int8=False, avx512_vnni=False, isa="avx2")
    assert x86_mod.conv_output_layout(amx)[0] is True
    assert x86_mod.conv_output_layout(vnni)[0] is True
    assert x86_mod.conv_output_layout(avx2)[0] is True  # measured faster in an AVX2 emulation too
    clean_env.setattr(x86_mod, "KEEP_CHANNELS_LAST", False)
    assert x86_mod.conv_output_layout(amx)[0] is False
    assert x86_mod.conv_output_layout(avx2)[0] is False
    clean_env.setenv("TDQ_X86_CHANNELS_LAST", "1")
    assert x86_mod.conv_output_layout(vnni) == (True, "TDQ_X86_CHANNELS_LAST=1")
    clean_env.setenv("TDQ_X86_CHANNELS_LAST", "yes")
    with pytest.raises(ValueError, match="TDQ_X86_CHANNELS_LAST"):
        x86_mod.conv_output_layout(vnni)


def _conv_layer(seed=0):
    torch.manual_seed(seed)
    ctx = TimestepContext(2)
    ctx.active = True
    q = QUANT_MODULES[nn.Conv2d].from_float(
        nn.Conv2d(16, 24, 3, padding=1),
        "conv",
        QuantSpec(bits=8, granularity="per_channel", symmetric=True),
        QuantSpec(bits=8, granularity="per_tensor", symmetric=False),
        ctx,
    )
    q.act_quantizer.start_observing()
    for k in range(2):
        ctx.set(k)
        q(torch.randn(2, 16, 8, 8) * (k + 1) + 0.3)
    q.act_quantizer.finish_observing()
    return q, ctx


@needs_x86
@pytest.mark.parametrize("cl_input", [False, True], ids=["nchw_in", "nhwc_in"])
def test_channels_last_conv_output_equals_simulator(cl_input):
    q, ctx = _conv_layer()
    real = X86Int8Module(q, keep_channels_last=True)
    x = torch.randn(3, 16, 8, 8) + 0.3
    if cl_input:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for k in range(2):
            ctx.set(k)
            out, ref = real(x), q(x)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        restored = X86Int8Module(q)(x)
        fmt = torch.channels_last if cl_input else torch.contiguous_format
        assert restored.is_contiguous(memory_format=fmt)


def _calibrated_tiny(attention=False):
    model = tdq.quantize_(tiny_unet2d(), TDQConfig(attention=attention))
    torch.manual_seed(0)
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    return model


@needs_x86
def test_avx2_limits_pick_no_vnni_or_amx_path(clean_env):
    clean_env.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    model = to_backend(_calibrated_tiny(attention=True), "x86")
    info = backend_info(model)
    assert info["capability"]["isa"] in ("avx2", "none")
    assert info["choices"]["attention"] == "simulate"
    assert info["choices"]["conv_output"].startswith("channels-last kept: AVX2")
    assert {r["kernel"] for r in info["attention"].values()} == {"simulate"}


@needs_x86
def test_amx_capability_keeps_channels_last_in_a_model(clean_env):
    import tdq.quant.backends as B

    amx = dict(CAP, amx_int8=True, avx512_vnni=True, isa="amx")
    clean_env.setattr(B, "get_cpu_capability", lambda: amx)
    model = _calibrated_tiny()
    inp = denoiser_inputs(model, batch=2, t=480.0)
    to_backend(model, "x86")
    info = backend_info(model)
    assert info["choices"]["conv_output"].startswith("channels-last kept")
    convs = [m for m in model.modules() if isinstance(m, X86Int8Module) and m.is_conv]
    assert convs and all(m.keep_channels_last for m in convs)
    seen = []
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**inp).sample
    assert torch.isfinite(out).all()
    # the whole model runs channels-last (no NCHW residual stream); the caller gets the standard layout back
    assert seen and all(t.is_contiguous(memory_format=torch.channels_last) for t in seen if t.dim() == 4)
    assert out.is_contiguous()
    assert inp["sample"].is_contiguous()  # the caller's input is not changed in place
    assert all(type(m) is not nn.GroupNorm for m in model.modules())  # all made accurate on channels-last


@needs_x86
def test_channels_last_model_returns_nchw_outputs(clean_env):
    # 3 output channels: a channels-last output is not also NCHW-contiguous (as a 1-channel one is)
    clean_env.setattr(x86_mod, "KEEP_CHANNELS_LAST", True)
    model = tdq.quantize_(tiny_unet2d(in_channels=3, out_channels=3), TDQConfig())
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    to_backend(model, "x86")
    inp = denoiser_inputs(model, batch=2, t=480.0)
    with torch.no_grad():
        out = model(**inp)
        tup = model(**inp, return_dict=False)
    assert out.sample.is_contiguous() and out["sample"].is_contiguous()
    assert tup[0].is_contiguous()
    assert torch.equal(out.sample, tup[0])


@needs_x86
def test_channels_last_model_equals_nchw_model(clean_env):
    torch.manual_seed(3)
    model = _calibrated_tiny()
    inp = denoiser_inputs(model, batch=2, t=480.0)
    outs = {}
    for keep in (False, True):
        clean_env.setattr(x86_mod, "KEEP_CHANNELS_LAST", keep)
        m = to_backend(copy.deepcopy(model), "x86")
        assert bool(getattr(m, "_tdq_channels_last_hooks", None)) == keep
        with torch.no_grad():
            outs[keep] = m(**inp).sample
            ref = model(**inp).sample
        # one call of a quantized model: a last-bit difference may flip an activation code, so compare as PSNR
        err = float((outs[keep] - ref).pow(2).mean()) / float(ref.pow(2).mean())
        print("layout", "channels-last" if keep else "NCHW", "relative MSE vs simulator", err)
        assert err < 1e-3  # >= 30 dB; exact-sum differences flip a few codes (1e-13 .. 2e-4 seen)
    # hooks run once per model: converting a channels-last model's deep copy keeps one pair
    assert len(m._forward_pre_hooks) == 1
    x86_mod.run_channels_last(m)
    assert len(m._forward_pre_hooks) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.flatten(2).transpose(1, 2),
        lambda x: x.permute(3, 1, 0, 2),
    ],
    ids=["contiguous", "channels_last", "transposed", "permuted"],
)
def test_dense_flat_quantizers_equal_reference_in_any_dense_layout(make):
    from tdq.quant import functional as F

    torch.manual_seed(0)
    x = make(torch.randn(3, 8, 5, 5) * 2)
    flat = F.dense_flat(x)
    assert flat is not None and flat.data_ptr() == x.data_ptr() and flat.numel() == x.numel()
    assert torch.equal(F.restride(flat, x), x)
    out = F.fake_quantize_per_tensor(x, 0.03, 128, 0, 255)
    assert out.stride() == x.stride()
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, 0.03, 128, 0, 255))
    codes = x86_mod.quantize_u8(x, 0.03, 1 / 0.03, 128, 0, 255)
    assert codes.stride() == x.stride()
    ref = torch.fake_quantize_per_tensor_affine(x, 0.03, 128, 0, 255) / 0.03 + 128
    assert torch.equal(codes.float(), ref.round())


@pytest.mark.parametrize("groups", [8, 32], ids=["8_per_group", "2_per_group"])
@pytest.mark.parametrize("offset", [0.0, 3.0, 30.0])
def test_channels_last_group_norm_is_as_accurate_as_nchw(offset, groups):
    torch.manual_seed(0)
    gn = nn.GroupNorm(groups, 64)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(4, 64, 12, 12) + offset
    ref = nn.functional.group_norm(x.double(), groups, gn.weight.double(), gn.bias.double(), gn.eps)
    cl_gn = copy.deepcopy(gn)
    cl_gn.__class__ = x86_mod.ChannelsLastGroupNorm
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = cl_gn(xc)
        nchw_err = float((gn(x).double() - ref).abs().max())
        torch_cl_err = float((gn(xc).double() - ref).abs().max())
    err = float((out.double() - ref).abs().max())
    print(
        f"offset {offset}: max error ours {err:.2e}, NCHW kernel {nchw_err:.2e}, channels-last kernel {torch_cl_err:.2e}"
    )
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert err <= 4 * max(nchw_err, 1e-6)
    assert torch.equal(cl_gn(x), gn(x))  # NCHW inputs: nn.GroupNorm as is
    assert cl_gn.state_dict().keys() == gn.state_dict().keys()


def test_dense_flat_refuses_non_dense_views():
    from tdq.quant import functional as F

    x = torch.randn(4, 6, 5)
    assert F.dense_flat(x[:, ::2]) is None
    assert F.dense_flat(x[:, :3]) is None
    assert F.dense_flat(x.expand(2, 4, 6, 5)) is None
    sl = x[:, :3]  # the quantizers still work on it (through a copy)
    assert torch.equal(
        F.fake_quantize_per_tensor(sl, 0.03, 0, -127, 127),
        torch.fake_quantize_per_tensor_affine(sl, 0.03, 0, -127, 127),
    )


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_fast_fake_quant_is_bit_exact(symmetric, bits):
    from tdq.quant import functional as F

    qmin, qmax = (int(v) for v in F.qrange(torch.tensor(bits), symmetric))
    scale, zp = 0.037, (0 if symmetric else (qmax + 1) // 3)
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    # exact rounding ties (k + 0.5) * scale and values far outside the range
    x.view(-1)[:64] = (torch.arange(-32, 32) + 0.5) * scale
    x.view(-1)[64:68] = torch.tensor([1e6, -1e6, 0.0, -0.0])
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    assert torch.equal(F.fake_quantize_per_tensor(x, scale, zp, qmin, qmax), ref)


@pytest.mark.parametrize("pack4", [False, True])
@pytest.mark.parametrize("symmetric", [False, True], ids=["affine_act", "symmetric_act"])
def test_weight_only_fast_path_equals_simulator(pack4, symmetric):
    from tdq.quant.backends import WeightOnlyModule

    q, ctx = _conv_layer()
    if symmetric:
        q.act_quantizer.spec.symmetric = True
        q.act_quantizer._params = None
        q.act_quantizer.start_observing()
        for k in range(2):
            ctx.set(k)
            q(torch.randn(2, 16, 8, 8) * (k + 1))
        q.act_quantizer.finish_observing()
    if pack4:
        q.set_bits(weight_bits=4)
    wo = WeightOnlyModule(q, pack4=pack4)
    x = torch.randn(3, 16, 8, 8) + 0.3
    x[0, 0, 0, 0] = float("nan")  # non-finite inputs pass through as in the simulator
    with torch.no_grad():
        for k in range(2):
            ctx.set(k)
            assert torch.equal(wo(x).nan_to_num(7.0), q(x).nan_to_num(7.0))
        q.set_bits(act_bits=torch.tensor([4, 16]))  # a lower and a 16-bit bucket
        for k in range(2):
            ctx.set(k)
            assert torch.equal(wo(x).nan_to_num(7.0), q(x).nan_to_num(7.0))
        ctx.set(None, torch.tensor([1, 0, 1]))  # mixed buckets: per-sample split
        assert torch.equal(wo(x).nan_to_num(7.0), q(x).nan_to_num(7.0))
