"""tdq.rounding: GPTQ, clipping search, input statistics, config validation, and bit-exact saved states."""

import pytest
import torch
from torch import nn

import tdq
from tdq.config import ConfigError, QuantSpec, TDQConfig, WeightRounding
from tdq.quant.modules import QuantConv2d, QuantLinear
from tdq.quant.quantizers import TimestepContext
from tdq.rounding import (
    apply_weight_rounding,
    calibrate_with_rounding,
    collect_layer_stats,
    gptq_layer_,
    layer_input_rows,
    search_clipping_,
)
from tdq.serialization import load_quantization, save_quantization
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(0, 1.5, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) * scales) @ mix + 0.3


def _quant_linear(spec: QuantSpec, out: int = 24, d: int = 64, seed: int = 1) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(d, out)
    return QuantLinear.from_float(lin, "lin", spec, QuantSpec(bits=8, symmetric=False), TimestepContext(1))


def _out_err(m: QuantLinear, w_fp: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        wq = m.weight_quantizer(m.weight.detach())
    return float(((x @ (wq - w_fp).T) ** 2).sum())


SPECS = [
    QuantSpec(bits=4, granularity="per_channel"),
    QuantSpec(bits=4, granularity="per_group", group_size=16, symmetric=False),
    QuantSpec(bits=3, granularity="per_tensor"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.granularity}-{s.bits}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_nearest_and_on_grid(spec, act_order):
    m = _quant_linear(spec)
    x = _correlated_inputs(512, 64)
    w_fp = m.weight.detach().clone()
    err_nearest = _out_err(m, w_fp, x)
    rep = gptq_layer_(m, x.double().T @ x.double(), act_order=act_order)
    err_gptq = _out_err(m, w_fp, x)
    assert rep["method"] == "gptq"
    assert err_gptq < 0.8 * err_nearest
    # the weight is exactly on the quantizer's grid: fake quantization is the identity on it
    with torch.no_grad():
        assert torch.equal(m.weight_quantizer(m.weight.detach()), m.weight.detach())
    # and the quantizer's scales were not changed (codes are what moved)
    assert not torch.equal(m.weight.detach(), w_fp)


def test_layer_input_rows_reproduce_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 9, 9)
    rows = layer_input_rows(conv, x)
    y = (rows @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, -1, 5).permute(0, 2, 1)
    assert torch.allclose(y.reshape(2, 5, 5, 5), conv(x), atol=1e-5)


@pytest.mark.parametrize("objective", ["output_mse", "weight_mse"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_clipping_search_error_not_above_minmax(objective, granularity):
    spec = QuantSpec(bits=4, granularity=granularity, group_size=16, observer="minmax")
    m = _quant_linear(spec)
    with torch.no_grad():
        m.weight[:, 3] *= 6.0  # outliers: min-max wastes the grid on them
    m.weight_quantizer.calibrate_(m.weight)
    x = _correlated_inputs(512, 64)
    h = x.double().T @ x.double()
    w_fp = m.weight.detach().clone()
    err_minmax = _out_err(m, w_fp, x) if objective == "output_mse" else None
    wmse_minmax = float((m.weight_quantizer(w_fp) - w_fp).pow(2).sum())
    rep = search_clipping_(m, h.float(), objective=objective)
    if objective == "output_mse":
        assert _out_err(m, w_fp, x) < err_minmax
    else:
        assert float((m.weight_quantizer(w_fp) - w_fp).pow(2).sum()) < wmse_minmax
    assert rep["error"] < rep["error_minmax"]
    assert rep["mean_ratio"] < 1.0


def _run(model, seeds=(0, 1), ts=(950.0, 700.0, 400.0, 120.0, 10.0)):
    def run():
        with torch.no_grad():
            for s in seeds:
                for t in ts:
                    model(**denoiser_inputs(model, batch=2, t=t, generator=torch.Generator().manual_seed(s)))

    return run


def _w4(method="gptq", **kw):
    return TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        weight_rounding=WeightRounding(method=method, **kw),
        grid=tdq.TimestepGrid(num_buckets=4),
    )


def test_collect_stats_from_fp_model_per_bucket():
    model = tdq.quantize_(tiny_unet2d(), _w4())
    stats = collect_layer_stats(model, _run(model))
    st = stats["conv_in"]
    assert st.calls_per_bucket == [4, 2, 2, 2]  # t=10, 120 | 400 | 700 | 950 over 4 buckets of [0, 999]
    assert int(st.bucket_count.sum()) == st.count
    # H equals the sum over the FP model's inputs (the hook saw floating-point activations)
    x = denoiser_inputs(model, batch=2, t=950.0, generator=torch.Generator().manual_seed(0))["sample"]
    one = collect_layer_stats(
        model, lambda: model(**denoiser_inputs(model, 2, 950.0, torch.Generator().manual_seed(0)))
    )
    rows = layer_input_rows(model.conv_in, x).double()
    assert torch.allclose(one["conv_in"].hessian, rows.T @ rows)


def test_gptq_model_saves_and_reloads_bit_exact(tmp_path):
    model = tdq.quantize_(tiny_unet2d(), _w4("gptq", act_order=True))
    w_fp = {n: m.weight.detach().clone() for n, m in tdq.iter_quant_layers(model)}
    report = calibrate_with_rounding(model, _run(model))
    assert report["methods_count"].get("gptq", 0) >= len(w_fp) // 2
    moved = 0
    for name, m in tdq.iter_quant_layers(model):
        w = m.weight.detach()
        assert torch.equal(m.weight_quantizer(w), w), name
        moved += int(not torch.equal(m.weight_quantizer(w_fp[name]), w))
    assert moved > 0  # GPTQ codes differ from round-to-nearest codes
    out = output_tensor(model(**denoiser_inputs(model, t=333.0)))
    directory = save_quantization(model, tmp_path / "state")
    fresh = load_quantization(tiny_unet2d(), directory)
    for (name, a), (_, b) in zip(tdq.iter_quant_layers(model), tdq.iter_quant_layers(fresh), strict=True):
        assert torch.equal(a.weight, b.weight), name
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**denoiser_inputs(fresh, t=333.0))), out)


