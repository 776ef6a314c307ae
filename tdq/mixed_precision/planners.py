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


@dataclass
class _Problem:
    """The planning problem in numpy: error tables, constraint data, and row/objective evaluation of a choice."""

    act_cost: np.ndarray  # [L, K, Ja]
    w_cost: np.ndarray  # [L, Jw]
    act_cands: np.ndarray
    w_cands: np.ndarray
    share: np.ndarray  # [L] MAC share
    occ: np.ndarray  # [K] occupancy, mean 1
    budget: PrecisionBudget
    numel: np.ndarray | None  # [L]
    latency: np.ndarray | None  # [L, Ja, Jw] relative to the all-largest cost
    # [L] activation candidate index of a fixed layer, -1 where the planner chooses
    fixed: np.ndarray | None = None

    def fix(self, a: np.ndarray) -> np.ndarray:
        """`a` `[L, K]` with every fixed layer's cells set to its fixed candidate (in place; returned)."""
        if self.fixed is not None:
            rows = self.fixed >= 0
            a[rows] = self.fixed[rows, None]
        return a

    def objective(self, a: np.ndarray, w: np.ndarray) -> float:
        num_layers, k = a.shape
        act = self.act_cost[np.arange(num_layers)[:, None], np.arange(k)[None, :], a].sum()
        return float(act + self.w_cost[np.arange(num_layers), w].sum())

    def rows(self, a: np.ndarray, w: np.ndarray) -> dict[str, float]:
        """Value of every active budget row for act choice `a` `[L, K]` and weight choice `w` `[L]`."""
        k = a.shape[1]
        b = self.budget
        out = {}
        if b.avg_act_bits is not None:
            out["avg_act_bits"] = float(
                (self.share[:, None] * self.occ[None, :] * self.act_cands[a]).sum() / k
            )
        if b.avg_weight_bits is not None:
            out["avg_weight_bits"] = float((self.share * self.w_cands[w]).sum())
        if b.max_weight_bytes is not None:
            out["max_weight_bytes"] = float((self.numel * self.w_cands[w]).sum() / 8.0)
        if b.max_relative_latency is not None:
            lat = self.latency[np.arange(a.shape[0])[:, None], a, w[:, None]]
            out["max_relative_latency"] = float((self.occ[None, :] * lat).sum() / k)
        return out

    def violated(self, a: np.ndarray, w: np.ndarray, tol: float = 1e-9) -> list[str]:
        return [n for n, v in self.rows(a, w).items() if v > getattr(self.budget, n) + tol * max(1.0, abs(v))]


def _linear_rows(p: _Problem, k: int, joint: bool):
    """Coefficients of every active budget row over the variables `[y (L·Jw), x (L·K·Ja) or z (L·K·Ja·Jw)]`."""
    num_layers, ja, jw = p.act_cost.shape[0], len(p.act_cands), len(p.w_cands)
    b = p.budget
    act_shape = (num_layers, k, ja, jw) if joint else (num_layers, k, ja)
    rows, ubs, names = [], [], []

    def add(name, y_coef, act_coef):
        rows.append(np.concatenate([np.broadcast_to(y_coef, (num_layers, jw)).ravel(), act_coef.ravel()]))
        ubs.append(float(getattr(b, name)))
        names.append(name)

    zero_act = np.zeros(act_shape)
    if b.avg_act_bits is not None:
        c = p.share[:, None, None] * p.occ[None, :, None] * p.act_cands[None, None, :] / k
        add("avg_act_bits", 0.0, np.broadcast_to(c[..., None], act_shape) if joint else c)
    if b.avg_weight_bits is not None:
        add("avg_weight_bits", p.share[:, None] * p.w_cands[None, :], zero_act)
    if b.max_weight_bytes is not None:
        add("max_weight_bytes", p.numel[:, None] * p.w_cands[None, :] / 8.0, zero_act)
    if b.max_relative_latency is not None:
        add("max_relative_latency", 0.0, p.occ[None, :, None, None] * p.latency[:, None, :, :] / k)
    return rows, ubs, names


