"""Mixed-precision schedules: which bit-width every layer uses for its weights and, per timestep bucket, for its
input activations.

A `PrecisionSchedule` is a plain table (layer × bucket → activation bits, layer → weight bits) with a JSON round
trip. Planners build one from a `tdq.sensitivity.SensitivityProfile`:

- `plan_uniform` gives every layer and bucket the same bit-widths (the baseline);
- `plan_precision` minimises the Fisher-weighted expected quantization error under a MAC-weighted average-bits
  budget, solved exactly as a binary program with `scipy.optimize.milp` (HiGHS).

`schedule_objective` scores any schedule with the same objective, so planners can be compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import ACT_BITS, WEIGHT_BITS

if TYPE_CHECKING:  # pragma: no cover
    from .sensitivity import SensitivityProfile

SCHEDULE_SCHEMA_VERSION = 1

__all__ = [
    "PrecisionBudget",
    "PrecisionSchedule",
    "plan_precision",
    "plan_uniform",
    "schedule_objective",
    "SCHEDULE_SCHEMA_VERSION",
]


# ----------------------------------------------------------------------------------------------------------------
# PrecisionSchedule
# ----------------------------------------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    """Convert numpy/torch scalars and tensors (recursively) into JSON-safe Python values."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _mac_weights(macs: Any, num_layers: int) -> np.ndarray:
    """Normalised per-layer weights from MACs (uniform when MACs are missing or all zero)."""
    if macs is None:
        return np.full(num_layers, 1.0 / max(num_layers, 1))
    m = np.asarray(torch.as_tensor(macs).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    if m.shape[0] != num_layers:
        raise ValueError(f"macs has {m.shape[0]} entries but the schedule has {num_layers} layers")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("macs must be finite and non-negative")
    total = m.sum()
    if total <= 0:
        return np.full(num_layers, 1.0 / max(num_layers, 1))
    return m / total


def _module_num_buckets(module: nn.Module) -> int | None:
    """The number of timestep buckets a quantized module holds, if it says so (itself or a direct child)."""
    k = getattr(module, "num_buckets", None)
    if isinstance(k, int):
        return k
    for child in module.children():
        k = getattr(child, "num_buckets", None)
        if isinstance(k, int):
            return k
    return None


@dataclass
class PrecisionSchedule:
    r"""
    Bit-widths per layer (weights) and per layer × timestep bucket (input activations).

    Args:
        layers (`list[str]`):
            Fully qualified module names, in row order.
        act_bits (`torch.LongTensor` of shape `[L, K]`):
            Activation bit-width of layer `l` in timestep bucket `k`.
        weight_bits (`torch.LongTensor` of shape `[L]`):
            Weight bit-width of layer `l` (weights are shared across timesteps).
        grid (`dict`):
            The timestep grid the buckets refer to, as `TimestepGrid.to_dict()`.
        meta (`dict`, *optional*, defaults to `{}`):
            Free-form JSON-safe information: planner name, budget, objective value, achieved averages, MACs.
    """

    layers: list[str]
    act_bits: torch.Tensor
    weight_bits: torch.Tensor
    grid: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [str(n) for n in self.layers]
        self.act_bits = torch.as_tensor(self.act_bits).detach().cpu().to(torch.long)
        self.weight_bits = torch.as_tensor(self.weight_bits).detach().cpu().to(torch.long)
        self.grid = dict(self.grid)
        self.meta = dict(self.meta)
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ValueError` if shapes, names or bit-widths are inconsistent."""
        num_layers = len(self.layers)
        if len(set(self.layers)) != num_layers:
            dup = sorted({n for n in self.layers if self.layers.count(n) > 1})
            raise ValueError(f"schedule lists layer(s) {dup} more than once")
        if self.act_bits.dim() != 2 or self.act_bits.shape[0] != num_layers:
            raise ValueError(f"act_bits must have shape [L={num_layers}, K], got {list(self.act_bits.shape)}")
        if self.weight_bits.shape != (num_layers,):
            raise ValueError(
                f"weight_bits must have shape [L={num_layers}], got {list(self.weight_bits.shape)}"
            )
        k = self.grid.get("num_buckets")
        if k is not None and int(k) != self.act_bits.shape[1]:
            raise ValueError(
                f"act_bits has {self.act_bits.shape[1]} buckets but the grid has num_buckets={k}"
            )
        if num_layers:
            bad_a = [b for b in self.act_bits.unique().tolist() if b not in ACT_BITS]
            if bad_a:
                raise ValueError(
                    f"activation bit-widths {bad_a} are not supported; choose from {list(ACT_BITS)}"
                )
            bad_w = [b for b in self.weight_bits.unique().tolist() if b not in WEIGHT_BITS]
            if bad_w:
                raise ValueError(
                    f"weight bit-widths {bad_w} are not supported; choose from {list(WEIGHT_BITS)}"
                )

    @property
    def num_buckets(self) -> int:
        """Number of timestep buckets K."""
        return int(self.act_bits.shape[1])

    # -- summaries ----------------------------------------------------------------------------------------------
    def average_bits(self, macs: torch.Tensor | list[float] | None = None) -> dict[str, float]:
        r"""
        MAC-weighted average bit-widths.

        The activation average weights each layer by its share of the MACs and each bucket of a layer equally;
        the weight average weights each layer by its share of the MACs.

        Args:
            macs (`torch.Tensor` or `list[float]` of shape `[L]`, *optional*):
                MACs per sample of each layer. Defaults to `meta["macs"]` when present, else equal weights.

        Returns:
            `dict` with float entries `"act"` and `"weight"`.
        """
        if macs is None:
            macs = self.meta.get("macs")
        w = _mac_weights(macs, len(self.layers))
        a = self.act_bits.double().numpy()
        return {
            "act": float((w[:, None] * a).sum() / max(self.num_buckets, 1)),
            "weight": float((w * self.weight_bits.double().numpy()).sum()),
        }

    def _bucket_labels(self) -> list[str]:
        try:
            from .config import TimestepGrid

            edges = TimestepGrid(**self.grid).edges().tolist()
            return [f"[{edges[k]:.4g}, {edges[k + 1]:.4g})" for k in range(self.num_buckets)]
        except Exception:  # unresolved or foreign grid dicts: fall back to indices
            return [f"b{k}" for k in range(self.num_buckets)]

    def to_table(self) -> str:
        """A markdown table: one row per layer with its weight bits and activation bits per bucket."""
        labels = self._bucket_labels()
        units = self.grid.get("units", "")
        lines = [
            f"Precision schedule ({self.meta.get('planner', 'unknown')} planner, {len(self.layers)} layers, "
            f"{self.num_buckets} buckets in {units} units)",
            "",
            "| layer | W bits | " + " | ".join(labels) + " |",
            "|---|---:|" + "---:|" * self.num_buckets,
        ]
        for i, name in enumerate(self.layers):
            acts = " | ".join(str(b) for b in self.act_bits[i].tolist())
            lines.append(f"| `{name}` | {int(self.weight_bits[i])} | {acts} |")
        avg = self.average_bits()
        lines += [
            "",
            f"MAC-weighted average: activations {avg['act']:.3f} bits, weights {avg['weight']:.3f} bits",
        ]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """
        Save a heatmap of the schedule as PNG: weight bits (left column) and activation bits (layer × bucket).

        Args:
            path (`str` or `os.PathLike`): output PNG file.

        Returns:
            `Path` of the written file.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        num_layers = max(len(self.layers), 1)
        all_bits = (
            torch.cat([self.act_bits.flatten(), self.weight_bits]) if self.layers else torch.tensor([8])
        )
        vmin, vmax = int(all_bits.min()), int(all_bits.max())
        height = min(2.0 + 0.18 * num_layers, 40.0)
        fig, (ax_w, ax_a) = plt.subplots(
            1, 2, figsize=(3.0 + 0.6 * self.num_buckets, height), width_ratios=[1, max(self.num_buckets, 1)]
        )
        try:
            cmap = plt.get_cmap("viridis", max(vmax - vmin + 1, 2))
            ax_w.imshow(
                self.weight_bits[:, None].numpy(), aspect="auto", cmap=cmap, vmin=vmin - 0.5, vmax=vmax + 0.5
            )
            im = ax_a.imshow(
                self.act_bits.numpy(), aspect="auto", cmap=cmap, vmin=vmin - 0.5, vmax=vmax + 0.5
            )
            ax_w.set_xticks([0], ["W"])
            ax_a.set_xticks(
                range(self.num_buckets), self._bucket_labels(), rotation=60, ha="right", fontsize=7
            )
            show_names = len(self.layers) <= 80
            ax_w.set_yticks(range(len(self.layers)), self.layers if show_names else [], fontsize=6)
            ax_a.set_yticks([])
            ax_a.set_xlabel(f"timestep bucket ({self.grid.get('units', '')})")
            ax_a.set_title("activation bits")
            fig.colorbar(im, ax=ax_a, ticks=range(vmin, vmax + 1), label="bits")
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path

    # -- application --------------------------------------------------------------------------------------------
    def apply_(self, model: nn.Module) -> nn.Module:
        r"""
        Set the bit-widths on a quantized model in place.

        Calls `model.get_submodule(name).set_bits(weight_bits=int, act_bits=torch.LongTensor[K])` for every layer.
        Every layer is checked first (it exists, has `set_bits`, and holds K buckets when it exposes `num_buckets`
        itself or on a direct child), so those failures leave the model unchanged; a `ValueError` raised by
        `set_bits` itself is re-raised naming the layer.

        Args:
            model (`torch.nn.Module`): a model whose scheduled layers are tdq quantized modules.

        Returns:
            The same `model`.

        Raises:
            `KeyError`: a layer of the schedule is not a submodule of `model`.
            `TypeError`: a layer has no `set_bits` method (it was not quantized).
            `ValueError`: a layer holds a different number of timestep buckets than the schedule.
        """
        modules = []
        for name in self.layers:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise KeyError(
                    f"layer {name!r} of the precision schedule is not a submodule of {type(model).__name__}"
                ) from None
            if not callable(getattr(module, "set_bits", None)):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) has no set_bits(); quantize the model with "
                    "tdq.quantize_ before applying a precision schedule"
                )
            k = _module_num_buckets(module)
            if k is not None and k != self.num_buckets:
                raise ValueError(
                    f"layer {name!r} holds {k} timestep buckets but the schedule has {self.num_buckets}"
                )
            modules.append(module)
        for i, (name, module) in enumerate(zip(self.layers, modules, strict=True)):
            try:
                module.set_bits(weight_bits=int(self.weight_bits[i]), act_bits=self.act_bits[i].clone())
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from e
        return model

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict (JSON-safe) form, the inverse of `from_dict`."""
        return {
            "schema_version": SCHEDULE_SCHEMA_VERSION,
            "layers": list(self.layers),
            "act_bits": self.act_bits.tolist(),
            "weight_bits": self.weight_bits.tolist(),
            "grid": _json_safe(self.grid),
            "meta": _json_safe(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionSchedule:
        """Build a schedule from `to_dict` output; raises `ValueError` on a missing field or bad shape."""
        if not isinstance(data, dict):
            raise ValueError(f"a precision schedule must be a mapping, got {type(data).__name__}")
        version = data.get("schema_version", SCHEDULE_SCHEMA_VERSION)
        if version != SCHEDULE_SCHEMA_VERSION:
            raise ValueError(
                f"precision schedule schema_version={version!r} is not readable; this tdq reads "
                f"version {SCHEDULE_SCHEMA_VERSION}"
            )
        missing = [k for k in ("layers", "act_bits", "weight_bits", "grid") if k not in data]
        if missing:
            raise ValueError(f"precision schedule is missing field(s) {missing}")
        num_layers = len(data["layers"])
        act = data["act_bits"]
        act_t = (
            torch.tensor(act, dtype=torch.long)
            if num_layers
            else torch.zeros(0, _k_of(data), dtype=torch.long)
        )
        return cls(
            layers=list(data["layers"]),
            act_bits=act_t,
            weight_bits=torch.tensor(data["weight_bits"], dtype=torch.long),
            grid=dict(data["grid"]),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """
        Write the schedule as JSON.

        Args:
            path (`str` or `os.PathLike`): output file; `.json` is appended when the name has no suffix.

        Returns:
            `Path` of the written file.
        """
        path = _json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrecisionSchedule:
        """
        Read a schedule written by `save`.

        Args:
            path (`str` or `os.PathLike`): the JSON file (`.json` is appended when the name has no suffix).

        Raises:
            `FileNotFoundError` if the file is missing, `ValueError` (naming the file) if it is not a valid schedule.
        """
        path = _json_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"precision schedule file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"precision schedule file {str(path)!r} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"precision schedule file {str(path)!r} is invalid: {e}") from e


def _k_of(data: dict[str, Any]) -> int:
    return int(dict(data.get("grid", {})).get("num_buckets") or 0)


def _json_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix else path.with_suffix(".json")


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
