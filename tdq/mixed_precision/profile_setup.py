"""What every sensitivity estimator derives from its arguments: the checked inputs, the selected layers, the resolved
grid and noise family, the bucket occupancy of the sampler in use and the weights' quantization spans.

Shared by `fisher.profile_sensitivity` and `hutchinson.hutchinson_sensitivity` (`_profile_setup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdq.adapters import TimestepAdapter, TimestepArgumentError, get_adapter
from tdq.config import QuantSpec, TDQConfig
from tdq.grid import TimestepGrid
from tdq.mixed_precision.families import DDPMFamily, EDMFamily, NoiseFamily, is_ddpm_scheduler, noise_family


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


def _resolve_grid_and_family(
    grid: TimestepGrid | dict | None,
    config: TDQConfig | None,
    scheduler: Any,
    num_train: int,
    adapter: TimestepAdapter | None,
    family: NoiseFamily | None,
) -> tuple[TimestepGrid, NoiseFamily]:
    """The resolved grid and the noise family that draws noise levels in its units."""
    if grid is None:
        if config is None:
            raise ValueError("profile_sensitivity needs a grid (or a config whose grid is used)")
        grid = config.grid
    if isinstance(grid, dict):
        grid = TimestepGrid(**grid)
    ddpm = isinstance(family, DDPMFamily) or (family is None and is_ddpm_scheduler(scheduler))
    if grid.units == "auto":
        if ddpm or adapter is None:
            units = "train_timestep"
        else:
            units = adapter.units
    else:
        units = grid.units
    scale = adapter.scale if adapter is not None else 1.0

    def to_model(v: torch.Tensor) -> torch.Tensor:
        return v / scale if scale != 1.0 else v

    values = None
    if ddpm:
        values = _timesteps_in_units(scheduler, units, num_train)
    if family is None:
        family = noise_family(scheduler, units, (lambda: values) if values is not None else None, to_model)
    if not grid.resolved:
        if isinstance(family, DDPMFamily):
            values = family.grid_values
            lo, hi = (0.0, 1.0) if units == "t" else (float(values.min()), float(values.max()))
            if units == "train_timestep":
                lo, hi = 0.0, float(num_train - 1)
            grid = grid.resolve(units, lo, hi, spacing="log" if units == "sigma" else None)
        elif isinstance(family, EDMFamily) and family.scheduler is not None and units == "sigma":
            cfg = family.scheduler.config
            grid = grid.resolve("sigma", float(cfg.sigma_min), float(cfg.sigma_max), spacing="log")
        elif adapter is not None and adapter.units == units:
            grid = grid.resolve(*adapter.default_grid())
        else:
            grid = grid.resolve(units, 0.0, 1.0) if units == "t" else grid
    if not grid.resolved:
        raise ValueError(f"cannot resolve the {units!r} grid for profiling: pass a resolved TimestepGrid")
    grid.validate()
    return grid, family


def _occupancy_weights(
    grid: TimestepGrid, step_timesteps: Sequence[float] | torch.Tensor | None, adapter: TimestepAdapter | None
) -> torch.Tensor | None:
    """Share of the sampler's steps per bucket, normalised to mean 1 (`None` without step timesteps)."""
    if step_timesteps is None:
        return None
    raw = torch.as_tensor(step_timesteps, dtype=torch.float64).reshape(-1)
    if raw.numel() == 0 or not bool(torch.isfinite(raw).all()):
        raise ValueError("step_timesteps must be a non-empty sequence of finite timesteps")
    values = raw * (adapter.scale if adapter is not None else 1.0)
    inner = grid.edges()[1:-1].to(torch.float64)
    buckets = torch.bucketize(values, inner, right=True)
    counts = torch.bincount(buckets, minlength=grid.num_buckets).to(torch.float64)
    return counts * grid.num_buckets / counts.sum()


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


class _LayerHooks:
    """
    Pre/post forward hooks on the selected layers for one profile (a context manager): on entry the model is put in
    eval mode with only the selected weights requiring grad; on exit, also on error, the hooks are removed and the
    training flag, `requires_grad` flags and `.grad` tensors restored. Subclasses give `_pre_hook(idx)` and
    `_post_hook(idx, per_output_macs)`, and may clear their own state in `_on_exit`.
    """

    def __init__(self, denoiser: nn.Module, modules: list[nn.Module]):
        self.denoiser, self.modules, self.weights = denoiser, modules, [m.weight for m in modules]
        self.measure_macs = False
        self.handles: list = []

    def __enter__(self):
        d = self.denoiser
        self.was_training = d.training
        self.saved_flags = [(p, p.requires_grad) for p in d.parameters()]
        self.saved_grads = [(w, w.grad) for w in self.weights]
        d.eval()
        for p in d.parameters():
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
            w.grad = None
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post_hook(i, _per_output_macs(m))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for p, flag in self.saved_flags:
            p.requires_grad_(flag)
        for w, g in self.saved_grads:
            w.grad = g
        self.denoiser.train(self.was_training)
        self._on_exit()

    def _on_exit(self) -> None:
        pass

    def _pre_hook(self, idx: int):
        raise NotImplementedError

    def _post_hook(self, idx: int, per_out: int):
        raise NotImplementedError


@dataclass
class _ProfileSetup:
    """What every sensitivity estimator derives from its arguments (see `_profile_setup`)."""

    adapter: TimestepAdapter | None
    names: list[str]
    modules: list[nn.Module]
    grid: TimestepGrid
    family: NoiseFamily
    weight_range: torch.Tensor
    weight_spec: QuantSpec
    num_train: int
    scheduler_config: Any


def _profile_setup(
    denoiser, scheduler, x0, grid, config, layers, family, samples_per_bucket, batch_size
) -> _ProfileSetup:
    """Check the profiling inputs (naming the bad one) and resolve layers, grid, noise family and weight ranges."""
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError("x0 must be a tensor of clean samples with shape [N, ...], N >= 1")
    if not bool(torch.isfinite(x0).all()):
        bad = (~torch.isfinite(x0)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"x0 holds NaN/inf in sample(s) {bad[:8]}; the sensitivity of such samples is meaningless"
        )
    if layers is not None and (
        not isinstance(layers, list | tuple) or not all(isinstance(n, str) and n for n in layers)
    ):
        raise ValueError(f"layers={layers!r:.80} must be a list of layer names")
    if int(samples_per_bucket) < 1 or int(batch_size) < 1:
        raise ValueError("samples_per_bucket and batch_size must be positive integers")
    config_of = getattr(scheduler, "config", {}) or {}
    num_train = int(config_of.get("num_train_timesteps", 1000))
    try:
        adapter = get_adapter(denoiser, num_train_timesteps=num_train)
    except TimestepArgumentError:
        adapter = None
    selected = _select_layers(denoiser, layers, config)
    names = [n for n, _ in selected]
    modules = [m for _, m in selected]
    grid_obj, family = _resolve_grid_and_family(grid, config, scheduler, num_train, adapter, family)
    weight_spec = (
        config.weight if config is not None else QuantSpec(granularity="per_channel", symmetric=True)
    )
    specs = [config.layer_specs(n)[0] for n in names] if config is not None else [weight_spec] * len(names)
    weight_range = torch.tensor(
        [_weight_range(m.weight, s) for m, s in zip(modules, specs, strict=True)], dtype=torch.float64
    )
    return _ProfileSetup(
        adapter, names, modules, grid_obj, family, weight_range, weight_spec, num_train, config_of
    )