def test_rounding_report_and_nearest_needs_no_run():
    model = tdq.quantize_(tiny_unet2d(), _w4("nearest"))
    rep = apply_weight_rounding(model)
    assert set(rep["methods_count"]) == {"nearest"}
    model = tdq.quantize_(tiny_unet2d(), _w4("gptq"))
    with pytest.raises(ValueError, match="needs calibration inputs"):
        apply_weight_rounding(model)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("method", "adaroundz", "weight_rounding.method"),
        ("clip", "p99", "weight_rounding.clip"),
        ("damp", 0.0, "weight_rounding.damp"),
        ("block_size", 0, "weight_rounding.block_size"),
        ("corrections", ["bias", "nope"], "weight_rounding.corrections"),
    ],
)
def test_weight_rounding_validation_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TDQConfig.from_dict({"weight_rounding": {field: value}})
    with pytest.raises(ConfigError, match="weight_rounding: unknown field"):
        TDQConfig.from_dict({"weight_rounding": {"methd": "gptq"}})
    cfg = TDQConfig.from_dict({"weight_rounding": {"method": "gptq", "corrections": ["bias"]}})
    assert TDQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bias_correction_zeroes_mean_error_per_bucket(kind):
    from tdq.rounding.calib_stats import LayerStats
    from tdq.rounding.corrections import fit_bias_correction_

    torch.manual_seed(0)
    ctx = TimestepContext(3)
    wspec, aspec = QuantSpec(bits=3, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)
    if kind == "linear":
        layer = QuantLinear.from_float(nn.Linear(16, 8), "l", wspec, aspec, ctx)
        xs = [torch.randn(32, 16) + k for k in range(3)]
    else:
        layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), "c", wspec, aspec, ctx)
        xs = [torch.randn(4, 3, 6, 6) + k for k in range(3)]
    model = nn.Sequential(layer)
    w_fp = layer.weight.detach().clone()
    rows = [layer_input_rows(layer, x).double() for x in xs]
    d = rows[0].shape[1]
    st = LayerStats(
        hessian=sum(r.T @ r for r in rows),
        count=sum(r.shape[0] for r in rows),
        bucket_sum=torch.stack([r.sum(0) for r in rows]),
        bucket_count=torch.tensor([r.shape[0] for r in rows]),
    )
    assert st.hessian.shape == (d, d)
    layer.act_quantizer.mode = "off"  # weight error only: the inputs are the FP model's
    ctx.active = True

    def mean_err(k):
        ctx.set(bucket=k)
        with torch.no_grad():
            y_q = layer(xs[k])
            ctx.active = False
            y_fp = layer(xs[k])
            ctx.active = True
        dims = [0] if kind == "linear" else [0, 2, 3]
        return (y_q - y_fp).mean(dims)

    before = [mean_err(k).abs().max() for k in range(3)]
    fit_bias_correction_(model, {"0": st}, {"0": w_fp})
    assert layer.bucket_bias.shape == (3, layer.weight.shape[0])
    for k in range(3):
        assert before[k] > 1e-3
        assert mean_err(k).abs().max() < 1e-5
    # per-sample buckets take each sample's own bias
    ctx.set(buckets=torch.tensor([0, 2]))
    x = torch.cat([xs[0][:1], xs[2][:1]])
    with torch.no_grad():
        y = layer(x)
    ctx.set(bucket=0)
    with torch.no_grad():
        y0 = layer(x[:1])
    assert torch.allclose(y[:1], y0, atol=1e-6)


def test_ptqd_output_correction_removes_gain_and_bias_on_calibration_data():
    from tdq.rounding.corrections import fit_output_correction

    cfg = TDQConfig(weight=QuantSpec(bits=3, granularity="per_channel"), grid=tdq.TimestepGrid(num_buckets=4))
    model = tdq.quantize_(tiny_unet2d(), cfg)
    run = _run(model, seeds=(0,))
    tdq.calibrate(model, run)
    fp_weights = {n: m.weight.detach().clone() for n, m in tdq.iter_quant_layers(model)}
    corr, rep = fit_output_correction(model, run, fp_weights, min_gain=0.01)
    assert any(abs(g - 1) > 1e-3 for g in rep["gain"])
    _, again = fit_output_correction(model, run, fp_weights, min_gain=0.01)
    assert all(abs(g - 1) < 1e-4 for g in again["gain"]), again["gain"]
    assert all(b < 1e-5 for b in again["mean_abs_bias"]), again["mean_abs_bias"]
    corr.remove()
