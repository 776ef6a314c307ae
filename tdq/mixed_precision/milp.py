"""The exact precision planner's binary program: the problem in numpy (`_Problem`: error tables, budget rows,
fixed cells), its linear rows and scaled objective for `scipy.optimize.milp` (HiGHS), the solve, the repair of a
rounded solution, the best uniform fallback, and the infeasibility message. `tdq.mixed_precision.planners` builds
the problem from a profile and a budget and turns the solution into a `PrecisionSchedule`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tdq.mixed_precision.planners import PrecisionBudget


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
