"""Mixed-precision schedules: which bit-width every layer uses for its weights and, per timestep bucket, for its
input activations.

A `PrecisionSchedule` is a plain table (layer × bucket → activation bits, layer → weight bits) with a JSON round
trip. Planners build one from a `tdq.mixed_precision.profile.SensitivityProfile`:

- `plan_uniform` gives every layer and bucket the same bit-widths (the baseline);
- `plan_precision` minimises the Fisher-weighted expected quantization error under a MAC-weighted average-bits
  budget, solved exactly as a binary program with `scipy.optimize.milp` (HiGHS).

`schedule_objective` scores any schedule with the same objective, so planners can be compared.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tdq.config import ACT_BITS, WEIGHT_BITS
from tdq.mixed_precision.costs import bops_cost_table
from tdq.mixed_precision.milp import _best_uniform, _infeasible_message, _Problem, _repair, _solve_milp
from tdq.mixed_precision.profile import SensitivityProfile
from tdq.mixed_precision.schedule import FLOAT_BITS, PrecisionSchedule, _mac_weights

__all__ = [
    "PrecisionBudget",
    "bops_cost_table",
    "bucket_occupancy",
    "plan_precision",
    "plan_uniform",
    "schedule_objective",
]


# ----------------------------------------------------------------------------------------------------------------
# Budgets and planners
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PrecisionBudget:
    r"""
    A mixed-precision budget: average bit-widths, weight bytes and relative latency, and the bit-widths the planner
    may choose from. Every bound left at `None` is not enforced.

    Args:
        avg_act_bits (`float`, *optional*):
            Upper bound on the activation bit-width averaged over layers (weighted by their MACs) and timestep
            buckets (weighted by the sampler's step occupancy when the profile or the planner call gives it, else
            equally). `None` leaves activations unconstrained (every layer gets the largest candidate).
        avg_weight_bits (`float`, *optional*):
            Upper bound on the MAC-weighted average weight bit-width. `None` leaves weights unconstrained.
        act_candidates (`tuple[int, ...]`, *optional*, defaults to `(4, 6, 8)`):
            Activation bit-widths to choose from.
        weight_candidates (`tuple[int, ...]`, *optional*, defaults to `(4, 6, 8)`):
            Weight bit-widths to choose from.
        max_weight_bytes (`float`, *optional*):
            Upper bound on the bytes of the scheduled layers' integer weights, `sum_l numel_l * bits_l / 8`
            (scales, zero-points and unscheduled layers are not counted).
        max_relative_latency (`float`, *optional*):
            Upper bound on the latency of one sampler step relative to every layer at the largest candidates, from a
            per-layer cost table (see `plan_precision`; by default the bit-operation model MACs × act bits ×
            weight bits), with buckets weighted by step occupancy. E.g. `0.6` asks for at most 60 % of that cost.
        float_fallback (`bool`, *optional*, defaults to `False`):
            Add float (16-bit activations: the layer's input is kept in floating point) to the activation candidates,
            so the planner may leave a (layer, bucket) unquantized when that is the best use of the budget. A float
            cell has no quantization error in the objective, counts 16 bits in the average-bits budget and
            `MACs × 32 × 32` in the bit-operation cost model. A 16 already in `act_candidates` is treated the same.
    """

    avg_act_bits: float | None = None
    avg_weight_bits: float | None = None
    act_candidates: tuple[int, ...] = (4, 6, 8)
    weight_candidates: tuple[int, ...] = (4, 6, 8)
    max_weight_bytes: float | None = None
    max_relative_latency: float | None = None
    float_fallback: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.float_fallback, bool):
            raise ValueError(f"PrecisionBudget.float_fallback={self.float_fallback!r} must be a bool")
        if self.float_fallback:
            self.act_candidates = (*tuple(self.act_candidates), FLOAT_BITS)
        self.act_candidates = _check_candidates(self.act_candidates, ACT_BITS, "act_candidates")
        self.weight_candidates = _check_candidates(self.weight_candidates, WEIGHT_BITS, "weight_candidates")
        for name in ("avg_act_bits", "avg_weight_bits", "max_weight_bytes", "max_relative_latency"):
            v = getattr(self, name)
            if v is not None and not (
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ):
                raise ValueError(f"PrecisionBudget.{name}={v!r} must be a finite number or None")
        for name in ("max_weight_bytes", "max_relative_latency"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"PrecisionBudget.{name}={v!r} must be positive")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict (JSON-safe) form."""
        d = dataclasses.asdict(self)
        d["act_candidates"] = list(self.act_candidates)
        d["weight_candidates"] = list(self.weight_candidates)
        return d


def _check_candidates(cands: Any, allowed: tuple[int, ...], name: str) -> tuple[int, ...]:
    try:
        values = [int(b) for b in cands]
    except TypeError:
        raise ValueError(f"PrecisionBudget.{name} must be a sequence of ints, got {cands!r}") from None
    if not values:
        raise ValueError(f"PrecisionBudget.{name} is empty")
    if any(int(b) != b for b in cands):
        raise ValueError(f"PrecisionBudget.{name}={list(cands)} must hold integers")
    bad = [b for b in values if b not in allowed]
    if bad:
        raise ValueError(
            f"PrecisionBudget.{name} holds unsupported bit-widths {bad}; choose from {list(allowed)}"
        )
    return tuple(sorted(set(values)))


def _np(t: torch.Tensor) -> np.ndarray:
    return torch.as_tensor(t).detach().cpu().double().numpy()


def _noise(ranges: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """
    Uniform quantization noise variance per element, Δ²/12 with Δ = range / (2^b − 1); shape `[..., J]`. Float
    candidates (`b >= 16`, the input kept in floating point) have none.
    """
    b = bits.astype(np.float64)
    delta = ranges[..., None] / (2.0**b - 1.0)
    return np.where(b >= FLOAT_BITS, 0.0, delta**2 / 12.0)


def _cost_tables(profile: SensitivityProfile, act_cands: np.ndarray, w_cands: np.ndarray):
    """Expected error of every choice: activations `[L, K, J]`, weights `[L, J]`."""
    act_cost = _np(profile.act_fisher)[..., None] * _noise(_np(profile.act_range), act_cands)
    w_fisher = _np(profile.weight_fisher).sum(axis=1)
    w_cost = w_fisher[:, None] * _noise(_np(profile.weight_range), w_cands)
    return act_cost, w_cost


def bucket_occupancy(profile: SensitivityProfile, bucket_weights: Any = None) -> np.ndarray:
    r"""
    Share of the sampler's steps in each timestep bucket, normalised to mean 1 (`[K]`).

    Args:
        profile (`SensitivityProfile`): its `meta["bucket_weights"]` (recorded by `profile_sensitivity` when it was
            given the sampler's `step_timesteps`) is used when `bucket_weights` is `None`.
        bucket_weights (`Sequence[float]`, *optional*): explicit per-bucket step counts or shares.

    Returns:
        `np.ndarray` of shape `[K]` (all ones when neither is given).
    """
    k = profile.num_buckets
    w = bucket_weights if bucket_weights is not None else profile.meta.get("bucket_weights")
    if w is None:
        return np.ones(k)
    w = np.asarray(torch.as_tensor(w).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    if w.shape[0] != k or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"bucket weights must be {k} finite non-negative numbers, not all zero; got {w.tolist()}"
        )
    return w * k / w.sum()


def _check_profile(profile: SensitivityProfile) -> tuple[int, int]:
    num_layers = len(profile.layers)
    shape = tuple(profile.act_fisher.shape)
    if len(shape) != 2 or shape[0] != num_layers:
        raise ValueError(f"profile.act_fisher must have shape [L={num_layers}, K], got {list(shape)}")
    k = shape[1]
    for name, t, want in [
        ("act_range", profile.act_range, (num_layers, k)),
        ("weight_fisher", profile.weight_fisher, (num_layers, k)),
        ("weight_range", profile.weight_range, (num_layers,)),
        ("macs", profile.macs, (num_layers,)),
    ]:
        if tuple(t.shape) != want:
            raise ValueError(f"profile.{name} must have shape {list(want)}, got {list(t.shape)}")
    return num_layers, k


def _fixed_rows(profile: SensitivityProfile, fixed_act_bits: Mapping[str, int] | None) -> dict[int, int]:
    """Layer index -> fixed activation bits, checked against the profile's layers."""
    if not fixed_act_bits:
        return {}
    index = {n: i for i, n in enumerate(profile.layers)}
    unknown = sorted(set(fixed_act_bits) - set(index))
    if unknown:
        raise ValueError(f"fixed_act_bits names layers the profile does not have: {unknown[:5]}")
    out = {}
    for name, bits in fixed_act_bits.items():
        if int(bits) != bits or int(bits) not in ACT_BITS:
            raise ValueError(
                f"fixed_act_bits[{name!r}]={bits!r} is not a supported bit-width {list(ACT_BITS)}"
            )
        out[index[name]] = int(bits)
    return out


def plan_uniform(
    profile: SensitivityProfile,
    act_bits: int = 8,
    weight_bits: int = 8,
    *,
    fixed_act_bits: Mapping[str, int] | None = None,
) -> PrecisionSchedule:
    r"""
    The baseline: the same bit-widths for every layer and bucket (but the fixed layers).

    Args:
        profile (`SensitivityProfile`): supplies the layers, grid and MACs (and the objective reported in `meta`).
        act_bits (`int`, *optional*, defaults to `8`): activation bit-width.
        weight_bits (`int`, *optional*, defaults to `8`): weight bit-width.
        fixed_act_bits (`Mapping[str, int]`, *optional*): layers whose activations keep the given bits in every
            bucket instead of `act_bits` (the boundary layers of a run: `TDQConfig.boundary_act_bits`), as a uniform
            `tdq run` quantizes them. Its `meta["achieved"]` is then the uniform run's effective average.

    Returns:
        `PrecisionSchedule` with `meta["planner"] == "uniform"`.
    """
    num_layers, k = _check_profile(profile)
    fixed = _fixed_rows(profile, fixed_act_bits)
    act = torch.full((num_layers, k), int(act_bits), dtype=torch.long)
    for i, bits in fixed.items():
        act[i] = bits
    sched = PrecisionSchedule(
        layers=list(profile.layers),
        act_bits=act,
        weight_bits=torch.full((num_layers,), int(weight_bits), dtype=torch.long),
        grid=dict(profile.grid),
        meta={
            "planner": "uniform",
            "macs": _np(profile.macs).tolist(),
            "bucket_weights": profile.meta.get("bucket_weights"),
            "fixed_act_bits": {profile.layers[i]: b for i, b in fixed.items()},
        },
    )
    terms = schedule_objective(profile, sched, split=True)
    sched.meta.update(objective=terms["total"], objective_act=terms["act"], objective_weight=terms["weight"])
    sched.meta["achieved"] = sched.average_bits()
    return sched


def plan_precision(
    profile: SensitivityProfile,
    budget: PrecisionBudget,
    *,
    mip_rel_gap: float = 1e-6,
    time_limit: float | None = 60.0,
    uniform_fallback: bool = True,
    bucket_weights: Sequence[float] | torch.Tensor | None = None,
    weight_numel: Sequence[int] | torch.Tensor | None = None,
    latency_table: np.ndarray | None = None,
    fixed_act_bits: Mapping[str, int] | None = None,
) -> PrecisionSchedule:
    r"""
    Fisher-optimal mixed precision under average-bits, weight-memory and latency budgets.

    Minimises the second-order estimate of the loss increase caused by quantization noise,

        sum_{l,k} F_act[l,k] * Δ_act[l,k](b)² / 12  +  sum_l (sum_k F_w[l,k]) * Δ_w[l](b)² / 12,

    with `Δ_act = act_range[l,k] / (2^b − 1)` and `Δ_w = weight_range[l] / (2^b − 1)`, choosing one candidate
    bit-width per (layer, bucket) for activations and one per layer for weights, subject to every bound of `budget`:
    the MAC-weighted average bits (buckets weighted by the sampler's step occupancy `o_k`, mean 1), the bytes of the
    integer weights `sum_l numel_l b_l / 8`, and the occupancy-weighted latency `sum_{l,k} o_k T[l, a, w] / K`
    relative to `sum_l T[l, max a, max w]`. The program is solved exactly with `scipy.optimize.milp` (HiGHS
    branch-and-bound over one-hot choice variables); with a latency bound, whose cost couples a layer's weight and
    activation bits, each (layer, bucket) chooses an (activation, weight) pair whose marginal is the layer's weight
    choice.

    If the solver stops early (time limit or gap) with a schedule of larger objective than the best feasible
    uniform one, the uniform one is returned when `uniform_fallback` is set; either way `meta["fallback"]` says
    whether that happened (and why), so a schedule that is really uniform is never reported as planned.

    Args:
        profile (`SensitivityProfile`): Fisher traces, ranges and MACs per layer × bucket.
        budget (`PrecisionBudget`): bounds and candidate bit-widths.
        mip_rel_gap (`float`, *optional*, defaults to `1e-6`):
            Relative optimality gap at which HiGHS stops (the result is within this factor of the optimum).
        time_limit (`float`, *optional*, defaults to `60.0`):
            Seconds for the program; `None` for no limit. When hit, a `RuntimeWarning` is issued and the best
            schedule found so far is returned (see `uniform_fallback`).
        uniform_fallback (`bool`, *optional*, defaults to `True`):
            Return the best feasible uniform schedule when it beats what the solver returned (reported in
            `meta["fallback"]` and warned about). `False` returns the solver's schedule as is.
        bucket_weights (`Sequence[float]`, *optional*):
            Step occupancy of the buckets for the sampler in use (counts or shares). Defaults to
            `profile.meta["bucket_weights"]` (recorded by `profile_sensitivity(step_timesteps=...)`), else equal.
        weight_numel (`Sequence[int]`, *optional*):
            Weight elements per layer, for `budget.max_weight_bytes`. Defaults to `profile.meta["weight_numel"]`.
        latency_table (`np.ndarray` of shape `[L, len(act_candidates), len(weight_candidates)]`, *optional*):
            Cost of one call of each layer at each (activation, weight) candidate pair, for
            `budget.max_relative_latency`. Defaults to `bops_cost_table` (MACs × bits, a model, not a measurement).
        fixed_act_bits (`Mapping[str, int]`, *optional*):
            Layers whose activation bits the planner does not choose: they keep the given bits (one of
            `budget.act_candidates`) in every bucket and still count in every budget row, as they do in a uniform run
            (`tdq run` passes its boundary layers at `TDQConfig.boundary_act_bits` here). The uniform fallback keeps
            them fixed too. Their weight bits are planned as any other layer's.

    Returns:
        `PrecisionSchedule` with `meta` holding the planner name, budget, objective value (total, activation and
        weight terms), achieved averages (`achieved`) and every budget row's value (`budget_rows`), bucket
        occupancy, MACs, solver status and `fallback` (`None` or a dict with the uniform bits and the reason).

    Raises:
        `ValueError`: a bound cannot be met even with the smallest candidates (the message gives the minimum
            achievable value); a memory bound without weight sizes; a cost table of the wrong shape.
        `RuntimeError`: the solver found no schedule and no uniform one is feasible (or `uniform_fallback=False`).
    """
    num_layers, k = _check_profile(profile)
    act_cands = np.asarray(budget.act_candidates, dtype=np.int64)
    w_cands = np.asarray(budget.weight_candidates, dtype=np.int64)
    act_cost, w_cost = _cost_tables(profile, act_cands, w_cands)
    fixed_bits = _fixed_rows(profile, fixed_act_bits)
    fixed = np.full(num_layers, -1, dtype=np.int64)
    for i, bits in fixed_bits.items():
        if bits not in budget.act_candidates:
            raise ValueError(
                f"fixed_act_bits[{profile.layers[i]!r}]={bits} is not one of act_candidates "
                f"{list(budget.act_candidates)}"
            )
        fixed[i] = int(np.nonzero(act_cands == bits)[0][0])
    share = _mac_weights(profile.macs, num_layers)
    occ = bucket_occupancy(profile, bucket_weights)
    numel = None
    if budget.max_weight_bytes is not None:
        numel = weight_numel if weight_numel is not None else profile.meta.get("weight_numel")
        if numel is None:
            raise ValueError(
                "PrecisionBudget.max_weight_bytes needs the layers' weight sizes: pass weight_numel= or a profile "
                "from profile_sensitivity (meta['weight_numel'])"
            )
        numel = np.asarray(torch.as_tensor(numel).detach().cpu().double().numpy(), dtype=np.float64).reshape(
            -1
        )
        if numel.shape[0] != num_layers:
            raise ValueError(
                f"weight_numel has {numel.shape[0]} entries but the profile has {num_layers} layers"
            )
    latency, latency_source = None, None
    if budget.max_relative_latency is not None:
        if latency_table is None:
            table, latency_source = bops_cost_table(profile.macs, act_cands, w_cands), "bops_model"
        else:
            table, latency_source = np.asarray(latency_table, dtype=np.float64), "table"
        want = (num_layers, len(act_cands), len(w_cands))
        if table.shape != want:
            raise ValueError(f"latency_table must have shape {list(want)}, got {list(table.shape)}")
        if not np.all(np.isfinite(table)) or np.any(table < 0) or table[:, -1, -1].sum() <= 0:
            raise ValueError("latency_table must be finite, non-negative and not all zero")
        latency = table / table[:, -1, -1].sum()
    p = _Problem(
        act_cost,
        w_cost,
        act_cands.astype(np.float64),
        w_cands.astype(np.float64),
        share,
        occ,
        budget,
        numel,
        latency,
        fixed,
    )

    low_a, low_w = p.fix(np.zeros((num_layers, k), dtype=np.int64)), np.zeros(num_layers, dtype=np.int64)
    for name, value in p.rows(low_a, low_w).items():
        if name in p.violated(low_a, low_w):
            raise ValueError(_infeasible_message(p, name, value))
    top_a = p.fix(np.full((num_layers, k), len(act_cands) - 1, dtype=np.int64))
    top_w = np.full(num_layers, len(w_cands) - 1, dtype=np.int64)
    fallback = None
    if num_layers == 0 or not p.violated(top_a, top_w):
        # Noise decreases with bits, so without a binding bound the largest candidates are optimal.
        a, w, info = top_a, top_w, {"status": "unconstrained"}
    else:
        joint = latency is not None
        a, w, res = _solve_milp(p, mip_rel_gap, time_limit, joint)
        info = {"status": "milp", "joint": joint, "message": str(res.message)}
        info["mip_gap"] = float(getattr(res, "mip_gap", 0.0) or 0.0)
        if a is None:
            a, w = top_a.copy(), top_w.copy()  # replaced by the uniform fallback below, or an error
            info["status"] = "no_solution"
        elif res.status != 0:
            warnings.warn(
                f"scipy.optimize.milp stopped before proving the schedule optimal ({res.message}); using the best "
                "schedule found. Raise time_limit or mip_rel_gap to change this.",
                RuntimeWarning,
                stacklevel=2,
            )
        if info["status"] == "milp":
            repaired = _repair(p, a, w)
            if repaired:
                info["repaired_steps"] = repaired
        uni = _best_uniform(p, num_layers, k)
        if uni is not None:
            info["uniform_objective"] = uni[2]
        worse = info["status"] == "no_solution" or (uni is not None and uni[2] < p.objective(a, w))
        if worse:
            reason = (
                f"the solver found no schedule ({res.message})"
                if info["status"] == "no_solution"
                else f"the best feasible uniform schedule has a smaller objective than the solver's ({res.message})"
            )
            if not uniform_fallback or uni is None:
                if info["status"] == "no_solution":
                    raise RuntimeError(f"scipy.optimize.milp found no schedule: {res.message}")
                info["uniform_better"] = True
            else:
                a, w = uni[0], uni[1]
                free = np.nonzero(fixed < 0)[0]
                fallback = {
                    "to": "uniform",
                    "act_bits": int(act_cands[a[free[0], 0]]) if free.size and a.size else None,
                    "weight_bits": int(w_cands[w[0]]) if w.size else None,
                    "reason": reason,
                }
                warnings.warn(
                    f"plan_precision fell back to uniform W{fallback['weight_bits']}A{fallback['act_bits']}: {reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    sched = PrecisionSchedule(
        layers=list(profile.layers),
        act_bits=torch.as_tensor(act_cands[a].reshape(num_layers, k), dtype=torch.long),
        weight_bits=torch.as_tensor(w_cands[w], dtype=torch.long),
        grid=dict(profile.grid),
        meta={
            "planner": "fisher_milp",
            "budget": budget.to_dict(),
            "macs": _np(profile.macs).tolist(),
            "bucket_weights": occ.tolist(),
            "solver": info,
            "fallback": fallback,
            "budget_rows": p.rows(a, w),
            "fixed_act_bits": {profile.layers[i]: b for i, b in fixed_bits.items()},
        },
    )
    if latency_source is not None:
        sched.meta["latency_cost"] = latency_source
    if numel is not None:
        sched.meta["weight_numel"] = numel.astype(np.int64).tolist()
    terms = schedule_objective(profile, sched, split=True)
    sched.meta.update(objective=terms["total"], objective_act=terms["act"], objective_weight=terms["weight"])
    sched.meta["achieved"] = sched.average_bits()
    return sched


def schedule_objective(
    profile: SensitivityProfile, schedule: PrecisionSchedule, *, split: bool = False
) -> float | dict[str, float]:
    r"""
    The Fisher-weighted expected quantization error of any schedule (the objective `plan_precision` minimises).

    Args:
        profile (`SensitivityProfile`): the sensitivity profile to score against.
        schedule (`PrecisionSchedule`): a schedule over the same layers (any order) and number of buckets.
        split (`bool`, *optional*, defaults to `False`): return `{"act", "weight", "total"}` instead of the total.

    Returns:
        `float` (or `dict` of floats with `split=True`).
    """
    num_layers, k = _check_profile(profile)
    if schedule.num_buckets != k:
        raise ValueError(f"schedule has {schedule.num_buckets} buckets but the profile has {k}")
    index = {n: i for i, n in enumerate(schedule.layers)}
    missing = [n for n in profile.layers if n not in index]
    extra = sorted(set(schedule.layers) - set(profile.layers))
    if missing or extra:
        raise ValueError(
            f"schedule and profile cover different layers (missing from schedule: {missing[:5]}, "
            f"not in profile: {extra[:5]})"
        )
    order = [index[n] for n in profile.layers]
    act_bits = schedule.act_bits[order].numpy()
    w_bits = schedule.weight_bits[order].numpy()
    act_noise = (_np(profile.act_range) / (2.0 ** act_bits.astype(np.float64) - 1.0)) ** 2 / 12.0
    act_noise = np.where(act_bits >= FLOAT_BITS, 0.0, act_noise)  # float cells: no quantization error
    act = float((_np(profile.act_fisher) * act_noise).sum())
    w_noise = (_np(profile.weight_range) / (2.0 ** w_bits.astype(np.float64) - 1.0)) ** 2 / 12.0
    weight = float((_np(profile.weight_fisher).sum(axis=1) * w_noise).sum())
    if split:
        return {"act": act, "weight": weight, "total": act + weight}
    return act + weight
