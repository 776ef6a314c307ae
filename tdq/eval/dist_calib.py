"""Sharded calibration under `accelerate launch`: merge the observer statistics of all processes before ranges are
frozen.

Each process runs the calibration sampler on its share of the calibration seeds (whole batches, as
`tdq.eval.distributed.shard_batches` cuts them); `merge_observer_stats` then all-reduces, per activation quantizer
and timestep bucket, the observed minimum (MIN), maximum (MAX) and observation count (SUM), and per outlier
`ChannelStats` bucket the per-channel minima/maxima and call counts, so every process freezes the ranges a single
process would freeze on all seeds (min/max are exact under any summation order). The outlier snapshots are gathered
and subsampled deterministically: with outlier handling on (`outliers.handle`), its decisions see a different (but
equally valid, and identical on every process) sample of inputs than one process would.

`calibration_mode` says which configurations can be sharded: min/max activation observers with round-to-nearest
weights and no corrections. Sample-based observers (percentile/MSE), GPTQ/AdaRound/BRECQ and the bias/PTQD
corrections still run `replicated` (every process calibrates on all seeds, the main process's buffers are
broadcast), and the run report names the mode and the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tdq.config import TDQConfig

__all__ = ["calibration_mode", "merge_observer_stats"]


def calibration_mode(config: TDQConfig, num_processes: int) -> tuple[str, str]:
    """
    How calibration runs with `num_processes` processes.

    Args:
        config (`TDQConfig`): the quantization config.
        num_processes (`int`): the process count.

    Returns:
        `tuple[str, str]`: `("single" | "sharded" | "replicated", reason)`.
    """
    if num_processes <= 1:
        return "single", "one process"
    observers = {config.activation.observer}
    observers |= {o.activation["observer"] for o in config.overrides.values() if "observer" in o.activation}
    sample_based = sorted(o for o in observers if o != "minmax")
    if sample_based:
        return "replicated", f"activation observer {sample_based[0]!r} keeps a subsample (not merged yet)"
    wr = config.weight_rounding
    if wr.method != "nearest":
        return "replicated", f"weight_rounding.method={wr.method!r} collects statistics not merged yet"
    if wr.corrections:
        return "replicated", f"weight_rounding.corrections={list(wr.corrections)} are not merged yet"
    if wr.active:
        return "replicated", f"weight_rounding.clip={wr.clip!r} collects statistics not merged yet"
    return "sharded", "min/max observers with round-to-nearest weights"


def _dist():
    import torch.distributed as dist

    return dist


def _all_reduce(t: torch.Tensor, op: str, state: Any) -> torch.Tensor:
    dist = _dist()
    dev = torch.device(state.device)
    dev = dev if dev.type == "cuda" else torch.device("cpu")
    buf = t.to(dev).contiguous()
    dist.all_reduce(
        buf, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    )
    return buf.cpu()


def _act_quantizers(model: nn.Module) -> list:
    from tdq.api import iter_attention_quantizers, iter_quant_layers

    qs = [m.act_quantizer for _, m in iter_quant_layers(model)]
    return qs + [q for _, q in iter_attention_quantizers(model)]


@torch.no_grad()
def merge_observer_stats(model: nn.Module, state: Any) -> int:
    """
    All-reduce the activation observers' statistics (and the outlier channel statistics) of `model` across the
    processes of `state`, in place; every process must call it with the same model structure.

    Observer minima/maxima are reduced with MIN/MAX and counts summed; a bucket no process observed stays empty
    (it is then filled from its nearest neighbour as in one process). `ChannelStats` per-channel ranges and call
    counts are merged the same way; their snapshots (a reservoir sample for the outlier diagnosis) stay each
    process's own.

    Args:
        model (`nn.Module`): a model in calibration (observers attached).
        state (`Accelerator` or `PartialState`): the process group.

    Returns:
        `int`: the number of (quantizer, bucket) statistics merged.

    Raises:
        `ValueError` naming the layer whose observer keeps a subsample (those are not merged).
    """
    quantizers = [q for q in _act_quantizers(model) if q.observers is not None]
    obs = []
    for q in quantizers:
        for o in q.observers:
            if o.needs_samples:
                raise ValueError(
                    f"layer {q.layer_name!r}: observer {type(o).__name__} keeps a subsample and cannot be merged "
                    "across processes; calibrate replicated"
                )
            obs.append(o)
    inf = float("inf")
    mins = torch.tensor([inf if o.min_val is None else float(o.min_val) for o in obs], dtype=torch.float32)
    maxs = torch.tensor([-inf if o.max_val is None else float(o.max_val) for o in obs], dtype=torch.float32)
    counts = torch.tensor([o.count for o in obs], dtype=torch.long)
    mins, maxs, counts = (
        _all_reduce(mins, "min", state),
        _all_reduce(maxs, "max", state),
        _all_reduce(counts, "sum", state),
    )
    for o, mn, mx, n in zip(obs, mins, maxs, counts.tolist(), strict=True):
        o.count = int(n)
        o.min_val = mn.clone() if n > 0 else None
        o.max_val = mx.clone() if n > 0 else None
    for q in quantizers:
        st = getattr(q, "stats", None)
        if st is not None:
            _merge_channel_stats(st, state)
    return len(obs)


def _merge_channel_stats(st, state: Any) -> None:
    seen = [c for c in st.cmax if c is not None]
    width = _all_reduce(torch.tensor([seen[0].numel() if seen else 0]), "max", state)
    c = int(width.item())
    if c == 0:
        return
    inf = float("inf")
    cmin = torch.stack([torch.full((c,), inf) if v is None else v.float() for v in st.cmin])
    cmax = torch.stack([torch.full((c,), -inf) if v is None else v.float() for v in st.cmax])
    calls = torch.tensor(st.calls, dtype=torch.long)
    cmin, cmax, calls = (
        _all_reduce(cmin, "min", state),
        _all_reduce(cmax, "max", state),
        _all_reduce(calls, "sum", state),
    )
    for k in range(st.num_buckets):
        n = int(calls[k])
        st.calls[k] = n
        st.cmin[k] = cmin[k].clone() if n > 0 else None
        st.cmax[k] = cmax[k].clone() if n > 0 else None
    # snapshots: every process's, in process order, then a fixed-seed subsample of `max_snapshots` per bucket, so
    # all processes diagnose the outliers on the same inputs
    parts: list = [None] * int(state.num_processes)
    _dist().all_gather_object(parts, [[s.cpu() for s in ss] for ss in st.snapshots])
    gen = torch.Generator().manual_seed(0)
    for k in range(st.num_buckets):
        pool = [s for part in parts for s in part[k]]
        if len(pool) > st.max_snapshots:
            keep = sorted(torch.randperm(len(pool), generator=gen)[: st.max_snapshots].tolist())
            pool = [pool[i] for i in keep]
        st.snapshots[k] = pool
