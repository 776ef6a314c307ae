"""GPTQ: second-order, column-by-column rounding of a layer's weight onto its existing quantization grid.

For a layer `y = W x` with input Hessian `H = sum x x^T` (from `tdq.rounding.calib_stats`), GPTQ (Frantar et al.,
2023) rounds the columns of `W` one at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian, so the output error `tr(dW H dW^T)` on the calibration inputs is much
smaller than that of rounding every weight to nearest.

The grid is the layer's `WeightQuantizer` grid as it stands (its per-tensor, per-channel or per-group scales and
zero-points are not changed): the layer's weight is replaced by the dequantized GPTQ codes, so the quantizer's
round-to-nearest in the forward pass reproduces them exactly, saved states hold the same codes and integer backends
need nothing special.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tdq.quant import codebook as CB
from tdq.quant import functional as F
from tdq.quant.quantizers import WeightQuantizer

logger = logging.getLogger(__name__)


def column_grid(wq: WeightQuantizer, out: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The scale and zero-point of every weight element in the `[C_out, D]` view of the weight (float32).

    Args:
        wq (`WeightQuantizer`): the layer's weight quantizer.
        out (`int`): C_out.
        cols (`int`): D, the number of input columns.
    """
    g = wq.spec.granularity
    scale, zp = wq.scale.float(), wq.zero_point.float()
    if g == "per_tensor":
        return scale.reshape(1, 1).expand(out, cols), zp.reshape(1, 1).expand(out, cols)
    if g == "per_channel":
        return scale.reshape(out, 1).expand(out, cols), zp.reshape(out, 1).expand(out, cols)
    gs = wq.spec.group_size
    ng = scale.numel() // out
    s = scale.reshape(out, ng).repeat_interleave(gs, dim=1)[:, :cols]
    z = zp.reshape(out, ng).repeat_interleave(gs, dim=1)[:, :cols]
    return s, z


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as `[C_out, D]` (a view of the parameter's data)."""
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def nearest_codes(
    w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Round-to-nearest codes (float tensor of integers) of `w` on the elementwise grid `scale`, `zp`."""
    return F.quantize(w.float(), scale, zp, qmin, qmax)


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr(dW H dW^T)`: the summed squared output error of a weight change `dW` on the inputs behind `H`."""
    dw = dw.to(torch.float64)
    return float(((dw @ hessian.to(torch.float64)) * dw).sum())


def _damped_inverse_chol(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # columns never active: no error propagation through them
    mean = float(diag.mean())
    for attempt in range(6):
        try:
            hd = h + (damp * (10**attempt)) * mean * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            lower = torch.linalg.cholesky(hd)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
    raise RuntimeError("GPTQ: the damped Hessian is not positive definite even with 1e5x damping")


@torch.no_grad()
def gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    GPTQ integer codes of a weight matrix on a fixed elementwise grid (or on per-row codebook levels).

    Args:
        w (`torch.Tensor`): the float weight `[C_out, D]`.
        hessian (`torch.Tensor`): `sum x x^T` of the layer's input rows, `[D, D]`.
        scale (`torch.Tensor`): per-element scale `[C_out, D]` (see `column_grid`).
        zero_point (`torch.Tensor`): per-element zero-point `[C_out, D]`.
        qmin (`int`): smallest code.
        qmax (`int`): largest code.
        damp (`float`, *optional*, defaults to `0.01`): diagonal damping as a fraction of the mean diagonal.
        act_order (`bool`, *optional*, defaults to `False`): process columns by decreasing Hessian diagonal.
        block_size (`int`, *optional*, defaults to `128`): columns per lazy batch update.
        codebook (`torch.Tensor`, *optional*): sorted levels per output row `[C_out, L]`: each column is rounded
            to its row's nearest level instead of the uniform grid (`scale`, `zero_point`, `qmin`, `qmax` unused).

    Returns:
        `torch.Tensor`: float32 integer-valued codes `[C_out, D]` in `[qmin, qmax]` (codebook indices in
        `[0, L - 1]` with `codebook`).
    """
    out, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"GPTQ: Hessian of shape {tuple(hessian.shape)} does not match {cols} weight columns"
        )
    W = w.to(torch.float64).clone()
    S = torch.zeros_like(W) if codebook is not None else scale.to(torch.float64)
    Z = torch.zeros_like(W) if codebook is not None else zero_point.to(torch.float64)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(hessian), descending=True)
        W, S, Z = W[:, perm], S[:, perm], Z[:, perm]
        hessian = hessian[perm][:, perm]
    U = _damped_inverse_chol(hessian, damp)  # upper Cholesky factor of H^-1
    Q = torch.zeros_like(W)
    cb = None if codebook is None else codebook.to(torch.float64).expand(out, -1).contiguous()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            s, z = S[:, i1 + i], Z[:, i1 + i]
            if cb is None:
                q = torch.clamp(torch.round(col / s) + z, qmin, qmax)
                deq = (q - z) * s
            else:
                q = CB.nearest_codes(col.unsqueeze(1), cb)
                deq = CB.lookup(q, cb, torch.float64).squeeze(1)
                q = q.squeeze(1).to(W.dtype)
            Q[:, i1 + i] = q
            err = (col - deq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    return Q.float()


@torch.no_grad()
def set_weight_codes_(module: nn.Module, codes: torch.Tensor) -> None:
    """
    Replace a quantized layer's weight by its dequantized codes (exactly on the grid) and check the round trip.

    Raises `RuntimeError` if the layer's fake quantization would not reproduce the codes bit for bit.
    """
    wq: WeightQuantizer = module.weight_quantizer
    w = module.weight
    out = w.shape[0]
    if wq.has_codebook:
        deq = CB.lookup(codes, wq.codebook, w.dtype)  # the forward's table lookup
    else:
        s, z = column_grid(wq, out, codes.shape[1])
        deq = ((codes - z) * s).to(w.dtype)  # the arithmetic of F.fake_quantize
    w.data.copy_(deq.reshape(w.shape))
    module._wq_cache = None
    if not torch.equal(wq(w.detach()), w.detach()):
        raise RuntimeError(
            f"layer {module.layer_name!r}: weight is not on its quantization grid after rounding"
        )


@torch.no_grad()
def gptq_layer_(
    module: nn.Module,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> dict:
    """
    Round one quantized layer's weight with GPTQ, in place, on its existing grid.

    Args:
        module (`QuantLinear` or `QuantConv2d`): the layer.
        hessian (`torch.Tensor`): its input Hessian `[D, D]`.
        damp, act_order, block_size: see `gptq_codes`.

    Returns:
        `dict`: `method`, output error of round-to-nearest and of GPTQ on the calibration inputs (relative to
        the output energy `tr(W H W^T)`), seconds.
    """
    t0 = time.perf_counter()
    wq: WeightQuantizer = module.weight_quantizer
    w = weight_matrix(module).float()
    out, cols = w.shape
    if wq.has_codebook:
        return _gptq_codebook_layer_(
            module, w, hessian, damp=damp, act_order=act_order, block_size=block_size
        )
    s, z = column_grid(wq, out, cols)
    qmin, qmax = wq.qrange()
    rtn = (nearest_codes(w, s, z, qmin, qmax) - z) * s
    codes = gptq_codes(w, hessian, s, z, qmin, qmax, damp=damp, act_order=act_order, block_size=block_size)
    gq = (codes - z) * s
    energy = max(output_error(w, hessian), 1e-30)
    err_rtn = output_error(rtn - w, hessian) / energy
    err_gptq = output_error(gq - w, hessian) / energy
    if err_gptq > err_rtn:  # can happen on degenerate Hessians; never make a layer worse than nearest
        codes = nearest_codes(w, s, z, qmin, qmax)
        method = "nearest (gptq worse)"
    else:
        method = "gptq"
    set_weight_codes_(module, codes)
    return {
        "method": method,
        "rel_output_error_nearest": err_rtn,
        "rel_output_error": min(err_rtn, err_gptq),
        "seconds": round(time.perf_counter() - t0, 4),
    }


@torch.no_grad()
def _gptq_codebook_layer_(module, w, hessian, *, damp, act_order, block_size) -> dict:
    """GPTQ onto a layer's per-row codebook (`weight.levels` log2/kmeans); a k-means codebook is first refitted
    with each column weighted by the Hessian diagonal (the input second moments), so the levels sit where the
    output error is largest. Per-group codebooks round to nearest (one codebook per column group: not supported)."""
    t0 = time.perf_counter()
    wq: WeightQuantizer = module.weight_quantizer
    note = ""
    if wq.spec.levels == "kmeans" and wq.spec.granularity != "per_group":
        wq.calibrate_(
            module.weight.detach(), element_weights=torch.diagonal(hessian).float().clamp(min=0)[None]
        )
        module._wq_cache = None
        note = ", kmeans weighted by the Hessian diagonal"
    if wq.spec.granularity == "per_group":  # the quantizer's forward rounds to the nearest level
        return {
            "method": f"nearest ({wq.spec.levels} codebook per group: no GPTQ)",
            "seconds": round(time.perf_counter() - t0, 4),
        }
    cb = wq.codebook
    rtn = CB.lookup(CB.nearest_codes(w, cb), cb, torch.float32)
    codes = gptq_codes(
        w, hessian, None, None, 0, 0, damp=damp, act_order=act_order, block_size=block_size, codebook=cb
    )
    gq = CB.lookup(codes, cb, torch.float32)
    energy = max(output_error(w, hessian), 1e-30)
    err_rtn = output_error(rtn - w, hessian) / energy
    err_gptq = output_error(gq - w, hessian) / energy
    if err_gptq > err_rtn:
        codes = CB.nearest_codes(w, cb)
        method = f"nearest (gptq worse, {wq.spec.levels} codebook)"
    else:
        method = f"gptq ({wq.spec.levels} codebook{note})"
    set_weight_codes_(module, codes.long())
    return {
        "method": method,
        "rel_output_error_nearest": err_rtn,
        "rel_output_error": min(err_rtn, err_gptq),
        "seconds": round(time.perf_counter() - t0, 4),
    }
