"""Non-uniform weight levels: per-row codebooks (`QuantSpec.levels`), fitted deterministically.

A codebook row holds the `2^bits` levels (sorted, non-decreasing) that one row of the weight (an output channel, a
group, or the whole tensor, per `QuantSpec.granularity`) may take; a weight element is stored as the index of its
nearest level (`uint8`, packed two per byte at <= 4 bits) and dequantized by a table lookup, `codebook[row, code]`.

- `"log2"`: sign + exponent, `±scale * 2^-e` for `e = 0 .. 2^(bits-1) - 2`, and `0` (the largest exponent code
  of either sign means zero, so `0` appears twice). `scale` is the row's largest magnitude (`minmax` observer) or
  the candidate with the least squared error (`mse` observer).
- `"kmeans"`: Lloyd-Max levels fitted to the row's values (optionally weighted per element, e.g. by the layer's
  input second moments, the GPTQ Hessian diagonal), initialised at the row's quantiles, a fixed number of
  iterations: deterministic for given weights.

The integer kernels (oneDNN int8, `_int_mm`) need uniform levels; layers with a codebook run the lookup-table
dequantize path of `tdq.quant.backends.weight_only`.
"""

from __future__ import annotations

import torch

LEVELS = ("uniform", "log2", "kmeans")

# Lloyd iterations of the k-means fit (fixed: the result is a deterministic function of the weights).
KMEANS_ITERS = 25
# Scale candidates `r * max|w|` searched by the `mse` observer for log2 levels.
LOG2_SCALE_CANDIDATES = torch.linspace(0.5, 1.0, 26).tolist()


def log2_levels(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """
    The sorted log2 codebook `[rows, 2^bits]` for per-row scales `scale` (`[rows, 1]`).

    Args:
        scale (`torch.Tensor`): positive per-row scales `[rows, 1]`.
        bits (`int`): bit-width (sign + `bits - 1` exponent bits).
    """
    n = 2 ** (bits - 1)  # exponent codes per sign; the last one is zero
    mags = torch.cat([2.0 ** -torch.arange(n - 1, dtype=torch.float32), torch.zeros(1)]).to(scale.device)
    pos = scale.float() * mags.unsqueeze(0)  # [rows, n], decreasing
    # -s .. -s/2^(n-2), 0, 0, s/2^(n-2) .. s (`+ 0.0` turns -0.0 into +0.0)
    return torch.cat([-pos, pos.flip(1)], dim=1) + 0.0


def nearest_codes(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """
    Index of the nearest level of each element (ties to the lower level), `int64` of `rows`' shape.

    NaN maps to the last level, +-inf to the end levels: every index is in range.

    Args:
        rows (`torch.Tensor`): values `[rows, cols]`.
        codebook (`torch.Tensor`): sorted levels `[rows, L]` (or `[1, L]`, shared).
    """
    cb = codebook.to(rows.dtype)
    mid = ((cb[:, 1:] + cb[:, :-1]) / 2).contiguous()
    if mid.shape[0] != rows.shape[0]:
        mid = mid.expand(rows.shape[0], -1).contiguous()
    idx = torch.searchsorted(mid, rows.contiguous())
    return idx.clamp_(0, codebook.shape[1] - 1)


def lookup(codes: torch.Tensor, codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codebook[row, code]` in `dtype`: the dequantized rows (the simulator's and every backend's arithmetic)."""
    cb = codebook.to(dtype)
    if cb.shape[0] != codes.shape[0]:
        cb = cb.expand(codes.shape[0], -1)
    return torch.gather(cb, 1, codes.long())


@torch.no_grad()
def fit_log2(rows: torch.Tensor, bits: int, search: bool) -> torch.Tensor:
    """Log2 codebook per row: scale `max|w|` or, with `search`, the candidate `r * max|w|` of least MSE (NaN/inf
    weights are ignored by the fit)."""
    rows = torch.nan_to_num(rows.float(), nan=0.0, posinf=0.0, neginf=0.0)
    amax = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    if not search:
        return log2_levels(amax, bits)
    best, best_err = None, None
    for r in LOG2_SCALE_CANDIDATES:
        cb = log2_levels(amax * r, bits)
        err = (lookup(nearest_codes(rows, cb), cb, rows.dtype) - rows).pow(2).sum(1, keepdim=True)
        if best is None:
            best, best_err = cb, err
        else:
            better = err < best_err
            best = torch.where(better, cb, best)
            best_err = torch.where(better, err, best_err)
    return best


@torch.no_grad()
def fit_kmeans(
    rows: torch.Tensor, bits: int, weights: torch.Tensor | None = None, iters: int = KMEANS_ITERS
) -> torch.Tensor:
    """
    Lloyd-Max (1-D k-means) codebook per row, `[rows, 2^bits]`, sorted.

    Args:
        rows (`torch.Tensor`): the weight rows `[rows, cols]`.
        bits (`int`): bit-width; `2^bits` levels.
        weights (`torch.Tensor`, *optional*): non-negative importance per element, broadcastable to `rows`
            (e.g. the Hessian diagonal per column, `[1, cols]`); uniform when omitted.
        iters (`int`, *optional*): Lloyd iterations.

    Returns:
        `torch.Tensor` float32 `[rows, 2^bits]`, non-decreasing along dim 1. Levels of empty cells keep their
        previous value; a constant row gets all levels equal to its value.
    """
    x = rows.detach().float()
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    n_levels = 2**bits
    h = torch.ones_like(x) if weights is None else weights.float().expand_as(x).clamp(min=0.0)
    h = h + 1e-12  # every element counts a little: no empty weighted cell where values exist
    q = (torch.arange(n_levels, dtype=torch.float32, device=x.device) + 0.5) / n_levels
    cb = torch.quantile(x, q, dim=1).t().contiguous()  # quantile init [rows, L]
    for _ in range(iters):
        idx = nearest_codes(x, cb)
        num = torch.zeros_like(cb).scatter_add_(1, idx, x * h)
        den = torch.zeros_like(cb).scatter_add_(1, idx, h)
        cb = torch.where(den > 0, num / den.clamp(min=1e-30), cb)
        cb = torch.sort(cb, dim=1).values
    return cb


def check_codebook(codebook: torch.Tensor, rows: int, bits: int, what: str) -> str:
    """An empty string if `codebook` is a usable `[rows, 2^bits]` sorted finite float table, else why not."""
    if not codebook.dtype.is_floating_point:
        return f"{what} has dtype {codebook.dtype}; a codebook holds floats"
    if tuple(codebook.shape) != (rows, 2**bits):
        return f"{what} has shape {list(codebook.shape)}, expected {[rows, 2**bits]} ({bits}-bit levels)"
    if not bool(torch.isfinite(codebook).all()):
        return f"{what} holds NaN/inf; levels must be finite"
    if codebook.shape[1] > 1 and not bool((codebook[:, 1:] >= codebook[:, :-1]).all()):
        return f"{what} is not sorted; levels must be non-decreasing along each row"
    return ""
