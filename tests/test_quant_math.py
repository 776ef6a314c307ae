import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tdq.config import QuantSpec
from tdq.quant import functional as F
from tdq.quant.quantizers import WeightQuantizer

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _params(lo, hi, bits, symmetric):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = F.scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    qmin, qmax = F.qrange(bits, symmetric)
    return lo, hi, scale, zp, qmin, qmax


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), floats, floats, st.integers(2, 8), st.booleans())
def test_idempotent(xs, lo, hi, bits, symmetric):
    _, _, scale, zp, qmin, qmax = _params(lo, hi, bits, symmetric)
    x = torch.tensor(xs)
    once = F.fake_quantize(x, scale, zp, qmin, qmax)
    twice = F.fake_quantize(once, scale, zp, qmin, qmax)
    torch.testing.assert_close(twice, once, rtol=0, atol=float(scale) * 1e-3)


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), floats, floats, st.integers(2, 8), st.booleans())
def test_error_bound_inside_and_clamping_outside(xs, lo, hi, bits, symmetric):
    lo, hi, scale, zp, qmin, qmax = _params(lo, hi, bits, symmetric)
    x = torch.tensor(xs)
    xq = F.fake_quantize(x, scale, zp, qmin, qmax)
    rep_lo = float((qmin - zp) * scale)
    rep_hi = float((qmax - zp) * scale)
    inside = (x >= rep_lo) & (x <= rep_hi)
    err = (xq - x).abs()
    assert bool((err[inside] <= float(scale) / 2 * (1 + 1e-4) + 1e-6).all())
    # Outside the representable range values clamp to its ends.
    assert bool((xq[x > rep_hi] - rep_hi).abs().le(1e-4 * max(1.0, abs(rep_hi))).all())
    assert bool((xq[x < rep_lo] - rep_lo).abs().le(1e-4 * max(1.0, abs(rep_lo))).all())
    # The representable range covers the requested one (up to rounding of the zero-point).
    assert rep_lo <= min(lo, 0.0) + float(scale) and rep_hi >= max(hi, 0.0) - float(scale)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.booleans())
def test_zero_range_is_finite(bits, symmetric):
    scale, zp = F.scale_zero_point(torch.tensor(0.0), torch.tensor(0.0), bits, symmetric)
    assert torch.isfinite(scale) and scale > 0 and torch.isfinite(zp)
    qmin, qmax = F.qrange(bits, symmetric)
    x = torch.tensor([0.0, float("nan"), float("inf"), -float("inf"), 1e30])
    out = F.fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.isfinite(out).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.sampled_from([1, 3]), st.integers(1, 16), st.integers(2, 8))
def test_granularity_shapes(out_ch, in_ch, k, group, bits):
    w = torch.randn(out_ch, in_ch, k, k)
    for gran, rows in [
        ("per_tensor", 1),
        ("per_channel", out_ch),
        ("per_group", out_ch * -(-(in_ch * k * k) // group)),
    ]:
        q = WeightQuantizer(QuantSpec(bits=bits, granularity=gran, group_size=group), w)
        assert q.scale.shape == (rows, 1)
        wq = q(w)
        assert wq.shape == w.shape and torch.isfinite(wq).all()
        # Each row is within half a step of the original.
        r = F.reshape_for_granularity(w, gran, group)
        rq = F.reshape_for_granularity(wq, gran, group)
        assert bool(((rq - r).abs() <= q.scale / 2 + 1e-6).all())
        codes = q.int_codes(w)
        assert codes.shape == r.shape and int(codes.abs().max()) <= 2 ** (bits - 1) - 1


def test_per_channel_beats_per_tensor_on_uneven_channels():
    w = torch.randn(8, 32) * torch.logspace(-2, 1, 8)[:, None]
    errs = {}
    for gran in ["per_tensor", "per_channel"]:
        q = WeightQuantizer(QuantSpec(bits=4, granularity=gran), w)
        errs[gran] = (q(w) - w).pow(2).mean().item()
    assert errs["per_channel"] < errs["per_tensor"] / 2


def test_mse_observer_clips_outliers_better_than_minmax():
    w = torch.randn(4, 512)
    w[:, 0] = 40.0
    errs = {}
    for obs in ["minmax", "mse"]:
        q = WeightQuantizer(QuantSpec(bits=4, granularity="per_channel", observer=obs), w)
        errs[obs] = (q(w) - w).pow(2).mean().item()
    assert errs["mse"] < errs["minmax"]


def test_straight_through_gradient():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    y = F.fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), -127, 127)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (37,))
    packed = F.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 19
    torch.testing.assert_close(F.unpack_int4(packed, 37).long(), q)
