"""Quantizer arithmetic: integer ranges, scale/zero-point, fake quantization, integer codes and packing.

Conventions: symmetric quantization uses signed narrow-range codes `[-(2^(b-1) - 1), 2^(b-1) - 1]` with zero-point
0; affine quantization uses unsigned codes `[0, 2^b - 1]` with an integer zero-point. `x_hat = (q - zp) * scale`.
"""

from __future__ import annotations

import math
import warnings

import torch

# Smallest scale handed out: keeps zero-range tensors finite (x / scale never divides by zero).
MIN_SCALE = 1e-8


def qrange(bits: int | torch.Tensor, symmetric: bool) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """
    Integer code range for a bit-width.

    Args:
        bits (`int` or `torch.Tensor`): bit-width(s).
        symmetric (`bool`): signed narrow range if `True`, unsigned full range otherwise.

    Returns:
        `(qmin, qmax)`, of the same type as `bits`.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0 * bits, 2**bits - 1


def scale_zero_point(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int | torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Scale and zero-point that map `[min_val, max_val]` (widened to contain 0) onto the code range.

    Always returns a finite, strictly positive scale, also for zero-range or non-finite inputs.

    Args:
        min_val (`torch.Tensor`): lower end(s) of the range.
        max_val (`torch.Tensor`): upper end(s), same shape.
        bits (`int` or `torch.Tensor`): bit-width(s), broadcastable to the range's shape.
        symmetric (`bool`): symmetric (zero-point 0) or affine.

    Returns:
        `(scale, zero_point)`: float32 scale and float32 integer-valued zero-point of the range's shape.
    """
    min_val = torch.nan_to_num(min_val.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(max=0.0)
    max_val = torch.nan_to_num(max_val.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
    bits = torch.as_tensor(bits, device=min_val.device)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = (amax / qmax).clamp(min=MIN_SCALE)
        zp = torch.zeros_like(scale)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=MIN_SCALE)
        zp = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).float()
    return scale, zp


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """Round to nearest (or stochastically) with a straight-through gradient."""
    if stochastic:
        return x + (torch.floor(x + torch.rand_like(x)) - x).detach()
    return _RoundSTE.apply(x)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int | torch.Tensor,
    qmax: int | torch.Tensor,
) -> torch.Tensor:
    """Integer codes (as float tensor) `clamp(round(x / scale) + zp, qmin, qmax)`; non-finite inputs are clamped."""
    q = torch.round(x / scale) + zero_point
    q = torch.nan_to_num(q, nan=0.0)
    return torch.clamp(q, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize`: `(q - zp) * scale`."""
    return (q - zero_point) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int | torch.Tensor,
    qmax: int | torch.Tensor,
    stochastic: bool = False,
) -> torch.Tensor:
    """
    Quantize-dequantize with a straight-through estimator for the rounding.

    Args:
        x (`torch.Tensor`): input.
        scale (`torch.Tensor`): scale, broadcastable to `x`.
        zero_point (`torch.Tensor`): zero-point, broadcastable to `x`.
        qmin (`int` or `torch.Tensor`): smallest code.
        qmax (`int` or `torch.Tensor`): largest code.
        stochastic (`bool`, *optional*, defaults to `False`): stochastic rounding.

    Returns:
        `torch.Tensor` of `x`'s shape and dtype; finite for any input (NaN maps to the zero-point).
    """
    q = round_ste(x / scale, stochastic) + zero_point
    q = torch.nan_to_num(q, nan=0.0)
    if isinstance(qmin, torch.Tensor):
        q = torch.maximum(torch.minimum(q, qmax.to(q.dtype)), qmin.to(q.dtype))
    else:
        q = torch.clamp(q, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


# `torch.quantize_per_tensor` warns that the QTensor dtypes are deprecated; tdq only uses it as a fused, vectorised
# quantizer (`fake_quantize_per_tensor`) and falls back to PyTorch's fused fake quantizer when it is gone.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
HAS_QTENSOR = hasattr(torch, "quantize_per_tensor") and hasattr(torch, "quint8")

# Largest |x / scale| the vectorised quantizer takes: beyond 2^31 its float->int32 conversion wraps (a huge positive
# input became code 0 instead of qmax); such inputs take PyTorch's fused fake quantizer, which clamps them.
_FAST_CODE_LIMIT = 2.0**30


def dense_flat(x: torch.Tensor) -> torch.Tensor | None:
    """
    A 1-D view of the memory that holds `x`, when `x`'s elements fill it exactly once (contiguous, channels-last,
    a transpose of a contiguous tensor: any permutation of a dense layout); `None` otherwise.

    Elementwise quantization and whole-tensor reductions give the same values on this view as on `x`, without the
    copy (or slow strided loop) that a non-contiguous `x` costs them; `restride` puts a result back into `x`'s shape.
    """
    if x.is_contiguous():
        return x.view(-1)
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride(), strict=True) if sz != 1):
        if stride != expect:
            return None
        expect *= size
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def restride(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`flat` (a contiguous 1-D result computed on `dense_flat(like)`) viewed with `like`'s shape and strides."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset())


def fake_quantize_per_tensor(
    x: torch.Tensor,
    scale: float,
    zero_point: int,
    qmin: int,
    qmax: int,
    keep_nonfinite: bool = False,
) -> torch.Tensor:
    r"""
    Per-tensor fake quantization with one static scale: `(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`,
    bit for bit `torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)` on finite inputs.

    A float32 CPU tensor without autograd takes one fused path (~20x faster than the fused fake quantizer on the
    machines measured): one `aminmax` pass that checks the input is finite and small enough for the vectorised
    quantizer, PyTorch's `quantize_per_tensor` (the same `round(x * (1 / scale)) + zp` codes, round half to even),
    the codes clamped to `[qmin, qmax]` in place, and `dequantize` (`(q - zp) * scale`). Everything else (other
    dtypes or devices, autograd, non-finite or huge inputs, ranges beyond 8 bits) runs
    `torch.fake_quantize_per_tensor_affine`.

    Args:
        x (`torch.Tensor`): input.
        scale (`float`): positive finite scale.
        zero_point (`int`): zero-point, in `[qmin, qmax]`.
        qmin (`int`): smallest code.
        qmax (`int`): largest code.
        keep_nonfinite (`bool`, *optional*, defaults to `False`): return NaN/inf elements of `x` unchanged (the
            simulator's rule: a quantizer neither creates non-finite values nor hides upstream ones). `False`
            gives them what `torch.fake_quantize_per_tensor_affine` gives them (finite codes).

    Returns:
        `torch.Tensor` of `x`'s shape and dtype.
    """
    if (
        HAS_QTENSOR
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and not (x.requires_grad and torch.is_grad_enabled())
    ):
        if 0 <= qmin and qmax <= 255:
            dtype, lo, hi = torch.quint8, 0, 255
        elif -128 <= qmin and qmax <= 127:
            dtype, lo, hi = torch.qint8, -128, 127
        else:
            dtype = None
        flat = dense_flat(x) if dtype is not None and lo <= zero_point <= hi else None
        if flat is not None:
            mn, mx = (float(v) for v in torch.aminmax(flat))
            # NaN fails both comparisons, +-inf the second: those inputs take the reference path below
            if mn == mn and mx == mx and max(-mn, mx) * (1.0 / scale) < _FAST_CODE_LIMIT:
                qx = torch.quantize_per_tensor(flat, scale, zero_point, dtype)
                if qmin > lo or qmax < hi:
                    codes = torch.empty(0, dtype=torch.uint8 if dtype == torch.quint8 else torch.int8)
                    codes.set_(qx.untyped_storage(), qx.storage_offset(), qx.size(), qx.stride())
                    codes.clamp_(qmin, qmax)  # shares the QTensor's storage
                return restride(qx.dequantize(), x)
    out = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    if keep_nonfinite:
        return torch.where(torch.isfinite(x), out, x)
    return out


def saturating_code_input(x: torch.Tensor, scale: float) -> torch.Tensor | None:
    r"""
    `x` made safe for an integer quantizer whose float->int32 conversion wraps (`torch.quantize_per_tensor`'s
    vectorised path, a `.to(int)` cast): elements with `|x / scale| >= 2^30` are clamped in float to `+-2^30 * scale`,
    so their codes saturate at `qmax`/`qmin` as `torch.fake_quantize_per_tensor_affine`'s do, instead of wrapping
    (`1e30` became code 0 rather than 255).

    Args:
        x (`torch.Tensor`): input of the quantizer.
        scale (`float`): its positive finite scale.

    Returns:
        `x` itself when nothing needs clamping, a clamped copy otherwise, or `None` when `x` holds NaN or +-inf:
        integer codes cannot carry those, and the callers then run the simulator's arithmetic, which keeps them
        (`fake_quantize_per_tensor(..., keep_nonfinite=True)`) instead of hiding them behind finite codes.
    """
    if x.numel() == 0:
        return x
    flat = dense_flat(x)
    mn, mx = (float(v) for v in torch.aminmax(x if flat is None else flat))
    if not (math.isfinite(mn) and math.isfinite(mx)):
        return None
    if max(-mn, mx) * (1.0 / scale) < _FAST_CODE_LIMIT:
        return x
    lim = _FAST_CODE_LIMIT * scale
    return x.clamp(-lim, lim)


def inv_scale(scale: float) -> float:
    """`1.0f / scale` in float32: the multiplier PyTorch's `fake_quantize_per_tensor_affine` rounds `x * inv` with."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))


def integer_codes(
    x: torch.Tensor, scale: float, zero_point: int, lo: int, hi: int, signed: bool, guard: bool = True
) -> torch.Tensor | None:
    r"""
    `clamp(round(x * (1.0f / scale)) + zero_point, lo, hi)` as plain `int8` (`signed`) or `uint8` codes, in `x`'s
    layout: the codes of `torch.fake_quantize_per_tensor_affine`, which the simulator uses, for an integer kernel.

    One fused `torch.quantize_per_tensor` pass over `x`'s dense memory (no copy or strided loop for channels-last or
    transposed inputs), its storage viewed as plain integers without a copy; the op chain where quantized dtypes are
    gone. With `guard` (default) huge inputs saturate at `lo`/`hi` (`saturating_code_input`) and NaN/+-inf give
    `None`; `guard=False` skips that pass for inputs known finite and bounded (softmax probabilities).

    Args:
        x (`torch.Tensor`): float input.
        scale (`float`): positive finite scale.
        zero_point (`int`): zero-point, within the code dtype's range.
        lo (`int`): smallest code.
        hi (`int`): largest code.
        signed (`bool`): `int8` codes (else `uint8`).
        guard (`bool`, *optional*, defaults to `True`): check for non-finite and huge inputs first.

    Returns:
        The codes, or `None` when `x` holds NaN or +-inf (the callers then run the simulator's arithmetic).
    """
    if guard:
        x = saturating_code_input(x, scale)
        if x is None:
            return None
    full_lo, full_hi, qdtype, dtype = (
        (-128, 127, torch.qint8, torch.int8) if signed else (0, 255, torch.quint8, torch.uint8)
    )
    flat = dense_flat(x) if HAS_QTENSOR and x.dtype == torch.float32 else None
    if flat is None and HAS_QTENSOR and x.dtype == torch.float32:
        flat = x.contiguous().view(-1)
        x = flat.view(x.shape)
    if flat is None:
        return x.mul(inv_scale(scale)).round_().add_(zero_point).clamp_(lo, hi).to(dtype)
    qx = torch.quantize_per_tensor(flat, scale, zero_point, qdtype)
    codes = torch.empty(0, dtype=dtype, device=x.device).set_(
        qx.untyped_storage(), qx.storage_offset(), qx.size(), qx.stride()
    )
    if lo > full_lo or hi < full_hi:
        codes.clamp_(lo, hi)
    return restride(codes, x)


def reshape_for_granularity(w: torch.Tensor, granularity: str, group_size: int = 64) -> torch.Tensor:
    """
    View a weight as `[rows, cols]` where each row shares one scale.

    `per_tensor` gives `[1, numel]`; `per_channel` gives `[out, rest]`; `per_group` gives
    `[out * ceil(rest / group_size), group_size]` (the last group is zero-padded when `rest` is not a multiple).
    """
    if granularity == "per_tensor":
        return w.reshape(1, -1)
    w2 = w.reshape(w.shape[0], -1)
    if granularity == "per_channel":
        return w2
    if granularity == "per_group":
        rest = w2.shape[1]
        pad = (-rest) % group_size
        if pad:
            w2 = torch.nn.functional.pad(w2, (0, pad))
        return w2.reshape(-1, group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def restore_from_granularity(rows: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """Inverse of `reshape_for_granularity` (drops per-group padding)."""
    if granularity == "per_group":
        rows = rows.reshape(shape[0], -1)[:, : int(torch.Size(shape[1:]).numel())]
    return rows.reshape(shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """
    Pack signed codes in `[-8, 7]` two per byte (low nibble first) into a flat `uint8` tensor.

    Args:
        q (`torch.Tensor`): integer-valued tensor with codes in `[-8, 7]`.

    Returns:
        `torch.uint8` tensor of `ceil(numel / 2)` bytes.
    """
    flat = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_int4`: returns `int8` codes in `[-8, 7]`, flat, of length `numel`."""
    low = (packed & 0xF).to(torch.int16)
    high = ((packed >> 4) & 0xF).to(torch.int16)
    flat = torch.stack([low, high], dim=1).reshape(-1)[:numel]
    return torch.where(flat > 7, flat - 16, flat).to(torch.int8)