def _scaled_objective(w_cost: np.ndarray, act_obj: np.ndarray) -> np.ndarray:
    """
    The MILP objective vector, conditioned for the solver: every one-hot group (a layer's weight choice, a
    (layer, bucket)'s activation choice) has its minimum subtracted (a constant, since exactly one member is chosen:
    the argmin is unchanged), and the result is divided by the median non-zero difference. Dividing the raw costs by
    their maximum instead leaves every coefficient far below the largest one under HiGHS's tolerances when layers'
    errors span many orders of magnitude (activation ranges of 1e3–1e10 do), so their trade-offs were not optimised.
    """
    wc = w_cost - w_cost.min(axis=-1, keepdims=True)
    groups = act_obj.reshape(*act_obj.shape[:2], -1)
    ac = (groups - groups.min(axis=-1, keepdims=True)).reshape(act_obj.shape)
    c = np.concatenate([wc.ravel(), ac.ravel()])
    nz = c[c > 0]
    scale = float(np.median(nz)) if nz.size else 1.0
    return c / scale


def _solve_milp(p: _Problem, mip_rel_gap: float, time_limit: float | None, joint: bool):
    """One binary program over all choices; returns `(act choice [L, K], weight choice [L], scipy result)`."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, hstack, vstack

    num_layers, k, ja = p.act_cost.shape
    jw = len(p.w_cands)
    n_y = num_layers * jw
    act_obj = np.broadcast_to(p.act_cost[..., None], (num_layers, k, ja, jw)) if joint else p.act_cost
    c = _scaled_objective(p.w_cost, act_obj)
    n_act = act_obj.size
    # weights: one candidate per layer
    y_onehot = coo_matrix(
        (np.ones(n_y), (np.repeat(np.arange(num_layers), jw), np.arange(n_y))), shape=(num_layers, n_y)
    )
    eqs = [hstack([y_onehot, coo_matrix((num_layers, n_act))])]
    rhs = [np.ones(num_layers)]
    if joint:
        # z[l,k,a,w]: the (a, w) pair of (layer, bucket); its marginal over a is the layer's weight one-hot y[l,w].
        idx = np.arange(n_act).reshape(num_layers, k, ja, jw)
        rows = np.broadcast_to(np.arange(num_layers * k * jw).reshape(num_layers, k, 1, jw), idx.shape)
        z_part = coo_matrix((np.ones(n_act), (rows.ravel(), idx.ravel())), shape=(num_layers * k * jw, n_act))
        y_rows = np.arange(num_layers * k * jw).reshape(num_layers, k, jw)
        y_cols = np.broadcast_to(
            (np.arange(num_layers)[:, None] * jw + np.arange(jw)[None, :])[:, None, :], y_rows.shape
        )
        y_part = coo_matrix(
            (-np.ones(y_rows.size), (y_rows.ravel(), y_cols.ravel())), shape=(num_layers * k * jw, n_y)
        )
        eqs.append(hstack([y_part, z_part]))
        rhs.append(np.zeros(num_layers * k * jw))
    else:
        x_onehot = coo_matrix(
            (np.ones(n_act), (np.repeat(np.arange(num_layers * k), ja), np.arange(n_act))),
            shape=(num_layers * k, n_act),
        )
        eqs.append(hstack([coo_matrix((num_layers * k, n_y)), x_onehot]))
        rhs.append(np.ones(num_layers * k))
    eq = vstack(eqs).tocsr()
    eq_rhs = np.concatenate(rhs)
    constraints = [LinearConstraint(eq, eq_rhs, eq_rhs)]
    rows, ubs, _ = _linear_rows(p, k, joint)
    if rows:
        constraints.append(LinearConstraint(np.stack(rows), -np.inf, np.asarray(ubs)))
    upper = np.ones(c.size)
    if p.fixed is not None and np.any(p.fixed >= 0):
        # a fixed layer's (layer, bucket) cells may only take its fixed candidate
        act_ub = np.ones(act_obj.shape)
        for layer in np.nonzero(p.fixed >= 0)[0]:
            act_ub[layer] = 0.0
            act_ub[layer, :, p.fixed[layer]] = 1.0
        upper[n_y:] = act_ub.ravel()
    res = milp(
        c,
        integrality=np.ones(c.size),
        bounds=Bounds(0.0, upper),
        constraints=constraints,
        options={"mip_rel_gap": mip_rel_gap, **({"time_limit": time_limit} if time_limit else {})},
    )
    if res.x is None:
        return None, None, res
    y = res.x[:n_y].reshape(num_layers, jw)
    act = res.x[n_y:].reshape(act_obj.shape)
    if joint:
        act = act.sum(axis=3)
    return act.argmax(axis=2).astype(np.int64), y.argmax(axis=1).astype(np.int64), res


def _repair(p: _Problem, a: np.ndarray, w: np.ndarray) -> int:
    """
    Enforce the budget exactly on a rounded solution (guards against solver feasibility tolerances): step down the
    choice that costs least error per unit of the violated rows it relieves, until every row holds. In place.
    """
    steps = 0
    while True:
        bad = p.violated(a, w)
        if not bad:
            return steps
        before = p.rows(a, w)
        best, best_ratio = None, math.inf
        free = np.ones(a.shape, bool) if p.fixed is None else (p.fixed < 0)[:, None].repeat(a.shape[1], 1)
        moves = [("a", idx) for idx in zip(*np.nonzero((a > 0) & free), strict=True)]
        moves += [("w", (i,)) for i in np.nonzero(w > 0)[0]]
        for kind, idx in moves:
            a2, w2 = a.copy(), w.copy()
            (a2 if kind == "a" else w2)[idx] -= 1
            after = p.rows(a2, w2)
            relief = sum((before[n] - after[n]) / max(abs(getattr(p.budget, n)), 1e-300) for n in bad)
            if relief <= 0:
                continue
            ratio = (p.objective(a2, w2) - p.objective(a, w)) / relief
            if ratio < best_ratio:
                best, best_ratio = (kind, idx), ratio
        if best is None:  # pragma: no cover - impossible when the smallest candidates are feasible
            return steps
        (a if best[0] == "a" else w)[best[1]] -= 1
        steps += 1


def _best_uniform(p: _Problem, num_layers: int, k: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """
    The feasible uniform (act bits, weight bits) pair of least objective (fixed layers keep their bits), or `None` if
    none is feasible.
    """
    best = None
    for ja in range(len(p.act_cands)):
        for jw in range(len(p.w_cands)):
            a = p.fix(np.full((num_layers, k), ja, dtype=np.int64))
            w = np.full(num_layers, jw, dtype=np.int64)
            if p.violated(a, w):
                continue
            obj = p.objective(a, w)
            if best is None or obj < best[2]:
                best = (a, w, obj)
    return best


def _infeasible_message(p: _Problem, name: str, value: float) -> str:
    bound = getattr(p.budget, name)
    if name == "avg_act_bits":
        b = int(p.act_cands.min())
        fixed = "" if p.fixed is None or not np.any(p.fixed >= 0) else ", fixed layers at their fixed bits"
        return (
            f"the activation budget of {bound:g} average bits is infeasible: the minimum achievable MAC-weighted "
            f"average is {value:g} bits (every layer at the smallest candidate {b}{fixed})"
        )
    if name == "avg_weight_bits":
        b = int(p.w_cands.min())
        return (
            f"the weight budget of {bound:g} average bits is infeasible: the minimum achievable MAC-weighted "
            f"average is {value:g} bits (every layer at the smallest candidate {b})"
        )
    if name == "max_weight_bytes":
        return (
            f"the memory budget max_weight_bytes={bound:g} is infeasible: the minimum achievable is {value:g} bytes "
            f"(every layer's weights at {int(p.w_cands.min())} bits)"
        )
    return (
        f"the latency budget max_relative_latency={bound:g} is infeasible: the minimum achievable is {value:.4g} "
        "(every layer at the smallest candidates)"
    )


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
