"""Calibration statistics of each quantized layer's input, collected from the FP model through the real sampler.

For a layer with weight rows `W [C_out, D]` (a convolution's input is unfolded into its `D = C_in * kh * kw`
patch columns) the statistics are the input Hessian `H = sum x x^T` over every input row `x` the layer saw, the
row count, and per timestep bucket the mean input row (for bias correction). Rows come from every denoiser call
of the sampler run, so each timestep bucket enters `H` in proportion to how many sampler steps fall in it (its
step occupancy).

The run happens inside `tdq.disabled(model)`: every layer computes in floating point with the weights it has at
that moment, so collecting before rounding gives FP-model statistics (what the prototype found works best).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import nn

from tdq.api import disabled, get_quantization, iter_quant_layers
from tdq.hooks import TimestepHook
from tdq.quant.modules import QuantConv2d, QuantLinear
from tdq.quant.quantizers import TimestepContext

logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    r"""
    Input statistics of one layer.

    Args:
        hessian (`torch.Tensor`): `sum x x^T`, float64 `[D, D]`.
        count (`int`): number of input rows summed.
        bucket_sum (`torch.Tensor`): per bucket the sum of input rows, float64 `[K, D]`.
        bucket_count (`torch.Tensor`): per bucket the number of rows, int64 `[K]`.
    """

    hessian: torch.Tensor
    count: int = 0
    bucket_sum: torch.Tensor | None = None
    bucket_count: torch.Tensor | None = None
    calls_per_bucket: list[int] = field(default_factory=list)

    def mean_hessian(self) -> torch.Tensor:
        """`H / count` (the second moment of the input rows)."""
        return self.hessian / max(1, self.count)

    def bucket_means(self) -> torch.Tensor:
        """Per-bucket mean input row, float64 `[K, D]` (zero for buckets that saw nothing)."""
        return self.bucket_sum / self.bucket_count.clamp(min=1).unsqueeze(1).to(self.bucket_sum.dtype)


def layer_input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """
    The rows `x` that the layer's weight rows multiply: `[N, D]` with `D = weight[0].numel()`.

    Linear: the input's last dimension. Conv2d (`groups=1`, zero padding): the unfolded patches, in the column
    order of `weight.reshape(C_out, -1)`.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise NotImplementedError(
                f"layer {getattr(module, 'layer_name', '')!r}: input statistics need groups=1 and numeric zero "
                "padding"
            )
        cols = TF.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # [B, D, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise TypeError(f"no input rows for {type(module).__name__}")


def supports_stats(module: nn.Module) -> bool:
    """Whether `layer_input_rows` handles this module."""
    if isinstance(module, QuantLinear):
        return True
    if isinstance(module, QuantConv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module, run: Callable[[], object], layers: list[str] | None = None
) -> dict[str, LayerStats]:
    """
    Run `run()` (the real sampler over the quantized model) in floating point and collect each layer's input stats.

    Args:
        model (`nn.Module`): a model quantized by `tdq.quantize_`.
        run (`Callable[[], object]`): runs the sampler (e.g. `lambda: sampler(calib_seeds)`).
        layers (`list[str]`, *optional*): layer names; defaults to every quantized layer `supports_stats` handles.

    Returns:
        `dict[str, LayerStats]`: per layer name.
    """
    state = get_quantization(model)
    mods = dict(iter_quant_layers(model))
    names = [n for n in (layers or list(mods)) if supports_stats(mods[n])]
    k = state.grid.num_buckets
    # A private context and hook: the bucket of every call is known while the layers run in floating point.
    ctx = TimestepContext(k)
    stats: dict[str, LayerStats] = {}
    handles = []
    calls = [0] * k

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args):
            rows = layer_input_rows(mod, args[0].detach()).float()
            d = rows.shape[1]
            st = stats.get(name)
            if st is None:
                st = stats[name] = LayerStats(
                    hessian=torch.zeros(d, d, dtype=torch.float64, device=rows.device),
                    bucket_sum=torch.zeros(k, d, dtype=torch.float64, device=rows.device),
                    bucket_count=torch.zeros(k, dtype=torch.int64, device=rows.device),
                )
            # float32 products per call (fast), accumulated in float64 across calls
            st.hessian += (rows.T @ rows).double()
            st.count += rows.shape[0]
            rows = rows.double()
            if ctx.bucket is not None:
                st.bucket_sum[ctx.bucket] += rows.sum(0)
                st.bucket_count[ctx.bucket] += rows.shape[0]
            else:  # per-sample buckets: rows are sample-major
                b = ctx.buckets.to(rows.device)
                per = rows.shape[0] // max(1, args[0].shape[0])
                rb = (
                    b.repeat_interleave(rows.shape[0] // b.shape[0])
                    if rows.shape[0] % b.shape[0] == 0
                    else None
                )
                if rb is None:
                    raise RuntimeError(f"layer {name!r}: cannot assign {per} rows per sample to buckets")
                st.bucket_sum.index_add_(0, rb, rows)
                st.bucket_count += torch.bincount(rb, minlength=k)

        return hook

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(make_hook(n, mods[n])))

    def count_call(mod, args, kwargs):
        # own mapping: a diffusers ModelHook (the TimestepHook) may run after torch pre-hooks
        bucket, buckets = hook.bucket_of(state.adapter.read(args, kwargs, type(mod).__name__))
        if bucket is not None:
            calls[bucket] += 1
        return None

    with disabled(model):
        hook = TimestepHook(model, state.adapter, state.grid, ctx)
        counter = model.register_forward_pre_hook(count_call, with_kwargs=True)
        try:
            run()
        finally:
            counter.remove()
            hook.remove()
            for h in handles:
                h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        logger.warning("layers saw no input during the statistics run: %s", missing[:5])
    for st in stats.values():
        st.calls_per_bucket = list(calls)
    return stats


