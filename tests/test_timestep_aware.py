"""Per-bucket scales follow an activation range that grows with t, and beat one static scale at equal bits."""

import torch

import tdq
from tdq import QuantSpec, TDQConfig, TimestepGrid
from tdq import testing as T
from tdq.quant import functional as F


def _calibrate(num_buckets, bits=4):
    model = T.GrowingActivationDenoiser()
    cfg = TDQConfig(
        weight=QuantSpec(enabled=False, granularity="per_channel"),
        activation=QuantSpec(bits=bits, symmetric=False),
        grid=TimestepGrid(num_buckets=num_buckets),
    )
    tdq.quantize_(model, cfg)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 16, generator=g), float(t)) for t in range(0, 1000, 10)]
    with torch.no_grad(), tdq.calibration(model):
        for x, t in data:
            model(x, t)
    return model, data


def test_scales_follow_the_timestep():
    model, _ = _calibrate(10)
    scale = model.proj.act_quantizer.scale
    assert bool((scale[1:] > scale[:-1]).all())
    # Range grows from ~1x to ~11x of the input: so do the scales.
    assert scale[-1] / scale[0] > 4


def test_timestep_aware_beats_static_scale():
    errs = {}
    for k in (1, 10):
        model, data = _calibrate(k)
        total = 0.0
        with torch.no_grad():
            for x, t in data:
                q = model(x, t)
                with tdq.disabled(model):
                    fp = model(x, t)
                total += ((q - fp).pow(2).mean() / fp.pow(2).mean()).item()
        errs[k] = total / len(data)
    assert errs[10] < 0.5 * errs[1], errs


def test_activation_observers_percentile_and_mse_clip_outliers():
    """Percentile and MSE observers clip a rare outlier that min-max keeps, per bucket."""
    ranges = {}
    for obs in ("minmax", "percentile", "mse"):
        model = T.GrowingActivationDenoiser()
        cfg = TDQConfig(
            weight=QuantSpec(enabled=False, granularity="per_channel"),
            activation=QuantSpec(bits=4, symmetric=False, observer=obs, percentile=99.0),
            grid=TimestepGrid(num_buckets=2),
            outliers={"handle": False},  # the observers' own ranges (smoothing would rescale the input space)
        )
        tdq.quantize_(model, cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad(), tdq.calibration(model):
            for t in (100.0, 900.0):
                x = torch.randn(256, 16, generator=g)
                x[0, 0] = 50.0
                model(x, t)
        aq = model.proj.act_quantizer
        assert torch.isfinite(aq.scale).all() and (aq.scale > 0).all()
        ranges[obs] = (aq.max_val - aq.min_val).tolist()
    for k in range(2):
        assert ranges["percentile"][k] < 0.5 * ranges["minmax"][k]
        assert ranges["mse"][k] < 0.8 * ranges["minmax"][k]


def test_fused_fast_path_equals_reference_math_and_creates_no_nonfinite():
    model, data = _calibrate(4, bits=8)
    aq = model.proj.act_quantizer
    state = tdq.get_quantization(model)
    state.context.set(2, None)
    x = torch.randn(64, 16) * 5
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    fast = aq(x)
    qmin, qmax = aq.spec.symmetric and (-127, 127) or (0, 255)
    ref = F.fake_quantize(x, aq.scale[2], aq.zero_point[2], qmin, qmax)
    finite = torch.isfinite(x)
    assert torch.isfinite(fast[finite]).all()
    # upstream NaN/inf are passed through, never laundered into finite values
    assert fast[0, 0].isnan() and fast[0, 1] == float("inf") and fast[0, 2] == -float("inf")
    torch.testing.assert_close(fast[1:], ref[1:], rtol=0, atol=0)
