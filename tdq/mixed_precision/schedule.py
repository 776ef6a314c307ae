"""`PrecisionSchedule`: activation bits per (layer, bucket) and weight bits per layer, with save/load and apply."""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tdq.config import ACT_BITS, WEIGHT_BITS
from tdq.utils.io import atomic_write, json_safe, read_json_object

SCHEDULE_SCHEMA_VERSION = 1
# Activation bit-widths at or above this mean "float": the layer's input is not quantized (16-bit activation
# quantizers pass their input through unchanged, see `TimestepActQuantizer`).
FLOAT_BITS = 16


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
    def average_bits(
        self, macs: torch.Tensor | list[float] | None = None, bucket_weights: Any = None
    ) -> dict[str, float]:
        r"""
        MAC-weighted average bit-widths.

        The activation average weights each layer by its share of the MACs and each bucket of a layer by the
        sampler's step occupancy (equally when none is known); the weight average weights each layer by its share of
        the MACs.

        Args:
            macs (`torch.Tensor` or `list[float]` of shape `[L]`, *optional*):
                MACs per sample of each layer. Defaults to `meta["macs"]` when present, else equal weights.
            bucket_weights (`Sequence[float]` of shape `[K]`, *optional*):
                Steps (or share of steps) of the sampler in each bucket. Defaults to `meta["bucket_weights"]` when
                present, else equal weights.

        Returns:
            `dict` with float entries `"act"` and `"weight"`.
        """
        if macs is None:
            macs = self.meta.get("macs")
        if bucket_weights is None:
            bucket_weights = self.meta.get("bucket_weights")
        w = _mac_weights(macs, len(self.layers))
        k = max(self.num_buckets, 1)
        occ = np.ones(self.num_buckets)
        if bucket_weights is not None:
            occ = np.asarray(torch.as_tensor(bucket_weights).double().numpy(), dtype=np.float64).reshape(-1)
            if (
                occ.shape[0] != self.num_buckets
                or not np.all(np.isfinite(occ))
                or occ.sum() <= 0
                or occ.min() < 0
            ):
                raise ValueError(
                    f"bucket_weights must be {self.num_buckets} non-negative numbers, not all zero"
                )
            occ = occ * self.num_buckets / occ.sum()
        a = self.act_bits.double().numpy()
        return {
            "act": float((w[:, None] * occ[None, :] * a).sum() / k),
            "weight": float((w * self.weight_bits.double().numpy()).sum()),
        }

    def _bucket_labels(self) -> list[str]:
        try:
            from tdq.grid import TimestepGrid

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
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        finally:
            plt.close(fig)
        return path

    def float_cells(self) -> list[tuple[str, int]]:
        """
        The (layer, bucket) cells whose input activations stay in floating point (`act_bits >= 16`), e.g. chosen by
        `plan_precision` with `PrecisionBudget(float_fallback=True)`.

        Returns:
            `list[tuple[str, int]]` of `(layer name, bucket index)`, in row then bucket order.
        """
        rows, cols = torch.nonzero(self.act_bits >= FLOAT_BITS, as_tuple=True)
        return [(self.layers[int(r)], int(c)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]

    # -- application --------------------------------------------------------------------------------------------
    def apply_(self, model: nn.Module, attention_bits: int | None = None) -> nn.Module:
        r"""
        Set the bit-widths on a quantized model in place.

        Calls `model.get_submodule(name).set_bits(weight_bits=int, act_bits=torch.LongTensor[K])` for every layer.
        Every layer is checked first (it exists, has `set_bits`, and holds K buckets when it exposes `num_buckets`
        itself or on a direct child), so those failures leave the model unchanged; a `ValueError` raised by
        `set_bits` itself is re-raised naming the layer.

        The schedule covers the quantized layers only, not the Q/K/V/softmax quantizers of quantized attention
        (`TDQConfig(attention=True)`): a model that has them is refused unless `attention_bits` says which bit-width
        they take, so a mixed-precision model never silently keeps its attention matmuls at the quant config's bits.

        Args:
            model (`torch.nn.Module`): a model whose scheduled layers are tdq quantized modules.
            attention_bits (`int`, *optional*):
                Bit-width (2..16, every bucket) for the attention matmul quantizers. Required when the model has
                any; ignored otherwise.

        Returns:
            The same `model`.

        Raises:
            `KeyError`: a layer of the schedule is not a submodule of `model`.
            `TypeError`: a layer has no `set_bits` method (it was not quantized).
            `ValueError`: a layer holds a different number of timestep buckets than the schedule; the model has
                attention quantizers and `attention_bits` is not given or not in 2..16.
        """
        from tdq.quant.attention import iter_attention_quantizers

        attn = list(iter_attention_quantizers(model))
        if attn:
            if attention_bits is None:
                raise ValueError(
                    f"the model has {len(attn)} attention matmul quantizers (e.g. {attn[0][0]!r}) that a precision "
                    "schedule does not cover; pass attention_bits= to PrecisionSchedule.apply_ (e.g. 8) to set "
                    "their bit-width"
                )
            if not _is_int(attention_bits) or int(attention_bits) not in ACT_BITS:
                raise ValueError(
                    f"attention_bits={attention_bits!r} must be an integer in {ACT_BITS[0]}..{ACT_BITS[-1]}"
                )
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
        for _, q in attn:
            q.set_bits(int(attention_bits))
        return model

    # -- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict (JSON-safe) form, the inverse of `from_dict`."""
        return {
            "schema_version": SCHEDULE_SCHEMA_VERSION,
            "layers": list(self.layers),
            "act_bits": self.act_bits.tolist(),
            "weight_bits": self.weight_bits.tolist(),
            "grid": json_safe(self.grid),
            "meta": json_safe(self.meta),
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
        _check_schedule_types(data)
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
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # a kill never leaves half a schedule
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
        data = read_json_object(path, ValueError, "precision schedule file")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"precision schedule file {str(path)!r} is invalid: {e}") from e


def _k_of(data: dict[str, Any]) -> int:
    return int(dict(data.get("grid", {})).get("num_buckets") or 0)


def _json_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix else path.with_suffix(".json")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_array(value: Any, dims: int) -> bool:
    """Whether `value` is an integer tensor/array of `dims` dimensions or nested lists/tuples of integers."""
    if isinstance(value, torch.Tensor | np.ndarray):
        kind = (
            value.dtype.kind if isinstance(value, np.ndarray) else ("f" if value.is_floating_point() else "i")
        )
        return value.ndim == dims and kind in "iu" and value.dtype != torch.bool
    if not isinstance(value, list | tuple):
        return False
    return all(_int_array(v, dims - 1) if dims > 1 else _is_int(v) for v in value)


def _check_schedule_types(data: dict[str, Any]) -> None:
    """Raise `ValueError` naming the field unless layers/bits have the types of `to_dict` output."""
    layers = data["layers"]
    if not isinstance(layers, list | tuple) or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(
            f"precision schedule field layers={str(layers)[:60]!r} must be a list of layer names"
        )
    if layers and not _int_array(data["act_bits"], 2):
        raise ValueError(
            "precision schedule field act_bits must be a list (one per layer) of lists of integers"
        )
    if not _int_array(data["weight_bits"], 1):
        raise ValueError("precision schedule field weight_bits must be a list of integers (one per layer)")
    if not isinstance(data["grid"], dict):
        raise ValueError("precision schedule field grid must be a mapping")
