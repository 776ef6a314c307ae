"""Quantizers: `WeightQuantizer` (shared across timesteps) and `TimestepActQuantizer` (one scale per bucket).

All quantizer state lives in buffers, so `state_dict()` and safetensors hold it; the current timestep bucket comes
from the model's `TimestepContext`, written by the sampler hook before every denoiser call.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from tdq.config import QuantSpec
from tdq.quant import codebook as CB
from tdq.quant import functional as F
from tdq.quant.observers import Observer, make_observer

logger = logging.getLogger(__name__)

# Range `[-ZERO_RANGE_FALLBACK, ZERO_RANGE_FALLBACK]` of an activation quantizer that saw only zeros in calibration.
ZERO_RANGE_FALLBACK = 1.0


def _has_range(mn: torch.Tensor, mx: torch.Tensor) -> bool:
    """Whether `[min(mn, 0), max(mx, 0)]` has a finite, non-zero width."""
    lo, hi = float(mn), float(mx)
    return math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi, 0.0) > 0.0


class NotCalibratedError(RuntimeError):
    """Raised when a quantized layer runs before its activation scales were calibrated."""


class NonFiniteActivationError(ValueError):
    """Raised when a quantized layer's input holds NaN/inf during calibration (or at run time with
    `TDQConfig.check_finite`); the message names the layer."""


def _meta_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"layer {name!r}: its quantizer was built on the meta device and never initialised; after to_empty() load "
        "a saved state with tdq.load_quantization(model, dir) or load the float weights and run "
        "tdq.calibration(model), which re-initialises it"
    )


def _check_finite(x: torch.Tensor, name: str, when: str, bucket=None) -> None:
    if not bool(torch.isfinite(x).all()):
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        at = "" if bucket is None else f" (timestep bucket {bucket})"
        raise NonFiniteActivationError(
            f"layer {name!r}: input activation holds {nan} NaN and {inf} inf value(s) {when}{at}; the layers before "
            "it (or the model's input) produce non-finite values"
        )


class TimestepContext:
    r"""
    The timestep bucket of the denoiser call in progress, shared by one model's hook and its quantizers.

    One context per quantized model (not a global): the `TimestepHook` writes it in a forward pre-hook, every
    `TimestepActQuantizer` of that model reads it.

    Attributes:
        active (`bool`): `False` when no hook is installed: quantized layers then run in floating point.
        bucket (`int` or `None`): the bucket when every sample of the batch is in the same one.
        buckets (`torch.LongTensor` or `None`): per-sample buckets `[B]` when they differ.
        num_buckets (`int`): K.
        check_finite (`bool`): raise `NonFiniteActivationError` for NaN/inf inputs at run time
            (`TDQConfig.check_finite`).
    """

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self.active = False
        self.check_finite = False
        self.bucket: int | None = None
        self.buckets: torch.Tensor | None = None
        self.calls = 0  # denoiser calls seen by the hook
        self.out_of_range_calls = 0  # calls whose timestep lay outside the calibrated grid
        self.out_of_range_warned = False

    def set(self, bucket: int | None = None, buckets: torch.Tensor | None = None) -> None:
        """Publish the bucket(s) of the call about to run."""
        self.bucket = bucket
        self.buckets = buckets

    def clear(self) -> None:
        """Forget the last published bucket."""
        self.bucket = None
        self.buckets = None


class WeightQuantizer(nn.Module):
    r"""
    Fake-quantizes a weight tensor with per-tensor, per-channel or per-group scales.

    The clipping range (`min_val`, `max_val` per row) is stored, and scales follow from it and `bits`, so changing
    the bit-width (e.g. from a `PrecisionSchedule`) needs no recalibration.

    With non-uniform levels (`spec.levels` `"log2"` or `"kmeans"`, see `tdq.quant.codebook`) a `codebook` buffer
    `[rows, 2^bits]` holds each row's sorted levels and the fake-quantized weight is `codebook[row, nearest code]`;
    `min_val`/`max_val` then hold the codebook's ends and `scale` its largest magnitude over `qmax` (informational).
    Changing the bit-width refits the codebook (it needs the weight).

    Args:
        spec (`QuantSpec`): the weight spec.
        weight (`torch.Tensor`): the weight whose range is estimated.
        name (`str`, *optional*): layer name for error messages.
        calibrate (`bool`, *optional*, defaults to `True`): estimate the range from `weight` now; `False` leaves the
            buffers at their initial values for a state loaded right after (`tdq.serialization.load_quantization`).
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, name: str = "", calibrate: bool = True):
        super().__init__()
        self.spec = spec
        self.layer_name = name
        self.register_buffer("bits", torch.tensor(int(spec.bits), dtype=torch.int64))
        rows = F.reshape_for_granularity(weight.detach(), spec.granularity, spec.group_size)
        self.register_buffer("min_val", torch.zeros(rows.shape[0], 1, device=weight.device))
        self.register_buffer("max_val", torch.zeros(rows.shape[0], 1, device=weight.device))
        self.register_buffer("scale", torch.ones(rows.shape[0], 1, device=weight.device))
        self.register_buffer("zero_point", torch.zeros(rows.shape[0], 1, device=weight.device))
        if self.has_codebook:
            self.register_buffer(
                "codebook", torch.zeros(rows.shape[0], 2 ** int(spec.bits), device=weight.device)
            )
        # Built on the meta device: every buffer is garbage after `to_empty()` until a state is loaded or `reset_`.
        self.needs_init = weight.is_meta
        if not weight.is_meta and calibrate:
            self.calibrate_(weight)

    @torch.no_grad()
    def reset_(self, weight: torch.Tensor) -> None:
        """Re-initialise every buffer from the spec and `weight` (after `to_empty()` on a meta-built model)."""
        self.bits.fill_(int(self.spec.bits))
        self.calibrate_(weight)
        self.needs_init = False

    @property
    def has_codebook(self) -> bool:
        """Whether the levels are a per-row codebook (`spec.levels` not `"uniform"`)."""
        return getattr(self.spec, "levels", "uniform") != "uniform"

    @property
    def codes_signed(self) -> bool:
        """Whether the stored codes are signed (symmetric uniform) or unsigned (affine, or codebook indices)."""
        return codes_signed(self.spec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "codebook"
        if self.has_codebook and key in state_dict and state_dict[key].shape != self.codebook.shape:
            # a state saved at another bit-width (precision schedule): the table takes the saved shape
            self._buffers["codebook"] = torch.empty_like(state_dict[key], device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + k in state_dict for k in self._buffers):
            self.needs_init = False

    @torch.no_grad()
    def calibrate_(self, weight: torch.Tensor, element_weights: torch.Tensor | None = None) -> None:
        """
        Estimate the per-row clipping range of `weight` with the spec's observer, then derive scales; with a
        codebook, fit the levels (`element_weights`, broadcastable to the `[rows, cols]` view, weight the k-means
        fit, e.g. by the input second moments of each column).
        """
        rows = F.reshape_for_granularity(weight.detach().float(), self.spec.granularity, self.spec.group_size)
        if self.has_codebook:
            self._fit_codebook(rows, element_weights)
            return
        mn = rows.amin(dim=1, keepdim=True)
        mx = rows.amax(dim=1, keepdim=True)
        if self.spec.observer == "percentile":
            q = self.spec.percentile / 100.0
            mn = torch.quantile(rows, 1 - q, dim=1, keepdim=True)
            mx = torch.quantile(rows, q, dim=1, keepdim=True)
        elif self.spec.observer == "mse":
            mn, mx = _mse_rows(rows, mn, mx, int(self.bits), self.spec.symmetric)
        self.min_val.copy_(mn)
        self.max_val.copy_(mx)
        self._update_scale()

    def _fit_codebook(self, rows: torch.Tensor, element_weights: torch.Tensor | None) -> None:
        bits = int(self.bits)
        if self.spec.levels == "log2":
            cb = CB.fit_log2(rows, bits, search=self.spec.observer == "mse")
        else:
            cb = CB.fit_kmeans(rows, bits, element_weights)
        if self.codebook.shape != cb.shape:
            self._buffers["codebook"] = torch.empty_like(cb, device=self.scale.device)
        self.codebook.copy_(cb)
        self.min_val.copy_(cb[:, :1])
        self.max_val.copy_(cb[:, -1:])
        self._update_scale()

    def _update_scale(self) -> None:
        scale, zp = F.scale_zero_point(self.min_val, self.max_val, int(self.bits), self.spec.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    @torch.no_grad()
    def set_bits(self, bits: int, weight: torch.Tensor | None = None) -> None:
        """Change the bit-width; scales follow from the stored range (a codebook is refitted to `weight`)."""
        if bits not in range(2, 9):
            raise ValueError(f"layer {self.layer_name!r}: weight bits={bits} is not supported; choose 2..8")
        if self.has_codebook:
            if int(bits) == int(self.bits):
                return
            if weight is None:
                raise ValueError(
                    f"layer {self.layer_name!r}: weight.levels={self.spec.levels!r}: changing the bit-width refits "
                    "the codebook and needs the weight (use the layer's set_bits)"
                )
            self.bits.fill_(int(bits))
            self.calibrate_(weight)
            return
        self.bits.fill_(int(bits))
        self._update_scale()

    def qrange(self) -> tuple[int, int]:
        """`(qmin, qmax)` of the current bit-width."""
        return F.qrange(int(self.bits), self.spec.symmetric)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized copy of `weight` (straight-through gradient)."""
        if not self.spec.enabled:
            return weight
        if self.needs_init:
            raise _meta_error(self.layer_name)
        rows = F.reshape_for_granularity(weight, self.spec.granularity, self.spec.group_size)
        if self.has_codebook:
            wq = CB.lookup(CB.nearest_codes(rows.detach(), self.codebook), self.codebook, rows.dtype)
            if rows.requires_grad:
                wq = wq + (rows - rows.detach())  # straight-through; the values stay exactly the levels
            return F.restore_from_granularity(wq, weight.shape, self.spec.granularity)
        qmin, qmax = self.qrange()
        stochastic = self.spec.rounding == "stochastic" and self.training
        wq = F.fake_quantize(
            rows, self.scale.to(rows.dtype), self.zero_point.to(rows.dtype), qmin, qmax, stochastic
        )
        return F.restore_from_granularity(wq, weight.shape, self.spec.granularity)

    @torch.no_grad()
    def int_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of `weight` as `int8` rows (the layout of `reshape_for_granularity`); codebook indices
        as `uint8`."""
        rows = F.reshape_for_granularity(weight.float(), self.spec.granularity, self.spec.group_size)
        if self.has_codebook:
            return CB.nearest_codes(rows, self.codebook).to(torch.uint8)
        qmin, qmax = self.qrange()
        return F.quantize(rows, self.scale, self.zero_point, qmin, qmax).to(
            torch.int8 if qmin < 0 else torch.uint8
        )

    @torch.no_grad()
    def dequantize_codes(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of codes back to values in `dtype` (`(q - zp) * scale`, or the codebook lookup): the forward's
        arithmetic, so the result equals the fake-quantized weight bit for bit."""
        if self.has_codebook:
            return CB.lookup(rows, self.codebook, dtype)
        return (rows.to(dtype) - self.zero_point.to(dtype)) * self.scale.to(dtype)

    def extra_repr(self) -> str:
        s = self.spec
        lv = "" if not self.has_codebook else f", {s.levels} levels"
        return f"bits={int(self.bits)}, {s.granularity}, {'symmetric' if s.symmetric else 'affine'}{lv}"


def codes_signed(spec: QuantSpec) -> bool:
    """Whether a weight spec stores signed codes (symmetric uniform levels); affine and codebook indices are
    unsigned."""
    return spec.symmetric and getattr(spec, "levels", "uniform") == "uniform"


@torch.no_grad()
def _mse_rows(rows, mn, mx, bits, symmetric, num_candidates: int = 40):
    best_err = torch.full_like(mn, float("inf"))
    best_mn, best_mx = mn.clone(), mx.clone()
    qmin, qmax = F.qrange(bits, symmetric)
    for r in torch.linspace(0.3, 1.0, num_candidates).tolist():
        cmn, cmx = mn * r, mx * r
        scale, zp = F.scale_zero_point(cmn, cmx, bits, symmetric)
        err = (
            (F.dequantize(F.quantize(rows, scale, zp, qmin, qmax), scale, zp) - rows)
            .pow(2)
            .mean(1, keepdim=True)
        )
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_mn = torch.where(better, cmn, best_mn)
        best_mx = torch.where(better, cmx, best_mx)
    return best_mn, best_mx


def _keep_nonfinite(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out`, with the NaN/inf elements of `x` passed through unchanged (`out` itself if it is `x`)."""
    return out if out is x else torch.where(torch.isfinite(x), out, x)


class TimestepActQuantizer(nn.Module):
    r"""
    Per-tensor activation quantizer with one scale, zero-point and bit-width per timestep bucket.

    Buffers `scale`, `zero_point`, `bits` (shape `[K]`) and `calibrated` (bool `[K]`) hold its state. The bucket of
    the current denoiser call is read from the shared `TimestepContext`.

    Modes: `"quant"` (fake-quantize with the current bucket's parameters), `"observe"` (calibration: feed the
    bucket's observer, pass the input through unchanged) and `"off"` (pass through).

    Args:
        spec (`QuantSpec`): the activation spec (per tensor).
        num_buckets (`int`): K.
        context (`TimestepContext`): the model's context.
        name (`str`, *optional*): layer name for error messages.
    """

    def __init__(self, spec: QuantSpec, num_buckets: int, context: TimestepContext, name: str = ""):
        super().__init__()
        self.spec = spec
        self.layer_name = name
        self.context = context
        self.mode = "quant"
        self.register_buffer("scale", torch.ones(num_buckets))
        self.register_buffer("zero_point", torch.zeros(num_buckets))
        self.register_buffer("bits", torch.full((num_buckets,), int(spec.bits), dtype=torch.int64))
        self.register_buffer("min_val", torch.zeros(num_buckets))
        self.register_buffer("max_val", torch.zeros(num_buckets))
        self.register_buffer("calibrated", torch.zeros(num_buckets, dtype=torch.bool))
        self.observers: list[Observer] | None = None
        self._params: list | None = None  # per-bucket python-side cache of (scale, zp, qmin, qmax)
        self.needs_init = False  # set by `from_float` for a layer built on the meta device
        self.channel_dim = 1  # input-channel dim, set by the owning module (1 conv, -1 linear)
        self.stats = None  # a `tdq.quant.stats.ChannelStats` while calibrating, for outlier handling
        # run-time range check (sampled: every `check_every`-th quantized call): per bucket, checked calls and
        # calls with inputs beyond the calibrated range by more than 1 % of its width
        self.check_every = 16
        self._calls = 0
        self.checked_calls = [0] * num_buckets
        self.clipped_calls = [0] * num_buckets

    @property
    def num_buckets(self) -> int:
        """K, the number of timestep buckets."""
        return self.scale.shape[0]

    # ----------------------------------------------------------------- calibration
    def start_observing(self, seed: int = 0) -> None:
        """Switch to `"observe"` mode with fresh observers (one per bucket)."""
        if not self.spec.enabled:
            self.calibrated.fill_(True)
            return
        self.observers = [
            make_observer(self.spec.observer, self.spec.percentile, seed=seed + k)
            for k in range(self.num_buckets)
        ]
        self.mode = "observe"

    @torch.no_grad()
    def finish_observing(self) -> list[int]:
        """
        Freeze per-bucket ranges from the observers and switch to `"quant"` mode.

        Buckets that saw no data take the range of the nearest bucket that did (documented nearest-bucket behaviour).

        Returns:
            `list[int]`: the buckets that were filled from a neighbour.
        """
        if not self.spec.enabled:
            return []
        if self.observers is None:
            raise RuntimeError(
                f"layer {self.layer_name!r}: finish_observing() called without start_observing()"
            )
        seen = [k for k, o in enumerate(self.observers) if o.has_data]
        if not seen:
            raise NotCalibratedError(
                f"layer {self.layer_name!r} saw no activations during calibration; did the sampler call the "
                "denoiser through the hooked model?"
            )
        zero = []
        for k in seen:
            bits = int(self.bits[k])
            obs = self.observers[k]
            mn, mx = obs.compute_range(min(bits, 16), self.spec.symmetric)
            if not _has_range(mn, mx):  # e.g. a percentile of mostly-zero data: fall back to the full range
                mn, mx = obs.min_val, obs.max_val
            if not _has_range(mn, mx):
                zero.append(k)
            self.min_val[k] = mn
            self.max_val[k] = mx
        # Zero-range policy: a bucket that saw only zeros would get the smallest scale and crush every later input
        # to zero. It takes the range of the nearest bucket that saw non-zero inputs; a layer that saw nothing but
        # zeros gets the unit range [-1, 1].
        ranged = [k for k in seen if k not in zero]
        if zero:
            logger.warning(
                "layer %r saw only zero inputs in timestep bucket(s) %s during calibration; %s",
                self.layer_name,
                zero,
                "they use the nearest non-zero bucket's range"
                if ranged
                else f"it uses the unit range [{-ZERO_RANGE_FALLBACK:g}, {ZERO_RANGE_FALLBACK:g}]",
            )
            for k in zero:
                if ranged:
                    nearest = min(ranged, key=lambda j: (abs(j - k), j))
                    self.min_val[k] = self.min_val[nearest]
                    self.max_val[k] = self.max_val[nearest]
                else:
                    self.min_val[k] = -ZERO_RANGE_FALLBACK
                    self.max_val[k] = ZERO_RANGE_FALLBACK
        filled = []
        for k in range(self.num_buckets):
            if k not in seen:
                nearest = min(seen, key=lambda j: (abs(j - k), j))
                self.min_val[k] = self.min_val[nearest]
                self.max_val[k] = self.max_val[nearest]
                filled.append(k)
        self.calibrated.fill_(True)
        self.observers = None
        self.mode = "quant"
        self._update_scales()
        return filled

    def _update_scales(self) -> None:
        scale, zp = F.scale_zero_point(self.min_val, self.max_val, self.bits, self.spec.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self._params = None

    @torch.no_grad()
    def set_bits(self, bits: torch.Tensor | int) -> None:
        """Set the bit-width of every bucket (`int`) or per bucket (tensor `[K]`); scales follow the stored ranges."""
        raw = torch.as_tensor(bits)
        if raw.dtype == torch.bool or (raw.is_floating_point() and not bool((raw == raw.round()).all())):
            raise ValueError(
                f"layer {self.layer_name!r}: activation bits {raw.tolist()} must be integers in 2..16"
            )
        bits = raw.to(torch.int64).expand(self.num_buckets)
        bad = [int(b) for b in bits if int(b) not in range(2, 17)]
        if bad:
            raise ValueError(
                f"layer {self.layer_name!r}: activation bits {bad[0]} not supported; choose 2..16"
            )
        self.bits.copy_(bits)
        self._update_scales()

    @torch.no_grad()
    def reset_(self) -> None:
        """Re-initialise every buffer from the spec: uncalibrated, the spec's bits (after `to_empty()`)."""
        self.scale.fill_(1.0)
        self.zero_point.zero_()
        self.bits.fill_(int(self.spec.bits))
        self.min_val.zero_()
        self.max_val.zero_()
        self.calibrated.fill_(False)
        self._params = None
        self.needs_init = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if all(prefix + k in state_dict for k in self._buffers):
            self.needs_init = False
        self._params = None

    # ----------------------------------------------------------------- forward
    def _bucket_params(self) -> list:
        # Python-side per-bucket constants, so the hot path does no tensor indexing or device sync.
        if self._params is None:
            qmins, qmaxs = F.qrange(self.bits, self.spec.symmetric)
            self._params = [
                (
                    self.scale[k],
                    self.zero_point[k],
                    int(qmins[k]),
                    int(qmaxs[k]),
                    float(self.scale[k]),
                    int(self.zero_point[k]),
                )
                for k in range(self.num_buckets)
            ]
        return self._params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize (or observe) `x` according to the bucket of the current denoiser call."""
        ctx = self.context
        if not ctx.active or self.mode == "off" or not self.spec.enabled:
            return x
        if ctx.bucket is None and ctx.buckets is None:
            raise RuntimeError(
                f"layer {self.layer_name!r}: no timestep was published for this call; quantized layers must run "
                "inside the hooked denoiser's forward"
            )
        if self.needs_init:
            raise _meta_error(self.layer_name)
        if self.mode == "observe":
            self._observe(x, ctx)
            return x
        if not self._calibrated_all():
            raise NotCalibratedError(
                f"layer {self.layer_name!r}: activation quantizer used before calibration; run the sampler inside "
                "`tdq.calibration(model)` (or load a calibrated state) first"
            )
        if ctx.check_finite:
            _check_finite(x, self.layer_name, "at run time", ctx.bucket)
        return self._fake_quantize(x, ctx)

    def _fake_quantize(self, x: torch.Tensor, ctx: TimestepContext) -> torch.Tensor:
        # The quantizer creates no NaN/inf (scales are finite and positive), and it does not hide upstream ones
        # either: non-finite inputs pass through unchanged, as they would in floating point (`_keep_nonfinite`).
        stochastic = self.spec.rounding == "stochastic" and self.training
        if self.spec.granularity == "per_token":
            return _keep_nonfinite(x, self._dynamic_per_token(x, ctx, stochastic))
        self._calls += 1
        if ctx.bucket is not None and self._calls % self.check_every == 0:
            self._check_range(x, ctx.bucket)
        if ctx.bucket is not None:
            scale, zp, qmin, qmax, scale_f, zp_i = self._bucket_params()[ctx.bucket]
            if qmax >= 2**15 - 1:  # 16-bit: numerically the identity at activation ranges
                return x
            if x.dtype == torch.float32 and not stochastic:
                # bit for bit PyTorch's fused kernel, the same result as `F.fake_quantize` (tested)
                return F.fake_quantize_per_tensor(x, scale_f, zp_i, qmin, qmax, keep_nonfinite=True)
            return _keep_nonfinite(
                x, F.fake_quantize(x, scale.to(x.dtype), zp.to(x.dtype), qmin, qmax, stochastic)
            )
        b = self._expand_buckets(ctx.buckets, x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        qmin, qmax = F.qrange(self.bits[b], self.spec.symmetric)
        out = F.fake_quantize(
            x,
            self.scale[b].view(shape).to(x.dtype),
            self.zero_point[b].view(shape).to(x.dtype),
            qmin.view(shape),
            qmax.view(shape),
            stochastic,
        )
        floating = self.bits[b] >= 16  # 16-bit buckets keep the input in float, as in the one-bucket path
        out = _keep_nonfinite(x, out)
        return torch.where(floating.view(shape), x, out) if bool(floating.any()) else out

    @torch.no_grad()
    def _check_range(self, x: torch.Tensor, k: int) -> None:
        lo, hi = float(self.min_val[k]), float(self.max_val[k])
        mn, mx = torch.aminmax(x.detach())
        tol = 0.01 * max(hi - lo, 1e-30)
        self.checked_calls[k] += 1
        if float(mn) < lo - tol or float(mx) > hi + tol:
            self.clipped_calls[k] += 1

    def _dynamic_per_token(self, x: torch.Tensor, ctx: TimestepContext, stochastic: bool) -> torch.Tensor:
        # Dynamic per-token (per-pixel for convs) ranges at the bucket's bit-width: a baseline / option.
        cd = self.channel_dim % x.dim() if x.dim() > 1 else 0
        mn = x.detach().amin(dim=cd, keepdim=True)
        mx = x.detach().amax(dim=cd, keepdim=True)
        k = ctx.bucket if ctx.bucket is not None else int(ctx.buckets.reshape(-1)[0])
        bits = int(self.bits[k])
        if bits >= 16:
            return x
        scale, zp = F.scale_zero_point(mn, mx, bits, self.spec.symmetric)
        qmin, qmax = F.qrange(bits, self.spec.symmetric)
        return F.fake_quantize(x, scale.to(x.dtype), zp.to(x.dtype), qmin, qmax, stochastic)

    def _calibrated_all(self) -> bool:
        if self._params is not None:
            return True
        return bool(self.calibrated.all())

    def _expand_buckets(self, buckets: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = buckets.shape[0]
        if x.shape[0] == n:
            return buckets.to(x.device)
        if x.shape[0] % n == 0:
            return buckets.to(x.device).repeat_interleave(x.shape[0] // n)
        raise RuntimeError(
            f"layer {self.layer_name!r}: input batch {x.shape[0]} does not match the {n} per-sample timesteps"
        )

    def _observe(self, x: torch.Tensor, ctx: TimestepContext) -> None:
        # Calibration always checks: observers would drop NaN/inf and calibrate a broken model as if it were fine.
        _check_finite(x, self.layer_name, "during calibration", ctx.bucket)
        if ctx.bucket is not None:
            self.observers[ctx.bucket].update(x)
            if self.stats is not None:
                self.stats.update(x, ctx.bucket)
            return
        b = self._expand_buckets(ctx.buckets, x)
        for k in torch.unique(b).tolist():
            self.observers[k].update(x[b == k])
            if self.stats is not None:
                self.stats.update(x[b == k], k)

    def extra_repr(self) -> str:
        bits = sorted({int(b) for b in self.bits})
        return f"K={self.num_buckets}, bits={bits}, {'symmetric' if self.spec.symmetric else 'affine'}, mode={self.mode}"
