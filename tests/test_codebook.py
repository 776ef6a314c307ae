"""Non-uniform weight levels (`weight.levels` log2 / kmeans): fit, codes, GPTQ, saved state, LUT backend, config."""

import json

import pytest
import torch
from torch import nn

import tdq
from tdq.config import ConfigError, QuantSpec, TDQConfig, WeightRounding
from tdq.quant import codebook as CB
from tdq.quant import functional as F
from tdq.quant.backends import WeightOnlyModule, backend_info, get_cpu_capability, resident_bytes, to_backend
from tdq.quant.modules import QuantLinear
from tdq.quant.quantizers import TimestepContext, WeightQuantizer
from tdq.rounding import calibrate_with_rounding, gptq_layer_
from tdq.serialization import STATE_FILE, SavedQuantizationError, load_quantization, save_quantization
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d
from tdq.utils.io import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3


def _weights(kind: str, out: int = 32, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":
        return torch.randn(out, cols, generator=g) * 0.05
    # heavy-tailed: Student-t with 3 degrees of freedom
    z = torch.randn(out, cols, generator=g)
    chi = sum(torch.randn(out, cols, generator=g) ** 2 for _ in range(3)) / 3
    return 0.05 * z / chi.sqrt()


def _wq(levels: str, w: torch.Tensor, bits: int = 4, observer: str = "mse", gran: str = "per_channel"):
    return WeightQuantizer(QuantSpec(bits=bits, granularity=gran, observer=observer, levels=levels), w)


@pytest.mark.parametrize("kind, ratio", [("gaussian", 0.95), ("heavy_tailed", 0.8)])
def test_kmeans_mse_not_above_uniform_at_4_bits(kind, ratio):
    w = _weights(kind)
    err = {lv: float((_wq(lv, w)(w) - w).pow(2).mean()) for lv in ("uniform", "kmeans")}
    assert err["kmeans"] <= err["uniform"]
    # the fit is a real one: clearly better than the (MSE-clipped) uniform grid on these distributions
    assert err["kmeans"] < ratio * err["uniform"]


def test_log2_levels_are_signed_powers_of_two_times_scale_and_zero():
    w = _weights("heavy_tailed")
    wq = _wq("log2", w, observer="minmax")
    cb = wq.codebook
    assert cb.shape == (w.shape[0], 16)
    scale = w.abs().amax(1, keepdim=True)
    nz = cb != 0
    ratio = (cb.abs() / scale)[nz]
    e = torch.log2(ratio)
    assert torch.equal(e, e.round()) and float(e.max()) == 0.0 and float(e.min()) >= -6
    assert int((~nz).sum(1).min()) == 2  # zero is a level (twice: +0 and -0 exponent codes)
    assert torch.equal(torch.sign(cb[:, :8]), -torch.ones(w.shape[0], 8) * nz[:, :8])
    # every fake-quantized value is a level of its row
    fq = wq(w)
    assert all(bool(torch.isin(fq[r], cb[r]).all()) for r in range(w.shape[0]))


@pytest.mark.parametrize("levels", ["log2", "kmeans"])
@pytest.mark.parametrize("gran", ["per_channel", "per_tensor", "per_group"])
def test_codes_in_range_sorted_finite_and_deterministic(levels, gran):
    w = _weights("gaussian", cols=96)
    w[0, 0] = float("nan")
    w[1, 1] = float("inf")
    a, b = _wq(levels, w, bits=3, gran=gran), _wq(levels, w, bits=3, gran=gran)
    assert torch.equal(a.codebook, b.codebook)  # deterministic fit
    assert CB.check_codebook(a.codebook, a.codebook.shape[0], 3, "cb") == ""
    codes = a.int_codes(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    fq = a(w)
    assert bool(torch.isfinite(fq).all())  # no NaN/inf leaves the quantizer
    deq = F.restore_from_granularity(a.dequantize_codes(codes, torch.float32), w.shape, gran)
    assert torch.equal(deq, fq)


def test_set_bits_refits_the_codebook():
    torch.manual_seed(0)
    m = QuantLinear.from_float(
        nn.Linear(32, 8),
        "lin",
        QuantSpec(bits=4, granularity="per_channel", levels="kmeans"),
        QuantSpec(),
        TimestepContext(1),
    )
    with torch.no_grad():
        err4 = float((m.quantized_weight() - m.weight).pow(2).sum())
        m.set_bits(weight_bits=3)
        assert m.weight_quantizer.codebook.shape == (8, 8)
        assert float((m.quantized_weight() - m.weight).pow(2).sum()) > err4
    with pytest.raises(ValueError, match="needs the weight"):
        m.weight_quantizer.set_bits(2)


@pytest.mark.parametrize("levels", ["log2", "kmeans"])
def test_gptq_onto_codebook_lowers_output_error(levels):
    torch.manual_seed(1)
    m = QuantLinear.from_float(
        nn.Linear(64, 24),
        "lin",
        QuantSpec(bits=4, granularity="per_channel", observer="mse", levels=levels),
        QuantSpec(bits=8, symmetric=False),
        TimestepContext(1),
    )
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8
    x = (torch.randn(512, 64, generator=g) * torch.logspace(0, 1.5, 64)) @ mix + 0.3
    rep = gptq_layer_(m, x.double().T @ x.double(), act_order=True)
    assert rep["method"].startswith("gptq")
    assert rep["rel_output_error"] < 0.8 * rep["rel_output_error_nearest"]
    w = m.weight.detach()
    assert torch.equal(m.weight_quantizer(w), w)  # the weight sits on its codebook levels


def _run(model, seeds=(0, 1), ts=(950.0, 600.0, 200.0, 10.0)):
    def run():
        with torch.no_grad():
            for s in seeds:
                for t in ts:
                    model(**denoiser_inputs(model, batch=2, t=t, generator=torch.Generator().manual_seed(s)))

    return run


def _model(levels="kmeans", method="nearest"):
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse", levels=levels),
        weight_rounding=WeightRounding(method=method, act_order=True),
        grid=tdq.TimestepGrid(num_buckets=K),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    calibrate_with_rounding(model, _run(model))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    model = _model("kmeans", "gptq")
    with torch.no_grad():
        out = output_tensor(model(**denoiser_inputs(model, t=333.0)))
    d = save_quantization(model, tmp_path_factory.mktemp("state") / "s")
    return model, out, d


def test_reload_bit_exact_and_codes_stored_as_indices(saved):
    model, out, d = saved
    from safetensors.torch import load_file

    t = load_file(str(d / STATE_FILE))
    assert t["conv_in.weight_codes"].dtype == torch.uint8
    assert t["conv_in.weight_quantizer.codebook"].shape == (model.conv_in.weight.shape[0], 16)
    fresh = load_quantization(tiny_unet2d(), d)
    for (n, a), (_, b) in zip(tdq.iter_quant_layers(model), tdq.iter_quant_layers(fresh), strict=True):
        assert torch.equal(a.weight, b.weight), n
        assert torch.equal(a.weight_quantizer.codebook, b.weight_quantizer.codebook), n
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**denoiser_inputs(fresh, t=333.0))), out)


