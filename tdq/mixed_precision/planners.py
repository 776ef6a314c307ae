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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tdq.config import ACT_BITS, WEIGHT_BITS
from tdq.mixed_precision.profile import SensitivityProfile
from tdq.mixed_precision.schedule import PrecisionSchedule, _mac_weights

__all__ = [
    "PrecisionBudget",
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
    A mixed-precision budget: MAC-weighted average bit-widths and the bit-widths the planner may choose from.

    Args:
        avg_act_bits (`float`, *optional*):
            Upper bound on the activation bit-width averaged over layers (weighted by their MACs) and timestep
            buckets (equally). `None` leaves activations unconstrained (every layer gets the largest candidate).
        avg_weight_bits (`float`, *optional*):
            Upper bound on the MAC-weighted average weight bit-width. `None` leaves weights unconstrained.
        act_candidates (`tuple[int, ...]`, *optional*, defaults to `(4, 6, 8)`):
            Activation bit-widths to choose from.
        weight_candidates (`tuple[int, ...]`, *optional*, defaults to `(4, 6, 8)`):
            Weight bit-widths to choose from.
    """

    avg_act_bits: float | None = None
    avg_weight_bits: float | None = None
    act_candidates: tuple[int, ...] = (4, 6, 8)
    weight_candidates: tuple[int, ...] = (4, 6, 8)

    def __post_init__(self) -> None:
        self.act_candidates = _check_candidates(self.act_candidates, ACT_BITS, "act_candidates")
        self.weight_candidates = _check_candidates(self.weight_candidates, WEIGHT_BITS, "weight_candidates")
        for name in ("avg_act_bits", "avg_weight_bits"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v)):
                raise ValueError(f"PrecisionBudget.{name}={v!r} must be a finite number or None")

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
    """Uniform quantization noise variance per element, Δ²/12 with Δ = range / (2^b − 1); shape `[..., J]`."""
    delta = ranges[..., None] / (2.0 ** bits.astype(np.float64) - 1.0)
    return delta**2 / 12.0


def _cost_tables(profile: SensitivityProfile, act_cands: np.ndarray, w_cands: np.ndarray):
    """Expected error of every choice: activations `[L, K, J]`, weights `[L, J]`."""
    act_cost = _np(profile.act_fisher)[..., None] * _noise(_np(profile.act_range), act_cands)
    w_fisher = _np(profile.weight_fisher).sum(axis=1)
    w_cost = w_fisher[:, None] * _noise(_np(profile.weight_range), w_cands)
    return act_cost, w_cost


def _solve_choice(
    cost: np.ndarray,
    share: np.ndarray,
    cands: np.ndarray,
    budget: float | None,
    *,
    what: str,
    mip_rel_gap: float,
    time_limit: float | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    r"""
    Multiple-choice knapsack: pick one candidate `j` per group `g` minimising `sum cost[g, j]` subject to
    `sum_g share[g] * cands[j] <= budget`. Returns the chosen candidate index per group and solver info.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    num_groups, num_cands = cost.shape
    b_min, b_max = float(cands.min()), float(cands.max())
    tol = 1e-9
    if budget is not None and budget < b_min - tol:
        raise ValueError(
            f"the {what} budget of {budget:g} average bits is infeasible: the minimum achievable MAC-weighted "
            f"average is {b_min:g} bits (every layer at the smallest candidate {int(b_min)})"
        )
    if num_groups == 0:
        return np.zeros(0, dtype=np.int64), {"status": "empty"}
    if budget is None or budget >= b_max - tol or num_cands == 1:
        # Noise decreases with bits, so without a binding budget the largest candidate is optimal.
        return np.full(num_groups, num_cands - 1, dtype=np.int64), {"status": "unconstrained"}

    scale = float(np.abs(cost).max())
    c = (cost / scale if scale > 0 else cost).reshape(-1)
    n = num_groups * num_cands
    rows = np.repeat(np.arange(num_groups), num_cands)
    one_hot = csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(num_groups, n))
    budget_row = (share[:, None] * cands[None, :]).reshape(1, -1)
    res = milp(
        c,
        integrality=np.ones(n),
        bounds=Bounds(0.0, 1.0),
        constraints=[LinearConstraint(one_hot, 1.0, 1.0), LinearConstraint(budget_row, -np.inf, budget)],
        options={"mip_rel_gap": mip_rel_gap, **({"time_limit": time_limit} if time_limit else {})},
    )
    if res.x is None:
        raise RuntimeError(f"scipy.optimize.milp found no {what} schedule: {res.message}")
    if res.status != 0:
        warnings.warn(
            f"scipy.optimize.milp stopped before proving the {what} schedule optimal ({res.message}); using the "
            "best schedule found. Raise time_limit or mip_rel_gap to change this.",
            RuntimeWarning,
            stacklevel=3,
        )
    choice = res.x.reshape(num_groups, num_cands).argmax(axis=1)
    # Enforce the budget exactly on the rounded solution (guards against solver feasibility tolerances): step
    # down the choice that costs least error per bit saved until the budget holds.
    repaired = 0
    while float((share * cands[choice]).sum()) > budget + tol:
        best, best_ratio = None, math.inf
        for g in np.nonzero(choice > 0)[0]:
            j = choice[g]
            saved = share[g] * (cands[j] - cands[j - 1])
            if saved <= 0:
                continue
            ratio = (cost[g, j - 1] - cost[g, j]) / saved
            if ratio < best_ratio:
                best, best_ratio = g, ratio
        if best is None:  # pragma: no cover - impossible when budget >= b_min
            break
        choice[best] -= 1
        repaired += 1
    # Safeguard for early stops and gap tolerances: never return worse than the best feasible uniform choice.
    j_uni = int(np.nonzero(cands <= budget + tol)[0].max())
    if cost[:, j_uni].sum() < cost[np.arange(num_groups), choice].sum():
        choice = np.full(num_groups, j_uni, dtype=np.int64)
        repaired = -1
    info = {
        "status": "milp",
        "message": str(res.message),
        "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
    }
    if repaired > 0:
        info["repaired_steps"] = repaired
    elif repaired < 0:
        info["fallback"] = "uniform"
    return choice.astype(np.int64), info


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


