"""Quantizers: `WeightQuantizer` (shared across timesteps) and `TimestepActQuantizer` (one scale per bucket).

All quantizer state lives in buffers, so `state_dict()` and safetensors hold it; the current timestep bucket comes
from the model's `TimestepContext`, written by the sampler hook before every denoiser call.
"""

from __future__ import annotations

import torch
from torch import nn

from tdq.config import QuantSpec
from tdq.quant import functional as F
from tdq.quant.observers import Observer, make_observer


class NotCalibratedError(RuntimeError):
    """Raised when a quantized layer runs before its activation scales were calibrated."""


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
    """

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self.active = False
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

    Args:
        spec (`QuantSpec`): the weight spec.
        weight (`torch.Tensor`): the weight whose range is estimated.
        name (`str`, *optional*): layer name for error messages.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, name: str = ""):
        super().__init__()
        self.spec = spec
        self.layer_name = name
        self.register_buffer("bits", torch.tensor(int(spec.bits), dtype=torch.int64))
        rows = F.reshape_for_granularity(weight.detach(), spec.granularity, spec.group_size)
        self.register_buffer("min_val", torch.zeros(rows.shape[0], 1, device=weight.device))
        self.register_buffer("max_val", torch.zeros(rows.shape[0], 1, device=weight.device))
        self.register_buffer("scale", torch.ones(rows.shape[0], 1, device=weight.device))
        self.register_buffer("zero_point", torch.zeros(rows.shape[0], 1, device=weight.device))
        self.calibrate_(weight)

    @torch.no_grad()
    def calibrate_(self, weight: torch.Tensor) -> None:
        """Estimate the per-row clipping range of `weight` with the spec's observer, then derive scales."""
        rows = F.reshape_for_granularity(weight.detach().float(), self.spec.granularity, self.spec.group_size)
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

    def _update_scale(self) -> None:
        scale, zp = F.scale_zero_point(self.min_val, self.max_val, int(self.bits), self.spec.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Change the bit-width; scales follow from the stored range."""
        if bits not in range(2, 9):
            raise ValueError(f"layer {self.layer_name!r}: weight bits={bits} is not supported; choose 2..8")
        self.bits.fill_(int(bits))
        self._update_scale()

    def qrange(self) -> tuple[int, int]:
        """`(qmin, qmax)` of the current bit-width."""
        return F.qrange(int(self.bits), self.spec.symmetric)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized copy of `weight` (straight-through gradient)."""
        if not self.spec.enabled:
            return weight
        rows = F.reshape_for_granularity(weight, self.spec.granularity, self.spec.group_size)
        qmin, qmax = self.qrange()
        stochastic = self.spec.rounding == "stochastic" and self.training
        wq = F.fake_quantize(
            rows, self.scale.to(rows.dtype), self.zero_point.to(rows.dtype), qmin, qmax, stochastic
        )
        return F.restore_from_granularity(wq, weight.shape, self.spec.granularity)

    @torch.no_grad()
    def int_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of `weight` as `int8` rows (the layout of `reshape_for_granularity`)."""
        rows = F.reshape_for_granularity(weight.float(), self.spec.granularity, self.spec.group_size)
        qmin, qmax = self.qrange()
        return F.quantize(rows, self.scale, self.zero_point, qmin, qmax).to(
            torch.int8 if qmin < 0 else torch.uint8
        )

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={int(self.bits)}, {s.granularity}, {'symmetric' if s.symmetric else 'affine'}"


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
        for k in seen:
            bits = int(self.bits[k])
            mn, mx = self.observers[k].compute_range(min(bits, 16), self.spec.symmetric)
            self.min_val[k] = mn
            self.max_val[k] = mx
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
        bits = torch.as_tensor(bits, dtype=torch.int64).expand(self.num_buckets)
        bad = [int(b) for b in bits if int(b) not in range(2, 17)]
        if bad:
            raise ValueError(
                f"layer {self.layer_name!r}: activation bits {bad[0]} not supported; choose 2..16"
            )
        self.bits.copy_(bits)
        self._update_scales()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
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
        if self.mode == "observe":
            self._observe(x, ctx)
            return x
        if not self._calibrated_all():
            raise NotCalibratedError(
                f"layer {self.layer_name!r}: activation quantizer used before calibration; run the sampler inside "
                "`tdq.calibration(model)` (or load a calibrated state) first"
            )
        stochastic = self.spec.rounding == "stochastic" and self.training
        if self.spec.granularity == "per_token":
            return self._dynamic_per_token(x, ctx, stochastic)
        self._calls += 1
        if ctx.bucket is not None and self._calls % self.check_every == 0:
            self._check_range(x, ctx.bucket)
        if ctx.bucket is not None:
            scale, zp, qmin, qmax, scale_f, zp_i = self._bucket_params()[ctx.bucket]
            if qmax >= 2**15 - 1:  # 16-bit: numerically the identity at activation ranges
                return x
            if x.dtype == torch.float32 and not stochastic:
                # PyTorch's fused kernel: same result as `F.fake_quantize` (tested), one pass instead of seven;
                # NaN/inf inputs come out clamped to the range ends (finite).
                return torch.fake_quantize_per_tensor_affine(x, scale_f, zp_i, qmin, qmax)
            return F.fake_quantize(x, scale.to(x.dtype), zp.to(x.dtype), qmin, qmax, stochastic)
        b = self._expand_buckets(ctx.buckets, x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        qmin, qmax = F.qrange(self.bits[b], self.spec.symmetric)
        return F.fake_quantize(
            x,
            self.scale[b].view(shape).to(x.dtype),
            self.zero_point[b].view(shape).to(x.dtype),
            qmin.view(shape),
            qmax.view(shape),
            stochastic,
        )

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