def _corrupt(d, key, fn, tmp_path):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / STATE_FILE))
    t[key] = fn(t[key])
    dst = tmp_path / "bad"
    dst.mkdir()
    save_file(t, str(dst / STATE_FILE), metadata={"format": "tdq-quant-state", "schema_version": "1"})
    side = json.loads((d / "tdq_config.json").read_text())
    side["state_file"] = STATE_FILE
    side["state_sha256"] = sha256_file(dst / STATE_FILE)
    (dst / "tdq_config.json").write_text(json.dumps(side))
    return dst


def _nan(t):
    t = t.clone()
    t[0, 3] = float("nan")
    return t


def _unsorted(t):
    t = t.clone()
    t[1] = t[1].flip(0)
    return t


CORRUPTIONS = {
    "nan": ("conv_in.weight_quantizer.codebook", _nan, "NaN/inf"),
    "unsorted": ("conv_in.weight_quantizer.codebook", _unsorted, "not sorted"),
    "shape": ("conv_in.weight_quantizer.codebook", lambda t: t[:, :8].contiguous(), "shape"),
    "dtype": ("conv_in.weight_quantizer.codebook", lambda t: t.double(), "dtype"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_codebook_refused_naming_the_tensor(saved, tmp_path, case):
    _, _, d = saved
    key, fn, match = CORRUPTIONS[case]
    bad = _corrupt(d, key, fn, tmp_path)
    with pytest.raises(SavedQuantizationError, match=match) as e:
        load_quantization(tiny_unet2d(), bad)
    assert key in str(e.value)


@pytest.fixture(scope="module")
def saved_log2(tmp_path_factory):
    # 3-bit log2 codebook: indices 0..7, stored packed two per byte (a nibble can hold up to 15)
    torch.set_num_threads(1)
    cfg = TDQConfig(
        weight=QuantSpec(bits=3, granularity="per_channel", observer="mse", levels="log2"),
        grid=tdq.TimestepGrid(num_buckets=K),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    calibrate_with_rounding(model, _run(model, seeds=(0,)))
    x = denoiser_inputs(model, t=500.0)
    with torch.no_grad():
        ref = output_tensor(model(**x))
    return save_quantization(model, tmp_path_factory.mktemp("log2") / "s"), x, ref, resident_bytes(model)


def test_codes_out_of_range_refused(saved_log2, tmp_path):
    d = saved_log2[0]
    bad = _corrupt(d, "conv_in.weight_codes", lambda t: t | 0x0F, tmp_path)
    with pytest.raises(SavedQuantizationError, match=r"'conv_in.weight_codes' hold index 15"):
        load_quantization(tiny_unet2d(), bad)


@pytest.mark.parametrize("backend", ["weight_only_int4", "x86"])
def test_lut_backend_equals_simulator_with_small_resident_bytes(saved_log2, backend):
    if backend == "x86" and not get_cpu_capability()["onednn_int8"]:
        pytest.skip("PyTorch without oneDNN int8 kernels")
    d, x, ref, before = saved_log2
    model = load_quantization(tiny_unet2d(), d)
    to_backend(model, backend)
    info = backend_info(model)
    assert info["kernels"] == {"lut_dequant_int4+float": len(info["layers"])}
    for rec in info["layers"].values():
        assert rec["storage"] == "int4_packed+codebook"
        if backend == "x86":  # the int8 kernels cannot run codebook levels: the reason is recorded
            assert "non-uniform weight levels (log2 codebook)" in rec["reason"]
    assert all(isinstance(m, WeightOnlyModule) for _, m in tdq.iter_quant_layers(model))
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**x)), ref)
    assert info["resident_bytes"] < 0.5 * before


