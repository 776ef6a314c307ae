"""tdq.rounding.adaround: learned rounding ends binary and beats round-to-nearest; the model path runs end to end."""

import pytest
import torch
from test_rounding import _correlated_inputs as _inputs
from torch import nn

import tdq
from tdq.config import QuantSpec, TDQConfig, WeightRounding
from tdq.quant import functional as F
from tdq.quant.modules import QuantLinear
from tdq.quant.quantizers import TimestepContext
from tdq.rounding import PairedStats, adaround_layer_, calibrate_with_rounding
from tdq.rounding.gptq import column_grid, nearest_codes
from tdq.testing import denoiser_inputs, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("act_bits", [16, 6])
def test_adaround_variables_end_binary_and_error_below_nearest(act_bits):
    torch.manual_seed(1)
    spec = QuantSpec(bits=4, granularity="per_channel")
    m = QuantLinear.from_float(nn.Linear(64, 24), "lin", spec, QuantSpec(bits=8), TimestepContext(1))
    w_fp = m.weight.detach().clone()
    x = _inputs(512, 64)
    # the quantized layer's input: the FP input through an activation quantizer (in the loop)
    if act_bits < 16:
        sc, zp = F.scale_zero_point(x.min(), x.max(), act_bits, False)
        xq = F.fake_quantize(x, sc, zp, *F.qrange(act_bits, False))
    else:
        xq = x
    xd, xqd = x.double(), xq.double()
    st = PairedStats(hqq=xqd.T @ xqd, hfq=xd.T @ xqd, hff=xd.T @ xd, count=x.shape[0])

    def err(w_q):  # summed squared output error against the FP layer on the calibration inputs
        return float(((xq @ w_q.T - x @ w_fp.T).double() ** 2).sum())

    s, z = column_grid(m.weight_quantizer, 24, 64)
    w_rtn = (nearest_codes(w_fp, s, z, *m.weight_quantizer.qrange()) - z) * s
    rep = adaround_layer_(m, w_fp, st, iters=400)
    w_q = m.weight.detach()
    # the rounding variables ended (almost all) binary, and the weight is on the quantizer's grid
    assert rep["binary_fraction"] > 0.99, rep
    assert rep["method"] == "adaround"
    with torch.no_grad():
        assert torch.equal(m.weight_quantizer(w_q), w_q)
    # each weight moved to the grid point below or above its FP value, never further
    step = (w_q - w_fp).abs() / s
    assert float(step.max()) < 1.0 + 1e-4
    assert err(w_q) < 0.6 * err(w_rtn), (err(w_q), err(w_rtn))
    # the report's relative errors agree with the direct computation
    energy = float(((x @ w_fp.T).double() ** 2).sum())
    assert rep["rel_output_error"] == pytest.approx(err(w_q) / energy, rel=1e-3)


def test_adaround_model_path_runs_and_leaves_weights_on_grid():
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        weight_rounding=WeightRounding(method="adaround", adaround_iters=60, corrections=["bias"]),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    w_fp = {n: m.weight.detach().clone() for n, m in tdq.iter_quant_layers(model)}

    def run():
        with torch.no_grad():
            for t in (950.0, 700.0, 400.0, 10.0):
                model(**denoiser_inputs(model, batch=2, t=t, generator=torch.Generator().manual_seed(0)))

    rep = calibrate_with_rounding(model, run)
    ada = rep["adaround"]
    assert ada["layers"] and all(
        e["rel_output_error"] <= e["rel_output_error_start"] for e in ada["layers"].values()
    )
    assert sum(e["method"] == "adaround" for e in ada["layers"].values()) >= len(ada["layers"]) // 2
    moved = 0
    for name, m in tdq.iter_quant_layers(model):
        w = m.weight.detach()
        assert torch.equal(m.weight_quantizer(w), w), name
        moved += int(not torch.equal(m.weight_quantizer(w_fp[name]), w))
    assert moved > 0
    assert "bias_correction_max_abs" in ada


def _tiny_run(model, ts=(950.0, 700.0, 400.0, 10.0)):
    def run():
        with torch.no_grad():
            for t in ts:
                model(**denoiser_inputs(model, batch=2, t=t, generator=torch.Generator().manual_seed(0)))

    return run


