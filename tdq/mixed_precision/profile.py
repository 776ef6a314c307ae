"""`SensitivityProfile`: per-(layer, timestep bucket) Fisher sensitivity, with save/load, table and heatmap."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tdq.grid import TimestepGrid
from tdq.utils.io import atomic_write, json_safe, read_json_object, sha256_file

PROFILE_SCHEMA_VERSION = 1


_TENSOR_FIELDS = ("act_fisher", "act_range", "weight_fisher", "weight_range", "macs", "num_samples")


def _base_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path


def _with_suffix(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


@dataclass
class SensitivityProfile:
    r"""
    Sensitivity of every profiled layer in every timestep bucket.

    Args:
        layers (`list[str]`):
            Fully qualified names of the profiled modules (rows, L of them).
        grid (`dict`):
            The resolved `TimestepGrid.to_dict()` whose K buckets are the columns.
        act_fisher (`torch.Tensor` of shape `[L, K]`, float64):
            Fisher trace of the layer's input activation: the sum over its elements of the squared gradient of the
            per-sample denoising loss, averaged over the samples of the bucket. Exact per sample (each sample's
            activation only affects its own loss). Gradients are taken through this layer's use of the tensor only.
        act_range (`torch.Tensor` of shape `[L, K]`, float64):
            `max − min` of the layer's input activation over all samples of the bucket.
        weight_fisher (`torch.Tensor` of shape `[L, K]`, float64):
            Fisher trace of the layer's weight in the bucket (the planner sums it over K, since weights are shared
            across timesteps). Empirical batch-gradient estimate: `‖∇_W Σ_i loss_i‖² / batch` averaged over the
            bucket's batches; it equals the per-sample Fisher trace plus `(batch − 1)‖E[∇_W loss]‖²`.
        weight_range (`torch.Tensor` of shape `[L]`, float64):
            Root-mean-square quantization span of the weight, `sqrt(mean_g span_g²)` over the quantization groups
            `g` of the weight spec (per output channel by default; `span = 2·max|w|` when symmetric, `max − min`
            otherwise), so that the mean per-element noise at `b` bits is `(weight_range / (2^b − 1))² / 12`.
        macs (`torch.Tensor` of shape `[L]`, int64):
            Multiply-accumulates of the layer per denoiser sample and forward call (summed over repeated calls).
        num_samples (`torch.Tensor` of shape `[K]`, int64):
            Number of noised samples drawn in each bucket.
        meta (`dict`, *optional*, defaults to `{}`):
            JSON-safe details: seed, scheduler, prediction type, estimator names, sampled timestep ranges.
    """

    layers: list[str]
    grid: dict[str, Any]
    act_fisher: torch.Tensor
    act_range: torch.Tensor
    weight_fisher: torch.Tensor
    weight_range: torch.Tensor
    macs: torch.Tensor
    num_samples: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [str(n) for n in self.layers]
        self.grid = dict(self.grid)
        self.meta = dict(self.meta)
        for name in ("act_fisher", "act_range", "weight_fisher", "weight_range"):
            setattr(self, name, torch.as_tensor(getattr(self, name)).detach().cpu().to(torch.float64))
        self.macs = torch.as_tensor(self.macs).detach().cpu().to(torch.int64)
        self.num_samples = torch.as_tensor(self.num_samples).detach().cpu().to(torch.int64)
        problem = self._shape_problem()
        if problem:
            raise ValueError(problem)

    @property
    def num_buckets(self) -> int:
        """Number of timestep buckets K."""
        return int(self.act_fisher.shape[1]) if self.act_fisher.dim() == 2 else 0

    def _shape_problem(self) -> str | None:
        num_layers = len(self.layers)
        if self.act_fisher.dim() != 2:
            return f"act_fisher must have shape [L, K], got {list(self.act_fisher.shape)}"
        k = self.act_fisher.shape[1]
        grid_k = self.grid.get("num_buckets")
        if grid_k is not None and int(grid_k) != k:
            return f"the grid has num_buckets={grid_k} but act_fisher has {k} columns"
        want = {
            "act_fisher": (num_layers, k),
            "act_range": (num_layers, k),
            "weight_fisher": (num_layers, k),
            "weight_range": (num_layers,),
            "macs": (num_layers,),
            "num_samples": (k,),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                return f"{name} must have shape {list(shape)} for {num_layers} layers and {k} buckets, got {list(got)}"
        if len(set(self.layers)) != num_layers:
            return "layer names are not unique"
        for name in ("act_fisher", "act_range", "weight_fisher", "weight_range"):
            values = getattr(self, name)
            if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                row = int(
                    ((~torch.isfinite(values)) | (values < 0)).reshape(num_layers, -1).any(1).nonzero()[0]
                )
                return f"{name} of layer {self.layers[row]!r} holds NaN, inf or negative values"
        return None

    # -- serialisation ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """
        Save as `<path>.safetensors` (tensors) and `<path>.json` (layers, grid, meta, schema version).

        Each file is written through a temporary file and a rename, the tensors first; the JSON records the
        tensors file's sha256, so a save killed between the two renames leaves a pair that `load` refuses (never a
        mix of two profiles that loads).

        Args:
            path (`str` or `os.PathLike`): base path; a `.safetensors` or `.json` suffix is stripped first.

        Returns:
            `(json_path, safetensors_path)`.
        """
        from safetensors.torch import save_file

        base = _base_path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        st_path, json_path = _with_suffix(base, ".safetensors"), _with_suffix(base, ".json")
        tensors = {name: getattr(self, name).contiguous() for name in _TENSOR_FIELDS}
        metadata = {"schema_version": str(PROFILE_SCHEMA_VERSION)}
        atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        manifest = {
            "schema_version": PROFILE_SCHEMA_VERSION,
            "kind": "tdq.SensitivityProfile",
            "tensors": st_path.name,
            "tensors_sha256": sha256_file(st_path),
            "layers": self.layers,
            "grid": json_safe(self.grid),
            "meta": json_safe(self.meta),
        }
        text = json.dumps(manifest, indent=2) + "\n"
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
        return json_path, st_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityProfile:
        """
        Load a profile written by `save`, validating the schema version and every shape.

        Args:
            path (`str` or `os.PathLike`): base path (or either of the two files).

        Raises:
            `FileNotFoundError` naming the missing file; `ValueError` naming the file that is corrupt or inconsistent.
        """
        from safetensors.torch import load_file

        base = _base_path(path)
        st_path, json_path = _with_suffix(base, ".safetensors"), _with_suffix(base, ".json")
        for p in (json_path, st_path):
            if not p.is_file():
                raise FileNotFoundError(f"sensitivity profile file {str(p)!r} does not exist")
        manifest = read_json_object(json_path, ValueError, "sensitivity profile file")
        version = manifest.get("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            raise ValueError(
                f"sensitivity profile file {str(json_path)!r} has schema_version={version!r}; this tdq reads "
                f"version {PROFILE_SCHEMA_VERSION}"
            )
        missing = [k for k in ("layers", "grid") if k not in manifest]
        if missing:
            raise ValueError(f"sensitivity profile file {str(json_path)!r} is missing field(s) {missing}")
        try:
            tensors = load_file(str(st_path))
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(
                f"sensitivity profile file {str(st_path)!r} is not a readable safetensors file: {e}"
            ) from e
        digest = manifest.get("tensors_sha256")  # absent in files written before it was recorded
        if digest is not None and digest != sha256_file(st_path):
            raise ValueError(
                f"sensitivity profile file {str(st_path)!r} does not match {str(json_path)!r} (sha256 differs: "
                "another profile's tensors, or a save that was interrupted); profile again"
            )
        absent = [k for k in _TENSOR_FIELDS if k not in tensors]
        if absent:
            raise ValueError(f"sensitivity profile file {str(st_path)!r} lacks tensor(s) {absent}")
        try:
            return cls(
                layers=list(manifest["layers"]),
                grid=dict(manifest["grid"]),
                meta=dict(manifest.get("meta", {})),
                **{k: tensors[k] for k in _TENSOR_FIELDS},
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"sensitivity profile {str(json_path)!r} / {str(st_path)!r} is inconsistent: {e}"
            ) from e

    # -- reporting ----------------------------------------------------------------------------------------------
    def to_table(self, top: int = 20, sort_by: str = "act") -> str:
        r"""
        A markdown table of the most sensitive layers.

        Args:
            top (`int`, *optional*, defaults to `20`): number of rows.
            sort_by (`str`, *optional*, defaults to `"act"`): `"act"` (activation Fisher summed over buckets),
                `"weight"` (weight Fisher summed over buckets) or `"macs"`.
        """
        keys = {
            "act": self.act_fisher.sum(1),
            "weight": self.weight_fisher.sum(1),
            "macs": self.macs.double(),
        }
        if sort_by not in keys:
            raise ValueError(f"sort_by={sort_by!r} is unknown; choose one of {list(keys)}")
        order = torch.argsort(keys[sort_by], descending=True, stable=True)[: max(int(top), 0)].tolist()
        lines = [
            f"Sensitivity profile: {len(self.layers)} layers × {self.num_buckets} buckets "
            f"({self.grid.get('units', '?')} units), top {len(order)} by {sort_by}",
            "",
            "| # | layer | MACs | act Fisher Σ | peak bucket | act range max | weight Fisher Σ | weight range |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for rank, i in enumerate(order, 1):
            peak = int(torch.argmax(self.act_fisher[i])) if self.num_buckets else -1
            lines.append(
                f"| {rank} | `{self.layers[i]}` | {int(self.macs[i]):,} | {float(self.act_fisher[i].sum()):.3e} | "
                f"{peak} | {float(self.act_range[i].max()) if self.num_buckets else 0.0:.3g} | "
                f"{float(self.weight_fisher[i].sum()):.3e} | {float(self.weight_range[i]):.3g} |"
            )
        return "\n".join(lines) + "\n"

    def plot_heatmap(self, path: str | os.PathLike, kind: str = "act") -> Path:
        r"""
        Save a log-scale heatmap (layer × bucket) of the activation or weight Fisher trace as PNG.

        Args:
            path (`str` or `os.PathLike`): output PNG file.
            kind (`str`, *optional*, defaults to `"act"`): `"act"` or `"weight"`.

        Returns:
            `Path` of the written file.
        """
        if kind not in ("act", "weight"):
            raise ValueError(f"kind={kind!r} is unknown; choose 'act' or 'weight'")
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        values = (self.act_fisher if kind == "act" else self.weight_fisher).clone()
        positive = values[values > 0]
        floor = float(positive.min()) * 0.1 if positive.numel() else 1e-30
        logv = torch.log10(values.clamp_min(floor)).numpy()

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        num_layers = max(len(self.layers), 1)
        fig, ax = plt.subplots(
            figsize=(3.0 + 0.6 * max(self.num_buckets, 1), min(2.0 + 0.18 * num_layers, 40.0))
        )
        try:
            im = ax.imshow(logv, aspect="auto", cmap="magma")
            try:
                edges = TimestepGrid(**self.grid).edges().tolist()
                labels = [f"[{edges[k]:.4g}, {edges[k + 1]:.4g})" for k in range(self.num_buckets)]
            except Exception:
                labels = [str(k) for k in range(self.num_buckets)]
            ax.set_xticks(range(self.num_buckets), labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(self.layers)), self.layers if len(self.layers) <= 80 else [], fontsize=6)
            ax.set_xlabel(f"timestep bucket ({self.grid.get('units', '')})")
            ax.set_title(f"{'activation' if kind == 'act' else 'weight'} Fisher trace")
            fig.colorbar(im, ax=ax, label="log10 Fisher trace")
            fig.tight_layout()
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        finally:
            plt.close(fig)
        return path
