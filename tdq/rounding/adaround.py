"""AdaRound: learned rounding of each layer's weight, with the timestep-aware activation quantizers in the loop.

For a layer with FP weight `W` (the target) and its quantization grid (`scale`, `zero_point` per element, from the
layer's `WeightQuantizer`, not changed), AdaRound (Nagel et al., 2020) chooses for every weight whether to round
down or up: `W~ = scale * (floor(W / scale) + h(V) - zero_point)` with a rectified sigmoid
`h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`, trained with Adam on

    L = ||W X - W~ X~||^2 / E_start  +  lambda * mean(1 - |2 h - 1|^beta)

where `X` are the layer's inputs in the FP model (FP weights, FP sampler trajectory) and `X~ = Q_act(X)` those inputs
through the layer's own per-timestep-bucket activation quantizer. Upstream layers stay in floating point: collecting
`X~` from the quantized model (upstream layers rounded, layers fitted to each other's rounding) lowered every layer's
error and still made the whole model worse than round-to-nearest; FP-model statistics (what GPTQ uses) do not.
`beta` is annealed from 20 to 2 after a warm-up without the regulariser, so the `h` end at 0 or 1; the final codes
are `h >= 0.5`.

The loss is a quadratic form in `W~`, so it is computed from three input moment matrices per layer
(`sum X~ X~^T`, `sum X X~^T`, `sum X X^T`, collected by [`collect_paired_stats`] through the real sampler on the
calibration seeds, every call of every timestep bucket, i.e. weighted by step occupancy) and no activation is kept:
one `[C_out, D] x [D, D]` product per iteration. This is per-layer reconstruction; block-level reconstruction
through the non-linearities is `tdq.rounding.brecq`.

`reconstruct_` runs it on a rounded (GPTQ or round-to-nearest) and activation-calibrated model, starting from its
current codes, and recalibrates the activations afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tdq.api import calibrate, get_quantization, iter_quant_layers
from tdq.quant.quantizers import WeightQuantizer
from tdq.rounding.calib_stats import fp_run_buckets, layer_input_rows, own_act_quant, supports_stats
from tdq.rounding.gptq import column_grid, nearest_codes, set_weight_codes_, weight_matrix

logger = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


@dataclass
class PairedStats:
    r"""
    Input moments of one layer on paired calls (the FP model and the quantized model on the same sampler input).

    Args:
        hqq (`torch.Tensor`): `sum x~ x~^T` of the quantized layer's input rows (after its activation quantizer and
            smoothing), float64 `[D, D]`.
        hfq (`torch.Tensor`): `sum x x~^T` (FP-model rows times quantized rows), float64 `[D, D]`.
        hff (`torch.Tensor`): `sum x x^T` of the FP model's rows, float64 `[D, D]`.
        count (`int`): number of rows summed.
    """

    hqq: torch.Tensor
    hfq: torch.Tensor
    hff: torch.Tensor
    count: int = 0


@torch.no_grad()
def collect_paired_stats(
    model: nn.Module,
    run: Callable[[], object],
    fp_weights: dict[str, torch.Tensor],
    *,
    max_rows: int = 512,
    seed: int = 0,
) -> dict[str, PairedStats]:
    """
    Run the sampler over the FP model and collect, per layer, the moments of its FP input `x` and of `x~`, that input
    through the layer's own (calibrated, per-timestep-bucket) activation quantizer.

    Every layer sees the FP model's inputs (FP weights everywhere, FP sampler trajectory), so a layer's statistics do
    not depend on how any other layer was rounded: the statistics GPTQ uses, with the layer's activation quantizer in
    the loop. (Collecting them from the quantized model, upstream layers rounded, made the whole model worse although
    each layer's error fell.)

    Args:
        model (`nn.Module`): a quantized model with calibrated activation quantizers.
        run (`Callable[[], object]`): runs the real sampler over `model` (calibration seeds).
        fp_weights (`dict[str, torch.Tensor]`): each layer's weight before rounding (the FP pass uses them).
        max_rows (`int`, *optional*, defaults to `512`): input rows sampled per layer and call (fixed seed), to
            bound the cost of the moment products on large feature maps.
        seed (`int`, *optional*, defaults to `0`): row-sampling seed.

    Returns:
        `dict[str, PairedStats]`: per layer that `supports_stats`.
    """
    layers = {
        n: m for n, m in iter_quant_layers(model) if supports_stats(m) and m.weight_quantizer.spec.enabled
    }
    stats: dict[str, PairedStats] = {}
    gen = torch.Generator().manual_seed(seed)
    handles = []
    try:
        with fp_run_buckets(model, fp_weights) as ctx:

            def layer_hook(name: str):
                def hook(mod, args):
                    x = mod.smooth_input(args[0].detach())
                    xq = own_act_quant(mod, x, ctx)
                    rf = layer_input_rows(mod, x).float()
                    rq = layer_input_rows(mod, xq).float()
                    if rf.shape[0] > max_rows:
                        idx = torch.randperm(rf.shape[0], generator=gen)[:max_rows].to(rf.device)
                        rf, rq = rf[idx], rq[idx]
                    st = stats.get(name)
                    if st is None:
                        d = rf.shape[1]
                        z = torch.zeros(d, d, dtype=torch.float64, device=rf.device)
                        st = stats[name] = PairedStats(hqq=z, hfq=z.clone(), hff=z.clone())
                    st.hqq += (rq.T @ rq).double()
                    st.hfq += (rf.T @ rq).double()
                    st.hff += (rf.T @ rf).double()
                    st.count += rf.shape[0]
                    return None

                return hook

            handles = [m.register_forward_pre_hook(layer_hook(n)) for n, m in layers.items()]
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


def recalibrate_(model: nn.Module, run: Callable[[], object], seed: int = 0) -> dict[str, list[int]]:
    """
    Calibrate the activations again without touching the weights: the outlier smoothing already chosen is kept
    (not re-chosen, which would restore and re-round the weights) and so are the 16-bit fallback cells; the
    diagnosis (and a clipping search, if configured) runs again.

    Returns:
        The buckets filled from neighbours, as `tdq.calibrate` returns them.
    """
    cfg = get_quantization(model).config.outliers
    old = cfg.smoothing, cfg.fallback
    # the 16-bit fallback cells of the first calibration stay as they are (a second pass would add up to
    # `max_fallback_fraction` more on top of them)
    cfg.smoothing, cfg.fallback = False, False
    try:
        return calibrate(model, run, seed=seed)
    finally:
        cfg.smoothing, cfg.fallback = old


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inv_rect_sigmoid(h: torch.Tensor) -> torch.Tensor:
    h = h.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def _quad_error(wt: torch.Tensor, hqq: torch.Tensor, b: torch.Tensor, c: float) -> float:
    """`||W X - W~ X~||^2` from the moments: `tr(W~ Hqq W~^T) - 2 tr(W~ B^T) + c` with `B = W Hfq`."""
    wt = wt.double()
    return float(((wt @ hqq) * wt).sum() - 2.0 * (wt * b).sum() + c)


def adaround_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    hqq: torch.Tensor,
    hfq: torch.Tensor,
    hff: torch.Tensor,
    *,
    init_codes: torch.Tensor | None = None,
    iters: int = 500,
    reg_weight: float = 10.0,
    lr: float = 0.1,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
) -> tuple[torch.Tensor, dict]:
    r"""
    AdaRound codes of a weight matrix on a fixed elementwise grid, minimising `||W X - W~ X~||^2` from input moments.

    Each weight may take the code `floor(w / scale) + zero_point` or the one above; where `init_codes` (e.g. from
    GPTQ) differ from both, the pair around the initial code is used. Codes outside `[qmin, qmax]` stay clamped.

    Args:
        w (`torch.Tensor`): the FP weight `[C_out, D]` (the target).
        scale, zero_point (`torch.Tensor`): per-element grid `[C_out, D]` (see `column_grid`).
        qmin, qmax (`int`): code range.
        hqq, hfq, hff (`torch.Tensor`): input moments `[D, D]` (see [`PairedStats`]); with FP inputs on both sides
            pass the input Hessian three times.
        init_codes (`torch.Tensor`, *optional*): starting codes; defaults to round-to-nearest.
        iters (`int`, *optional*, defaults to `500`): Adam iterations.
        reg_weight (`float`, *optional*, defaults to `10.0`): regulariser weight (the reconstruction term is
            normalised by the error of the starting codes, the regulariser is a mean over the free weights).
        lr (`float`, *optional*, defaults to `0.1`): Adam learning rate on `V`.
        warmup (`float`, *optional*, defaults to `0.2`): fraction of iterations without the regulariser.
        beta (`tuple[float, float]`, *optional*, defaults to `(20, 2)`): regulariser exponent, annealed.

    Returns:
        `(codes, info)`: float32 integer-valued codes `[C_out, D]`, and `info` with the output error of the starting
        codes (`error_init`) and of the result (`error`), and `binary_fraction` (share of free `h` within 1e-3 of
        0 or 1 at the end of training).
    """
    w = w.float()
    s, z = scale.float(), zero_point.float()
    rtn = nearest_codes(w, s, z, qmin, qmax)
    init_codes = rtn if init_codes is None else init_codes.float()
    fl = torch.floor(w / s) + z
    base = torch.minimum(torch.maximum(fl, init_codes - 1), init_codes)  # init in {base, base + 1}
    free = (base >= qmin) & (base <= qmax - 1)
    fixed_code = torch.where(free, base, init_codes)
    if bool((init_codes == rtn).all()):
        h0 = (w / s + z - base).clamp(0, 1)  # nearest start: the fractional part (AdaRound's initialisation)
    else:
        h0 = 0.25 + 0.5 * (init_codes - base)  # a hard start, softened so it can still move
    hqq32, b = hqq.float(), (w.double() @ hfq.double()).float()
    c = float(((w.double() @ hff.double()) * w.double()).sum())
    wt_init = (init_codes - z) * s
    err_init = _quad_error(wt_init, hqq.double(), b.double(), c)
    norm = max(err_init, 1e-12 * max(c, 1e-30), 1e-30)
    v = _inv_rect_sigmoid(h0).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    n_free = max(1, int(free.sum()))
    warm = int(warmup * iters)
    b0, b1 = beta
    for it in range(iters):
        with torch.no_grad():
            sig = torch.sigmoid(v)
            pre = sig * (ZETA - GAMMA) + GAMMA
            h = pre.clamp(0.0, 1.0)
            wt = torch.where(free, (base + h - z) * s, (fixed_code - z) * s)
            grad_w = (2.0 / norm) * (wt @ hqq32 - b)
            grad_h = grad_w * s
            if it >= warm:
                frac = (it - warm) / max(1, iters - warm - 1)
                bt = b0 + (b1 - b0) * frac
                u = 2.0 * h - 1.0
                grad_h = grad_h + (reg_weight / n_free) * (
                    -bt * u.abs().clamp(min=1e-12).pow(bt - 1) * torch.sign(u) * 2.0
                )
            grad_v = grad_h * (ZETA - GAMMA) * sig * (1 - sig) * ((pre > 0) & (pre < 1)) * free
        v.grad = grad_v
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        h = _rect_sigmoid(v)
        binary = float(((h[free] < 1e-3) | (h[free] > 1 - 1e-3)).float().mean()) if bool(free.any()) else 1.0
        codes = torch.where(free, base + (h >= 0.5).float(), fixed_code).clamp(qmin, qmax)
        err = _quad_error((codes - z) * s, hqq.double(), b.double(), c)
    return codes, {"error_init": err_init, "error": err, "binary_fraction": binary, "energy": c}


@torch.no_grad()
def adaround_layer_(
    module: nn.Module,
    w_fp: torch.Tensor,
    stats: PairedStats,
    *,
    iters: int = 500,
    reg_weight: float = 10.0,
    lr: float = 0.1,
) -> dict:
    """
    AdaRound one quantized layer's weight in place on its existing grid, starting from its current codes.

    Args:
        module (`QuantLinear` or `QuantConv2d`): the layer (its weight on its grid, e.g. after GPTQ, or float).
        w_fp (`torch.Tensor`): the layer's FP weight (the target), same shape as `module.weight`.
        stats (`PairedStats`): its paired input moments.
        iters, reg_weight, lr: see `adaround_codes`.

    Returns:
        `dict`: `method` (`"adaround"`, or `"<start> (adaround worse)"` when the result did not beat the start),
        relative output errors of the start and the result (over `||W X||^2`), `binary_fraction`, seconds.
    """
    t0 = time.perf_counter()
    wq: WeightQuantizer = module.weight_quantizer
    w = w_fp.reshape(w_fp.shape[0], -1).float()
    out, cols = w.shape
    s, z = column_grid(wq, out, cols)
    qmin, qmax = wq.qrange()
    init = nearest_codes(weight_matrix(module).float(), s, z, qmin, qmax)
    with torch.enable_grad():
        codes, info = adaround_codes(
            w, s, z, qmin, qmax, stats.hqq, stats.hfq, stats.hff, init_codes=init, iters=iters,
            reg_weight=reg_weight, lr=lr,
        )  # fmt: skip
    energy = max(info["energy"], 1e-30)
    if info["error"] <= info["error_init"]:
        set_weight_codes_(module, codes)
        method = "adaround"
    else:
        set_weight_codes_(module, init)
        method = "start kept (adaround worse)"
    return {
        "method": method,
        "rel_output_error_start": info["error_init"] / energy,
        "rel_output_error": min(info["error"], info["error_init"]) / energy,
        "binary_fraction": info["binary_fraction"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def reconstruct_(
    model: nn.Module,
    run: Callable[[], object],
    fp_weights: dict[str, torch.Tensor],
    *,
    iters: int = 500,
    reg_weight: float = 10.0,
    max_rows: int = 512,
    recalibrate: bool = True,
    seed: int = 0,
) -> dict:
    """
    AdaRound every quantized layer of a rounded, activation-calibrated model, then recalibrate its activations.

    Args:
        model (`nn.Module`): a quantized model, weights rounded (its codes are the starting point) and activations
            calibrated (the activation quantizers are in the loop).
        run (`Callable[[], object]`): runs the real sampler over `model` on the calibration seeds.
        fp_weights (`dict[str, torch.Tensor]`): each layer's weight before rounding (the target).
        iters, reg_weight: see `adaround_codes`.
        max_rows (`int`, *optional*, defaults to `512`): see `collect_paired_stats`.
        recalibrate (`bool`, *optional*, defaults to `True`): calibrate the activations again on the new weights
            (`recalibrate_`: the chosen outlier smoothing is kept).
        seed (`int`, *optional*, defaults to `0`): row-sampling and observer seed.

    Returns:
        `dict`: seconds for the paired statistics, the optimisation and the recalibration; per layer the entry of
        `adaround_layer_`; `mean_binary_fraction`; `filled_buckets` of the recalibration.
    """
    t0 = time.perf_counter()
    pstats = collect_paired_stats(model, run, fp_weights, max_rows=max_rows, seed=seed)
    t_stats = time.perf_counter() - t0
    layers: dict[str, dict] = {}
    t1 = time.perf_counter()
    for name, m in iter_quant_layers(model):
        st = pstats.get(name)
        if st is None or name not in fp_weights:
            continue
        layers[name] = adaround_layer_(m, fp_weights[name], st, iters=iters, reg_weight=reg_weight)
    t_opt = time.perf_counter() - t1
    t2 = time.perf_counter()
    filled = recalibrate_(model, run, seed=seed) if recalibrate else {}
    fr = [e["binary_fraction"] for e in layers.values()]
    return {
        "iters": iters,
        "reg_weight": reg_weight,
        "seconds_paired_statistics": round(t_stats, 3),
        "seconds_optimisation": round(t_opt, 3),
        "seconds_recalibration": round(time.perf_counter() - t2, 3),
        "mean_binary_fraction": sum(fr) / len(fr) if fr else math.nan,
        "filled_buckets": filled,
        "layers": layers,
    }
