"""Per-layer, per-timestep-bucket sensitivity of a diffusion denoiser to quantization.

`profile_sensitivity` runs the denoising loss at train timesteps drawn inside every bucket of a `TimestepGrid`
and measures, for each `nn.Linear` / `nn.Conv2d` layer,

- the Fisher trace of its input activation (sum over elements of the mean squared loss gradient),
- the Fisher trace of its weight,
- the range of its input activation in the bucket, the range of its weight, and its MACs per sample.

The result, a `SensitivityProfile`, feeds `tdq.schedule.plan_precision`. Profiles are saved as safetensors plus a
JSON sidecar (no pickle).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantSpec, TDQConfig, TimestepGrid

PROFILE_SCHEMA_VERSION = 1

__all__ = ["SensitivityProfile", "profile_sensitivity", "PROFILE_SCHEMA_VERSION", "default_forward_fn"]

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
        return None

    # -- serialisation ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """
        Save as `<path>.safetensors` (tensors) and `<path>.json` (layers, grid, meta, schema version).

        Args:
            path (`str` or `os.PathLike`): base path; a `.safetensors` or `.json` suffix is stripped first.

        Returns:
            `(json_path, safetensors_path)`.
        """
        from safetensors.torch import save_file

        from .schedule import _json_safe

        base = _base_path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        st_path, json_path = _with_suffix(base, ".safetensors"), _with_suffix(base, ".json")
        tensors = {name: getattr(self, name).contiguous() for name in _TENSOR_FIELDS}
        save_file(tensors, str(st_path), metadata={"schema_version": str(PROFILE_SCHEMA_VERSION)})
        manifest = {
            "schema_version": PROFILE_SCHEMA_VERSION,
            "kind": "tdq.SensitivityProfile",
            "tensors": st_path.name,
            "layers": self.layers,
            "grid": _json_safe(self.grid),
            "meta": _json_safe(self.meta),
        }
        json_path.write_text(json.dumps(manifest, indent=2) + "\n")
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
        try:
            manifest = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"sensitivity profile file {str(json_path)!r} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict):
            raise ValueError(f"sensitivity profile file {str(json_path)!r} does not hold a JSON object")
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
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path


# ----------------------------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------------------------


def default_forward_fn(denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Call `denoiser(x_t, t)` and return its `.sample` (diffusers outputs), first element (tuples) or the tensor."""
    out = denoiser(x_t, t)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return out[0]
    return out


def _timesteps_in_units(scheduler: Any, units: str, num_train: int) -> torch.Tensor:
    """The grid-unit value of every train timestep `0..num_train-1` (float64)."""
    tau = torch.arange(num_train, dtype=torch.float64)
    if units == "train_timestep":
        return tau
    if units == "t":
        return tau / num_train
    if units == "sigma":
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(
                f"grid units 'sigma' need a scheduler with alphas_cumprod; {type(scheduler).__name__} has none"
            )
        ac = torch.as_tensor(ac, dtype=torch.float64).cpu()[:num_train]
        return ((1 - ac) / ac).sqrt()
    raise ValueError(f"grid units {units!r} are not supported by profile_sensitivity")


def _resolve_grid(
    grid: TimestepGrid | dict | None, config: TDQConfig | None, scheduler: Any, num_train: int
) -> tuple[TimestepGrid, torch.Tensor]:
    """The resolved grid and the grid-unit value of every train timestep."""
    if grid is None:
        if config is None:
            raise ValueError("profile_sensitivity needs a grid (or a config whose grid is used)")
        grid = config.grid
    if isinstance(grid, dict):
        grid = TimestepGrid(**grid)
    units = "train_timestep" if grid.units == "auto" else grid.units
    u = _timesteps_in_units(scheduler, units, num_train)
    if not grid.resolved:
        if units == "t":
            lo, hi = 0.0, 1.0
        elif units == "sigma":
            lo, hi = float(u.min()), float(u.max())
        else:
            lo, hi = 0.0, float(num_train - 1)
        grid = grid.resolve(units, lo, hi, spacing="log" if units == "sigma" else None)
    grid.validate()
    return grid, u