def test_lut_layer_equals_simulator_and_holds_only_codes():
    torch.manual_seed(0)
    ctx = TimestepContext(1)
    ctx.active = True
    q = QuantLinear.from_float(
        nn.Linear(64, 16),
        "lin",
        QuantSpec(bits=4, granularity="per_channel", levels="kmeans"),
        QuantSpec(bits=8, symmetric=False),
        ctx,
    )
    q.act_quantizer.start_observing()
    ctx.set(0)
    q(torch.randn(8, 64))
    q.act_quantizer.finish_observing()
    real = WeightOnlyModule(q, pack4=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(real(x), q(x))
    assert real.weight_codes.dtype == torch.uint8 and real.weight_codes.numel() == 16 * 64 // 2
    assert not any(p.numel() == 16 * 64 and p.is_floating_point() for p in real.buffers())


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(weight=QuantSpec(levels="lloyd")), r"weight\.levels='lloyd'"),
        (dict(activation=QuantSpec(levels="kmeans", symmetric=False)), r"activation\.levels='kmeans'"),
        (
            dict(weight=QuantSpec(levels="log2"), weight_rounding=WeightRounding(method="adaround")),
            r"weight\.levels='log2'",
        ),
        (dict(weight=QuantSpec(levels="kmeans", rounding="stochastic")), r"weight\.rounding='stochastic'"),
        (dict(overrides={"conv_in": {"activation": {"levels": "log2"}}}), r"activation\.levels='log2'"),
    ],
)
def test_bad_levels_field_named(cfg, match):
    with pytest.raises(ConfigError, match=match):
        TDQConfig(**cfg).validate()
