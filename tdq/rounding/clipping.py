"""Per-row clipping search for weight quantizers: the range that minimises the weight or output error.

Each row of the weight quantizer (an output channel, a group, or the whole tensor) gets the clipping range
`r * [min, max]` of its weights, `r` from a grid of candidates, that minimises either the squared weight error
(`objective="weight_mse"`) or the squared output error on calibration inputs (`objective="output_mse"`:
`dw H dw^T` with the layer's input Hessian `H`; per-group rows use the diagonal block of `H` of their columns).
The search writes the quantizer's `min_val`/`max_val`, so scales still follow from the stored range and the bit
width, and it never returns a range with a larger error than the full min-max range (`r = 1` is a candidate).
"""

from __future__ import annotations

import torch
from torch import nn

from tdq.quant import functional as F
from tdq.quant.quantizers import WeightQuantizer

OBJECTIVES = ("weight_mse", "output_mse")


def _row_errors(rows_err: torch.Tensor, wq: WeightQuantizer, out: int, cols: int, hessian) -> torch.Tensor:
    """Per quantizer row, the error of `rows_err` (the error in the quantizer's row layout) -> `[R]`."""
    if hessian is None:
        return rows_err.pow(2).sum(1)
    g = wq.spec.granularity
    if g == "per_tensor":
        dw = rows_err.reshape(out, cols)
        return ((dw @ hessian) * dw).sum().reshape(1)
    if g == "per_channel":
        return ((rows_err @ hessian) * rows_err).sum(1)
    gs = wq.spec.group_size
    ng = rows_err.shape[0] // out
    pad = ng * gs - cols
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad)) if pad else hessian
    blocks = torch.stack([h[i * gs : (i + 1) * gs, i * gs : (i + 1) * gs] for i in range(ng)])  # [ng, gs, gs]
    e = rows_err.reshape(out, ng, gs)
    return torch.einsum("ogi,gij,ogj->og", e, blocks, e).reshape(-1)


@torch.no_grad()
def search_clipping_(
    module: nn.Module,
    hessian: torch.Tensor | None = None,
    *,
    objective: str = "output_mse",
    num_candidates: int = 50,
    min_ratio: float = 0.3,
) -> dict:
    """
    Search each quantizer row's clipping range and store it in the layer's `WeightQuantizer`.

    Args:
        module (`QuantLinear` or `QuantConv2d`): the layer (its current weight is what is quantized).
        hessian (`torch.Tensor`, *optional*): input Hessian `[D, D]`; required for `objective="output_mse"`.
        objective (`str`, *optional*, defaults to `"output_mse"`): `"weight_mse"` or `"output_mse"`.
        num_candidates (`int`, *optional*, defaults to `50`): ratios in `[min_ratio, 1]`.
        min_ratio (`float`, *optional*, defaults to `0.3`): the smallest ratio tried.

    Returns:
        `dict`: the error before (min-max range) and after the search, summed over rows, and the mean ratio.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"clipping objective={objective!r} is unknown; choose one of {list(OBJECTIVES)}")
    if objective == "output_mse" and hessian is None:
        raise ValueError(
            f"layer {module.layer_name!r}: objective='output_mse' needs the layer's input Hessian"
        )
    wq: WeightQuantizer = module.weight_quantizer
    w = module.weight.detach().float()
    out = w.shape[0]
    cols = w[0].numel()
    h = None if objective == "weight_mse" else hessian.float()
    rows = F.reshape_for_granularity(w, wq.spec.granularity, wq.spec.group_size)
    mn = rows.amin(dim=1, keepdim=True)
    mx = rows.amax(dim=1, keepdim=True)
    bits = int(wq.bits)
    qmin, qmax = F.qrange(bits, wq.spec.symmetric)
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_mn, best_mx = mn.clone(), mx.clone()
    first_err = None
    ratios = torch.linspace(1.0, min_ratio, num_candidates).tolist()
    for r in ratios:
        cmn, cmx = mn * r, mx * r
        scale, zp = F.scale_zero_point(cmn, cmx, bits, wq.spec.symmetric)
        err_rows = F.dequantize(F.quantize(rows, scale, zp, qmin, qmax), scale, zp) - rows
        err = _row_errors(err_rows, wq, out, cols, h)
        if first_err is None:
            first_err = err.clone()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_mn = torch.where(better.view(-1, 1), cmn, best_mn)
        best_mx = torch.where(better.view(-1, 1), cmx, best_mx)
    wq.min_val.copy_(best_mn)
    wq.max_val.copy_(best_mx)
    wq._update_scale()
    module._wq_cache = None
    ratio = torch.where(mx.abs() > 0, best_mx / mx, torch.ones_like(mx))
    return {
        "objective": objective,
        "error_minmax": float(first_err.sum()),
        "error": float(best_err.sum()),
        "mean_ratio": float(ratio.mean()),
    }