def _select_layers(
    denoiser: nn.Module, layers: Sequence[str] | None, config: TDQConfig | None
) -> list[tuple[str, nn.Module]]:
    if layers is not None:
        out = []
        for name in layers:
            try:
                module = denoiser.get_submodule(name)
            except AttributeError:
                raise KeyError(f"layer {name!r} is not a submodule of {type(denoiser).__name__}") from None
            if not isinstance(module, nn.Linear | nn.Conv2d):
                raise ValueError(
                    f"layer {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d are profiled"
                )
            out.append((name, module))
        if len({n for n, _ in out}) != len(out):
            raise ValueError("the layers list names a module more than once")
    else:
        out = [
            (name, m)
            for name, m in denoiser.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d) and (config is None or config.selects(name))
        ]
    if not out:
        raise ValueError("no nn.Linear / nn.Conv2d layer was selected for sensitivity profiling")
    return out


def _weight_range(weight: torch.Tensor, spec: QuantSpec) -> float:
    w = weight.detach().float()
    w2 = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    if spec.granularity == "per_tensor":
        groups = w2.reshape(1, -1)
    elif spec.granularity == "per_group" and w2.shape[1] % int(spec.group_size) == 0:
        groups = w2.reshape(-1, int(spec.group_size))
    else:
        groups = w2
    if spec.symmetric:
        span = 2 * groups.abs().amax(dim=1)
    else:
        span = groups.amax(dim=1) - groups.amin(dim=1)
    return float(span.double().pow(2).mean().sqrt())


def _per_output_macs(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw
    return module.in_features


def _loss_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    prediction_type = getattr(scheduler, "config", {}).get("prediction_type", "epsilon") or "epsilon"
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"prediction_type={prediction_type!r} is not supported; use epsilon, v_prediction or sample"
    )