def smoothed_stats(st: LayerStats, module: nn.Module) -> LayerStats:
    """
    `st` in the coordinates of a smoothed layer (`act_smooth = s`, weight `W * s`, input `x / s`): `H` becomes
    `D^-1 H D^-1` and the bucket sums `sum / D`, with `D` the per-column factor (`s` repeated over a convolution's
    kernel positions). The statistics of an unsmoothed layer are returned as they are.
    """
    s = module._buffers.get("act_smooth")
    if s is None:
        return st
    w = module.weight
    d = s.double().to(st.hessian.device).repeat_interleave(w[0, 0].numel() if w.dim() > 2 else 1)
    inv = 1.0 / d
    return LayerStats(
        hessian=st.hessian * inv.unsqueeze(0) * inv.unsqueeze(1),
        count=st.count,
        bucket_sum=None if st.bucket_sum is None else st.bucket_sum * inv.unsqueeze(0),
        bucket_count=st.bucket_count,
        calls_per_bucket=list(st.calls_per_bucket),
    )


@contextmanager
def fp_run_buckets(
    model: nn.Module, fp_weights: dict[str, torch.Tensor] | None = None
) -> Iterator[TimestepContext]:
    """
    Context manager: run the model in floating point (FP weights) while the timestep bucket of every call is known.

    Inside, the quantized model computes in floating point (`tdq.disabled`), each layer named in `fp_weights` holds
    that weight (restored on exit), and the yielded private `TimestepContext` carries the bucket(s) of the denoiser
    call in progress, so hooks can apply a layer's own activation quantizer to its FP input (`own_act_quant`).
    """
    state = get_quantization(model)
    mods = dict(iter_quant_layers(model))
    saved = {n: mods[n].weight.data for n in (fp_weights or {}) if n in mods}
    ctx = TimestepContext(state.grid.num_buckets)
    with disabled(model):
        hook = TimestepHook(model, state.adapter, state.grid, ctx)
        try:
            for n in saved:
                mods[n].weight.data = fp_weights[n].to(mods[n].weight.dtype)
                mods[n]._wq_cache = None
            yield ctx
        finally:
            hook.remove()
            for n, w in saved.items():
                mods[n].weight.data = w
                mods[n]._wq_cache = None


def own_act_quant(module: nn.Module, x: torch.Tensor, ctx: TimestepContext) -> torch.Tensor:
    """
    `module`'s activation quantizer applied to `x` (already smoothed) at the bucket(s) published in `ctx`, while the
    model otherwise runs in floating point (see `fp_run_buckets`).
    """
    qctx = module.context
    old = qctx.active, qctx.bucket, qctx.buckets
    qctx.active = True
    qctx.set(ctx.bucket, ctx.buckets)
    try:
        return module.act_quantizer(x)
    finally:
        qctx.active = old[0]
        qctx.set(old[1], old[2])