def test_rounded_and_corrected_state_reloads_bit_exact_and_runs_on_x86(tmp_path):
    from tdq.quant.backends import backend_info, get_cpu_capability, to_backend
    from tdq.rounding.corrections import get_output_correction
    from tdq.serialization import load_quantization, save_quantization
    from tdq.testing import output_tensor

    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        # AdaRound from GPTQ codes: both roundings' codes go through the saved state
        weight_rounding=WeightRounding(
            method="adaround", adaround_init="gptq", corrections=["bias", "ptqd"], adaround_iters=40
        ),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    calibrate_with_rounding(model, _tiny_run(model))
    corr = get_output_correction(model)
    assert corr is not None
    biased = {n: m.bucket_bias.clone() for n, m in tdq.iter_quant_layers(model) if hasattr(m, "bucket_bias")}
    assert biased
    inp = denoiser_inputs(model, t=700.0)
    with torch.no_grad():
        ref = output_tensor(model(**inp))
    directory = save_quantization(model, tmp_path / "state")
    fresh = load_quantization(tiny_unet2d(), directory)
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**inp)), ref)
    loaded = get_output_correction(fresh)
    assert torch.equal(loaded.gain, corr.gain) and torch.equal(loaded.bias, corr.bias)
    for name, m in tdq.iter_quant_layers(fresh):
        assert torch.equal(m.bucket_bias, biased[name]) if name in biased else not hasattr(m, "bucket_bias")
    # the corrections matter: without them the reloaded model's output differs
    loaded.remove()
    with torch.no_grad():
        assert not torch.equal(output_tensor(fresh(**inp)), ref)
    if not get_cpu_capability()["onednn_int8"]:
        pytest.skip("PyTorch without oneDNN int8 kernels")
    # the integer backend after loading keeps both corrections (layer hooks move to the real modules)
    for real in (
        to_backend(load_quantization(tiny_unet2d(), directory), "x86"),
        load_quantization(tiny_unet2d(), directory, backend="x86"),
    ):
        assert backend_info(real)["backend"] == "x86"
        with torch.no_grad():
            out = output_tensor(real(**inp))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_smoothed_stats_are_the_moments_of_the_smoothed_inputs(kind):
    from tdq.quant.modules import QuantConv2d
    from tdq.rounding import layer_input_rows
    from tdq.rounding.calib_stats import LayerStats, smoothed_stats

    torch.manual_seed(0)
    ctx = TimestepContext(2)
    spec = QuantSpec(bits=4, granularity="per_channel")
    if kind == "linear":
        m = QuantLinear.from_float(nn.Linear(6, 5), "l", spec, QuantSpec(bits=8), ctx)
        x = torch.randn(7, 6)
    else:
        m = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), "c", spec, QuantSpec(bits=8), ctx)
        x = torch.randn(2, 3, 5, 5)
    rows = layer_input_rows(m, x).double()
    st = LayerStats(
        hessian=rows.T @ rows,
        count=rows.shape[0],
        bucket_sum=torch.stack([rows.sum(0), rows.sum(0) * 0]),
        bucket_count=torch.tensor([rows.shape[0], 0]),
    )
    assert smoothed_stats(st, m) is st  # not smoothed: unchanged
    m.set_act_smooth(torch.tensor([0.5, 2.0, 4.0, 1.0, 0.25, 3.0][: x.shape[1]]))
    srows = layer_input_rows(m, m.smooth_input(x)).double()
    sst = smoothed_stats(st, m)
    torch.testing.assert_close(sst.hessian, srows.T @ srows)
    torch.testing.assert_close(sst.bucket_sum[0], srows.sum(0))
    # the smoothed weight times the smoothed rows is the float layer
    torch.testing.assert_close(srows @ m.weight.detach().reshape(4 if kind == "conv" else 5, -1).double().T,
                               rows @ m._float_weight.reshape(4 if kind == "conv" else 5, -1).double().T)  # fmt: skip


def test_smooth_first_rounds_the_smoothed_weights_on_their_grid():
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        weight_rounding=WeightRounding(method="gptq", smooth_first=True),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    ref = tiny_unet2d()
    rep = calibrate_with_rounding(model, _tiny_run(model))
    assert rep["smooth_first"] and rep["methods_count"].get("gptq", 0) > 0
    smoothed = [n for n, m in tdq.iter_quant_layers(model) if m._buffers.get("act_smooth") is not None]
    assert smoothed  # the outlier handling chose smoothing although the rounding is GPTQ
    for name, m in tdq.iter_quant_layers(model):
        w = m.weight.detach()
        assert torch.equal(m.weight_quantizer(w), w), name  # GPTQ codes survived the recalibration
    assert all(rep["layers"][n]["method"] == "gptq" for n in smoothed)
    # a smoothed layer keeps its float weight (its float path) while the smoothed weight holds the GPTQ codes
    ref_w = dict(ref.named_parameters())
    for n in smoothed:
        m = model.get_submodule(n)
        assert torch.equal(m._float_weight, ref_w[n + ".weight"].detach())