def profile_sensitivity(
    denoiser: nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    grid: TimestepGrid | dict | None,
    *,
    layers: Sequence[str] | None = None,
    config: TDQConfig | None = None,
    samples_per_bucket: int = 8,
    batch_size: int = 8,
    forward_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SensitivityProfile:
    r"""
    Measure the Fisher sensitivity of every layer's input activation and weight in every timestep bucket.

    For each bucket, `samples_per_bucket` integer train timesteps are drawn uniformly among those whose grid value
    lies inside the bucket, clean samples `x0` (cycled) are noised with `scheduler.add_noise`, and the denoising
    loss (per-sample mean squared error against the target given by `scheduler.config.prediction_type`, summed
    over the batch) is back-propagated. Hooks record the squared gradients of each selected layer's input (through
    that layer only) and weight, the input's min/max and, on the first batch, the layer's MACs.

    The model runs in eval mode; its training flag, `requires_grad` flags and `.grad` tensors are restored and all
    hooks removed afterwards, also on error. Results are deterministic for a fixed `seed` (up to the determinism of
    the device's kernels).

    Args:
        denoiser (`torch.nn.Module`):
            The floating-point denoiser (e.g. `UNet2DModel`).
        scheduler (diffusers scheduler):
            Supplies `add_noise`, `config.num_train_timesteps`, `config.prediction_type` (and `get_velocity` for
            v-prediction, `alphas_cumprod` for sigma grids). Flow-matching schedulers are not supported.
        x0 (`torch.Tensor` of shape `[N, ...]`):
            Clean samples (latents for latent models): the FP model's own samples (data-free) or real data. Moved
            to the denoiser's device.
        grid (`TimestepGrid` or `dict`, *optional*):
            The bucket grid; `None` takes `config.grid`. Unresolved fields are filled from the scheduler
            (`"auto"` → `"train_timestep"` on `[0, num_train_timesteps − 1]`; `"t"` on `[0, 1]` with
            `t = timestep / num_train_timesteps`; `"sigma"` on the scheduler's sigma range).
        layers (`list[str]`, *optional*):
            Explicit module names to profile (each an `nn.Linear` or `nn.Conv2d`). Defaults to every such module,
            filtered by `config.selects(name)` when a config is given.
        config (`TDQConfig`, *optional*):
            Selects layers, gives the default grid, and the weight spec used for `weight_range`.
        samples_per_bucket (`int`, *optional*, defaults to `8`):
            Noised samples per bucket.
        batch_size (`int`, *optional*, defaults to `8`):
            Samples per forward/backward pass.
        forward_fn (`Callable`, *optional*):
            `forward_fn(denoiser, x_t, timesteps) -> prediction` with integer train timesteps of shape `[B]`; use it
            for conditioning (e.g. `encoder_hidden_states`) or other time conventions. Defaults to
            `default_forward_fn`. A prediction with twice the target's channels (learned variance) is cut to the
            first half.
        seed (`int`, *optional*, defaults to `0`):
            Seed for timesteps and noise (bucket `k` uses its own generator, so buckets are independent).
        progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar.

    Returns:
        `SensitivityProfile`.
    """
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError("x0 must be a tensor of clean samples with shape [N, ...], N >= 1")
    if int(samples_per_bucket) < 1 or int(batch_size) < 1:
        raise ValueError("samples_per_bucket and batch_size must be positive integers")
    if not callable(getattr(scheduler, "add_noise", None)):
        raise ValueError(
            f"{type(scheduler).__name__} has no add_noise(); profile_sensitivity needs a DDPM-style scheduler"
        )
    forward_fn = forward_fn or default_forward_fn
    num_train = int(scheduler.config.num_train_timesteps)

    selected = _select_layers(denoiser, layers, config)
    names = [n for n, _ in selected]
    modules = [m for _, m in selected]
    num_layers = len(selected)

    grid_obj, u_grid = _resolve_grid(grid, config, scheduler, num_train)
    num_buckets = grid_obj.num_buckets
    edges = grid_obj.edges()

    # Candidate train timesteps per bucket.
    candidates: list[torch.Tensor] = []
    empty_buckets: list[int] = []
    for k in range(num_buckets):
        hi_ok = u_grid <= edges[k + 1] if k == num_buckets - 1 else u_grid < edges[k + 1]
        cand = torch.nonzero((u_grid >= edges[k]) & hi_ok).flatten()
        if cand.numel() == 0:
            center = grid_obj.centers()[k]
            cand = torch.argmin((u_grid - center).abs()).reshape(1)
            empty_buckets.append(k)
        candidates.append(cand)

    weight_spec = (
        config.weight if config is not None else QuantSpec(granularity="per_channel", symmetric=True)
    )
    if config is not None:
        specs = [config.layer_specs(n)[0] for n in names]
    else:
        specs = [weight_spec] * num_layers
    weight_range = torch.tensor(
        [_weight_range(m.weight, s) for m, s in zip(modules, specs, strict=True)], dtype=torch.float64
    )

    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else x0.device
    x0 = x0.detach().to(device).clone()
    act_fisher = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    weight_fisher = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    act_min = torch.full((num_layers, num_buckets), math.inf, dtype=torch.float64)
    act_max = torch.full((num_layers, num_buckets), -math.inf, dtype=torch.float64)
    num_samples = torch.zeros(num_buckets, dtype=torch.int64)
    macs_total = torch.zeros(num_layers, dtype=torch.float64)
    seen = torch.zeros(num_layers, dtype=torch.bool)

    state: dict[str, Any] = {"measure_macs": False}
    batch_sq = torch.zeros(num_layers, dtype=torch.float32, device=device)
    batch_min = torch.full((num_layers,), math.inf, dtype=torch.float32, device=device)
    batch_max = torch.full((num_layers,), -math.inf, dtype=torch.float32, device=device)
    batch_macs = torch.zeros(num_layers, dtype=torch.float64)

    def make_pre_hook(idx: int):
        def grad_hook(g: torch.Tensor) -> None:
            batch_sq[idx] += g.detach().float().pow(2).sum().to(batch_sq.device)

        def pre_hook(module, args, kwargs):
            if args:
                x, where = args[0], "args"
            elif "input" in kwargs:
                x, where = kwargs["input"], "kwargs"
            else:
                return None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return None
            with torch.no_grad():
                xd = x.detach()
                batch_min[idx] = torch.minimum(batch_min[idx], xd.min().float().to(batch_min.device))
                batch_max[idx] = torch.maximum(batch_max[idx], xd.max().float().to(batch_max.device))
            # A fresh autograd node per use, so the gradient is the one flowing through this layer only (inputs
            # shared by several layers, e.g. to_q/to_k/to_v, would otherwise see the sum of all consumers).
            xa = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            xa.register_hook(grad_hook)
            if where == "args":
                return (xa, *args[1:]), kwargs
            return args, {**kwargs, "input": xa}

        return pre_hook

    def make_post_hook(idx: int, per_out: int):
        def post_hook(module, args, output):
            seen[idx] = True
            if state["measure_macs"] and isinstance(output, torch.Tensor):
                batch_macs[idx] += float(output.numel()) * per_out

        return post_hook

    was_training = denoiser.training
    saved_flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    weights = [m.weight for m in modules]
    saved_grads = [(w, w.grad) for w in weights]
    handles = []
    try:
        denoiser.eval()
        for p in denoiser.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True))
            handles.append(m.register_forward_hook(make_post_hook(i, _per_output_macs(m))))

        total_batches = sum(math.ceil(int(samples_per_bucket) / int(batch_size)) for _ in range(num_buckets))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_batches, desc="sensitivity", leave=False)
        timestep_ranges = []
        first_batch = True
        with torch.enable_grad():
            for k in range(num_buckets):
                gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
                cand = candidates[k]
                t_all = cand[torch.randint(cand.numel(), (int(samples_per_bucket),), generator=gen)]
                noise_all = torch.randn(
                    (int(samples_per_bucket), *x0.shape[1:]), generator=gen, dtype=torch.float32
                )
                idx_all = torch.arange(int(samples_per_bucket)) % x0.shape[0]
                timestep_ranges.append([int(t_all.min()), int(t_all.max())])
                num_batches = 0
                for start in range(0, int(samples_per_bucket), int(batch_size)):
                    sl = slice(start, min(start + int(batch_size), int(samples_per_bucket)))
                    xb = x0[idx_all[sl].to(device)]
                    noise = noise_all[sl].to(device=device, dtype=x0.dtype)
                    t = t_all[sl].to(device=device, dtype=torch.long)
                    x_t = scheduler.add_noise(xb, noise, t)
                    target = _loss_target(scheduler, xb, noise, t)

                    batch_sq.zero_()
                    batch_min.fill_(math.inf)
                    batch_max.fill_(-math.inf)
                    state["measure_macs"] = first_batch
                    pred = forward_fn(denoiser, x_t, t)
                    state["measure_macs"] = False
                    if (
                        pred.shape != target.shape
                        and pred.dim() >= 2
                        and pred.shape[1] == 2 * target.shape[1]
                    ):
                        pred = pred[:, : target.shape[1]]
                    if pred.shape != target.shape:
                        raise ValueError(
                            f"the denoiser's prediction has shape {list(pred.shape)} but the target has "
                            f"{list(target.shape)}; pass a forward_fn that returns the prediction"
                        )
                    loss = (pred.float() - target.float()).pow(2).flatten(1).mean(1).sum()
                    if not loss.requires_grad:
                        raise RuntimeError(
                            "none of the selected layers takes part in the denoiser's forward pass"
                        )
                    loss.backward()

                    n = sl.stop - sl.start
                    act_fisher[:, k] += batch_sq.double().cpu()
                    act_min[:, k] = torch.minimum(act_min[:, k], batch_min.double().cpu())
                    act_max[:, k] = torch.maximum(act_max[:, k], batch_max.double().cpu())
                    zero = torch.zeros((), device=device)
                    w_sq = [
                        zero if w.grad is None else w.grad.detach().float().pow(2).sum().to(device)
                        for w in weights
                    ]
                    weight_fisher[:, k] += torch.stack(w_sq).double().cpu() / n
                    for w in weights:
                        w.grad = None
                    if first_batch:
                        macs_total += batch_macs / x_t.shape[0]
                        first_batch = False
                    num_samples[k] += n
                    num_batches += 1
                    if bar is not None:
                        bar.update(1)
                act_fisher[:, k] /= max(int(num_samples[k]), 1)
                weight_fisher[:, k] /= max(num_batches, 1)
        if bar is not None:
            bar.close()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for w, g in saved_grads:
            w.grad = g
        denoiser.train(was_training)

    act_range = torch.where(torch.isfinite(act_max - act_min), act_max - act_min, torch.zeros_like(act_max))
    meta = {
        "seed": int(seed),
        "samples_per_bucket": int(samples_per_bucket),
        "batch_size": int(batch_size),
        "num_x0": int(x0.shape[0]),
        "denoiser": type(denoiser).__name__,
        "scheduler": type(scheduler).__name__,
        "num_train_timesteps": num_train,
        "prediction_type": getattr(scheduler, "config", {}).get("prediction_type", "epsilon"),
        "act_fisher_estimator": "per_sample_exact",
        "weight_fisher_estimator": "batch_gradient",
        "weight_range": "rms_group_span",
        "weight_spec": {"granularity": weight_spec.granularity, "symmetric": weight_spec.symmetric},
        "timestep_ranges": timestep_ranges,
        "empty_buckets": empty_buckets,
        "unused_layers": [names[i] for i in range(num_layers) if not bool(seen[i])],
    }
    return SensitivityProfile(
        layers=names,
        grid=grid_obj.to_dict(),
        act_fisher=act_fisher,
        act_range=act_range,
        weight_fisher=weight_fisher,
        weight_range=weight_range,
        macs=macs_total.round().to(torch.int64),
        num_samples=num_samples,
        meta=meta,
    )
