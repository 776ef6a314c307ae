"""What a precision schedule costs: integer weight bytes and bit-operations (BOPs) per denoiser call.

BOPs follow the usual definition for mixed-precision networks, `MACs × activation bits × weight bits` per layer,
here averaged over timestep buckets by the sampler's step occupancy (each step runs one bucket's bit-widths).
They are a cost model, not a measurement: tdq's integer backends run 8-bit kernels only. A float cell (activation
bits >= 16: the input kept in floating point) runs a float matmul and counts `MACs × 32 × 32`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tdq.mixed_precision.schedule import FLOAT_BITS, PrecisionSchedule

__all__ = ["effective_average_bits", "schedule_costs"]


def _vec(values: Any, n: int, name: str) -> np.ndarray:
    v = np.asarray(torch.as_tensor(values).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    if v.shape[0] != n or not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must be {n} finite non-negative numbers, got {v.shape[0]}")
    return v


def schedule_costs(
    schedule: PrecisionSchedule,
    *,
    macs: Sequence[float] | torch.Tensor | None = None,
    weight_numel: Sequence[int] | torch.Tensor | None = None,
    bucket_weights: Sequence[float] | torch.Tensor | None = None,
) -> dict[str, Any]:
    r"""
    Integer weight bytes and bit-operations of a schedule, beside their FP32 (32 × 32 bits) values.

    Args:
        schedule (`PrecisionSchedule`): the schedule.
        macs (`Sequence[float]` of shape `[L]`, *optional*): MACs per sample and call of each layer; defaults to
            `schedule.meta["macs"]`.
        weight_numel (`Sequence[int]` of shape `[L]`, *optional*): weight elements per layer; defaults to
            `schedule.meta["weight_numel"]`. Without it the byte entries are `None`.
        bucket_weights (`Sequence[float]` of shape `[K]`, *optional*): step occupancy of the buckets; defaults to
            `schedule.meta["bucket_weights"]`, else equal.

    Returns:
        `dict` with `bops` (per sample and denoiser call, occupancy-weighted over buckets), `bops_fp32`,
        `bops_ratio`, `weight_bytes` (`numel × bits / 8`, scales not counted), `weight_bytes_fp32`,
        `weight_bytes_ratio`, and `cost_model`.
    """
    num_layers, k = len(schedule.layers), schedule.num_buckets
    macs = schedule.meta.get("macs") if macs is None else macs
    numel = schedule.meta.get("weight_numel") if weight_numel is None else weight_numel
    occ_in = schedule.meta.get("bucket_weights") if bucket_weights is None else bucket_weights
    occ = np.ones(k) if occ_in is None else _vec(occ_in, k, "bucket_weights")
    if occ.sum() <= 0:
        raise ValueError("bucket_weights are all zero")
    occ = occ / occ.sum()
    a = schedule.act_bits.double().numpy()
    w = schedule.weight_bits.double().numpy()
    out: dict[str, Any] = {
        "cost_model": "bops = MACs x act bits x weight bits (float cells: 32 x 32); bytes = numel x bits / 8"
    }
    if macs is not None:
        m = _vec(macs, num_layers, "macs")
        per_mac = np.where(a >= FLOAT_BITS, 32.0 * 32.0, a * w[:, None])  # float cells: a float matmul
        bops = float((m[:, None] * per_mac * occ[None, :]).sum())
        fp = float(m.sum() * 32 * 32)
        out.update(bops=bops, bops_fp32=fp, bops_ratio=bops / fp if fp > 0 else None)
    else:
        out.update(bops=None, bops_fp32=None, bops_ratio=None)
    if numel is not None:
        n = _vec(numel, num_layers, "weight_numel")
        b = float((n * w).sum() / 8)
        fp = float(n.sum() * 4)
        out.update(weight_bytes=b, weight_bytes_fp32=fp, weight_bytes_ratio=b / fp if fp > 0 else None)
    else:
        out.update(weight_bytes=None, weight_bytes_fp32=None, weight_bytes_ratio=None)
    return out


def effective_average_bits(
    macs: Mapping[str, float],
    act_bits: Mapping[str, Sequence[float] | float | None],
    weight_bits: Mapping[str, float | None],
    *,
    bucket_weights: Sequence[float] | torch.Tensor | None = None,
    float_bits: int = 32,
) -> dict[str, Any]:
    r"""
    The bits a model really runs at: MAC-weighted average activation and weight bit-widths over *every* Conv/Linear
    layer, whatever set them (a preset, a schedule, the boundary layers' `boundary_act_bits`, an outlier fallback,
    an exclusion). Two runs compared "at the same bits" should have the same values here.

    A layer's activation bits are averaged over its buckets (weighted by `bucket_weights` when it has that many
    buckets, else equally); a cell of 16 or more bits counts 16 (`FLOAT_BITS`, as the planner counts a float cell);
    a layer absent from `act_bits` / `weight_bits`, or given `None`, runs in floating point and counts `float_bits`.

    Args:
        macs (`Mapping[str, float]`): MACs of every Conv/Linear layer in one call (the denominator).
        act_bits (`Mapping[str, Sequence[float] | float | None]`): per quantized layer, its input's bits per bucket
            (or one value).
        weight_bits (`Mapping[str, float | None]`): per quantized layer, its weight bits.
        bucket_weights (`Sequence[float]`, *optional*): step occupancy of the buckets (counts or shares).
        float_bits (`int`, *optional*, defaults to `32`): bits of an unquantized layer (the model's float dtype).

    Returns:
        `dict` with `act` and `weight` (the averages), `mac_share_float_act` / `mac_share_float_weight` (share of
        MACs whose input / weights are not quantized), `float_bits` and `layers` (the count).
    """
    total = float(sum(macs.values()))
    occ = None
    if bucket_weights is not None:
        occ = np.asarray(torch.as_tensor(bucket_weights).detach().cpu().double().numpy(), dtype=np.float64)
        occ = occ.reshape(-1)
        if not np.all(np.isfinite(occ)) or np.any(occ < 0) or occ.sum() <= 0:
            raise ValueError(
                f"bucket_weights must be finite, non-negative and not all zero, got {occ.tolist()}"
            )
    act_sum = w_sum = float_act = float_w = 0.0
    for name, m in macs.items():
        a = act_bits.get(name)
        if a is None:
            a_mean, float_act = float(float_bits), float_act + m
        else:
            v = np.minimum(np.asarray(a, dtype=np.float64).reshape(-1), FLOAT_BITS)
            wk = occ if occ is not None and occ.shape[0] == v.shape[0] else np.ones(v.shape[0])
            a_mean = float((v * wk).sum() / wk.sum())
            float_act += m * float((wk * (v >= FLOAT_BITS)).sum() / wk.sum())
        w = weight_bits.get(name)
        if w is None:
            w, float_w = float(float_bits), float_w + m
        act_sum += m * a_mean
        w_sum += m * min(float(w), float(float_bits))
    if total <= 0:
        return {
            "act": None,
            "weight": None,
            "mac_share_float_act": None,
            "mac_share_float_weight": None,
            "float_bits": float_bits,
            "layers": len(macs),
        }
    return {
        "act": act_sum / total,
        "weight": w_sum / total,
        "mac_share_float_act": float_act / total,
        "mac_share_float_weight": float_w / total,
        "float_bits": float_bits,
        "layers": len(macs),
    }


def bops_cost_table(
    macs: torch.Tensor | Sequence[float], act_bits: Sequence[int], weight_bits: Sequence[int]
) -> np.ndarray:
    r"""
    The default per-layer latency cost table: bit-operations, `MACs_l × a × w`, of one denoiser call (a float
    activation candidate, `a >= 16`, runs a float matmul: `MACs_l × 32 × 32`).

    This is a model, not a measurement: tdq's integer backends run 8-bit kernels only (lower bit-widths are
    simulated or stored as int8), so no measured per-layer cost per bit-width exists to plan with. Pass a measured
    table of the same shape to `plan_precision(latency_table=...)` where one is available.

    Args:
        macs (`torch.Tensor` or `Sequence[float]` of shape `[L]`): MACs per sample of each layer.
        act_bits (`Sequence[int]`): activation candidates (table axis 1).
        weight_bits (`Sequence[int]`): weight candidates (table axis 2).

    Returns:
        `np.ndarray` of shape `[L, len(act_bits), len(weight_bits)]`.
    """
    m = np.asarray(torch.as_tensor(macs).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    a = np.asarray(act_bits, dtype=np.float64)
    w = np.asarray(weight_bits, dtype=np.float64)
    per_mac = a[:, None] * w[None, :]
    per_mac = np.where(a[:, None] >= FLOAT_BITS, 32.0 * 32.0, per_mac)  # float input: a float matmul
    return m[:, None, None] * per_mac[None, :, :]