def plan_uniform(profile: SensitivityProfile, act_bits: int = 8, weight_bits: int = 8) -> PrecisionSchedule:
    r"""
    The baseline: the same bit-widths for every layer and bucket.

    Args:
        profile (`SensitivityProfile`): supplies the layers, grid and MACs (and the objective reported in `meta`).
        act_bits (`int`, *optional*, defaults to `8`): activation bit-width.
        weight_bits (`int`, *optional*, defaults to `8`): weight bit-width.

    Returns:
        `PrecisionSchedule` with `meta["planner"] == "uniform"`.
    """
    num_layers, k = _check_profile(profile)
    sched = PrecisionSchedule(
        layers=list(profile.layers),
        act_bits=torch.full((num_layers, k), int(act_bits), dtype=torch.long),
        weight_bits=torch.full((num_layers,), int(weight_bits), dtype=torch.long),
        grid=dict(profile.grid),
        meta={"planner": "uniform", "macs": _np(profile.macs).tolist()},
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
) -> PrecisionSchedule:
    r"""
    Fisher-optimal mixed precision under a MAC-weighted average-bits budget.

    Minimises the second-order estimate of the loss increase caused by quantization noise,

        sum_{l,k} F_act[l,k] * Δ_act[l,k](b)² / 12  +  sum_l (sum_k F_w[l,k]) * Δ_w[l](b)² / 12,

    with `Δ_act = act_range[l,k] / (2^b − 1)` and `Δ_w = weight_range[l] / (2^b − 1)`, choosing one candidate
    bit-width per (layer, bucket) for activations and one per layer for weights, subject to the MAC-weighted
    averages of `budget`. Activations and weights are separable, so each is one binary program solved exactly
    with `scipy.optimize.milp` (HiGHS branch-and-bound, one-hot choice variables).

    Args:
        profile (`SensitivityProfile`): Fisher traces, ranges and MACs per layer × bucket.
        budget (`PrecisionBudget`): average-bits bounds and candidate bit-widths.
        mip_rel_gap (`float`, *optional*, defaults to `1e-6`):
            Relative optimality gap at which HiGHS stops (the result is within this factor of the optimum).
        time_limit (`float`, *optional*, defaults to `60.0`):
            Seconds per program; `None` for no limit. When hit, a `RuntimeWarning` is issued and the best schedule
            found so far is returned (never worse than the best feasible uniform one; see `meta["solver"]`).

    Returns:
        `PrecisionSchedule` with `meta` holding the planner name, budget, objective value (total, activation and
        weight terms), achieved MAC-weighted averages, MACs and solver status.

    Raises:
        `ValueError`: a budget lies below the smallest candidate; the message gives the minimum achievable average.
    """
    num_layers, k = _check_profile(profile)
    act_cands = np.asarray(budget.act_candidates, dtype=np.int64)
    w_cands = np.asarray(budget.weight_candidates, dtype=np.int64)
    act_cost, w_cost = _cost_tables(profile, act_cands, w_cands)
    share = _mac_weights(profile.macs, num_layers)

    act_choice, act_info = _solve_choice(
        act_cost.reshape(num_layers * k, -1),
        np.repeat(share / max(k, 1), k),
        act_cands.astype(np.float64),
        budget.avg_act_bits,
        what="activation",
        mip_rel_gap=mip_rel_gap,
        time_limit=time_limit,
    )
    w_choice, w_info = _solve_choice(
        w_cost,
        share,
        w_cands.astype(np.float64),
        budget.avg_weight_bits,
        what="weight",
        mip_rel_gap=mip_rel_gap,
        time_limit=time_limit,
    )
    sched = PrecisionSchedule(
        layers=list(profile.layers),
        act_bits=torch.as_tensor(act_cands[act_choice].reshape(num_layers, k), dtype=torch.long),
        weight_bits=torch.as_tensor(w_cands[w_choice], dtype=torch.long),
        grid=dict(profile.grid),
        meta={
            "planner": "fisher_milp",
            "budget": budget.to_dict(),
            "macs": _np(profile.macs).tolist(),
            "solver": {"act": act_info, "weight": w_info},
        },
    )
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
    act = float((_np(profile.act_fisher) * act_noise).sum())
    w_noise = (_np(profile.weight_range) / (2.0 ** w_bits.astype(np.float64) - 1.0)) ** 2 / 12.0
    weight = float((_np(profile.weight_fisher).sum(axis=1) * w_noise).sum())
    if split:
        return {"act": act, "weight": weight, "total": act + weight}
    return act + weight
