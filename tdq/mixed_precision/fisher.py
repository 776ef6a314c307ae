"""Per-layer, per-timestep-bucket sensitivity of a diffusion denoiser to quantization.

`profile_sensitivity` runs the denoising loss at train timesteps drawn inside every bucket of a `TimestepGrid`
and measures, for each `nn.Linear` / `nn.Conv2d` layer,

- the Fisher trace of its input activation (sum over elements of the mean squared loss gradient),
- the Fisher trace of its weight,
- the range of its input activation in the bucket, the range of its weight, and its MACs per sample.

The result, a `SensitivityProfile`, feeds `tdq.mixed_precision.planners.plan_precision`. Profiles are saved as safetensors plus a
JSON sidecar (no pickle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdq.adapters import TimestepAdapter, TimestepArgumentError, get_adapter
from tdq.config import QuantSpec, TDQConfig
from tdq.grid import TimestepGrid
from tdq.mixed_precision.families import DDPMFamily, EDMFamily, NoiseFamily, is_ddpm_scheduler, noise_family
from tdq.mixed_precision.profile import SensitivityProfile

__all__ = ["default_forward_fn", "profile_sensitivity"]


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
    family: NoiseFamily | None = None,
    step_timesteps: Sequence[float] | torch.Tensor | None = None,
) -> SensitivityProfile:
    r"""
    Measure the Fisher sensitivity of every layer's input activation and weight in every timestep bucket.

    For each bucket, `samples_per_bucket` noise levels whose grid value lies inside the bucket are drawn, clean
    samples `x0` (cycled) are noised with the scheduler family's forward process, and the family's training loss
    (per-sample weighted mean squared error against its target, summed over the batch) is back-propagated. The
    family (`tdq.mixed_precision.families`) follows the scheduler: DDPM-type (`alphas_cumprod`: integer train
    timesteps, ε / v / x0 targets from `prediction_type`), EDM/σ (`x = x0 + σε`, EDM preconditioning and loss
    weight) or flow matching (`x_t = (1 − t)x0 + tε`, velocity target); a plain `f(x, sigma)` or `f(x, t)` module
    needs no scheduler. Hooks record the squared gradients of each selected layer's input (through
    that layer only) and weight, the input's min/max and, on the first batch, the layer's MACs.

    The model runs in eval mode; its training flag, `requires_grad` flags and `.grad` tensors are restored and all
    hooks removed afterwards, also on error. Results are deterministic for a fixed `seed` (up to the determinism of
    the device's kernels).

    Args:
        denoiser (`torch.nn.Module`):
            The floating-point denoiser (e.g. `UNet2DModel`).
        scheduler (diffusers scheduler or `None`):
            Selects the noise family: DDPM-type schedulers supply `add_noise`, `config.num_train_timesteps`,
            `config.prediction_type` (and `get_velocity` for v-prediction, `alphas_cumprod` for sigma grids); EDM
            schedulers their `precondition_*` functions and `sigma_data`; flow-matching schedulers nothing more.
            `None` for a plain σ- or t-conditioned module (grid units `"sigma"` or `"t"`).
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
        family (`NoiseFamily`, *optional*):
            Overrides the family chosen from the scheduler (e.g. `EDMFamily(sigma_data=1.0)`).
        step_timesteps (`Sequence[float]`, *optional*):
            The timesteps the sampler in use passes to the denoiser (in the adapter's raw units, as the hook reads
            them). Each bucket's Fisher is then weighted by the share of sampler steps that land in it (normalised to
            mean 1 over buckets; buckets no step reaches get 0), recorded as `meta["bucket_weights"]`.

    Returns:
        `SensitivityProfile`.
    """
    setup = _profile_setup(
        denoiser, scheduler, x0, grid, config, layers, family, samples_per_bucket, batch_size
    )
    forward_fn = forward_fn or default_forward_fn
    adapter, names, modules = setup.adapter, setup.names, setup.modules
    num_layers, grid_obj, family = len(modules), setup.grid, setup.family
    num_buckets, edges, weight_range = grid_obj.num_buckets, grid_obj.edges().tolist(), setup.weight_range
    num_train, config_of, weight_spec = setup.num_train, setup.scheduler_config, setup.weight_spec
    bucket_weights = _occupancy_weights(grid_obj, step_timesteps, adapter)
    empty_buckets: list[int] = []

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
                t_all, empty = family.draw(
                    edges[k], edges[k + 1], k == num_buckets - 1, int(samples_per_bucket), gen
                )
                if empty:
                    empty_buckets.append(k)
                noise_all = torch.randn(
                    (int(samples_per_bucket), *x0.shape[1:]), generator=gen, dtype=torch.float32
                )
                idx_all = torch.arange(int(samples_per_bucket)) % x0.shape[0]
                lo_t, hi_t = t_all.min().item(), t_all.max().item()
                timestep_ranges.append([lo_t, hi_t])
                num_batches = 0
                for start in range(0, int(samples_per_bucket), int(batch_size)):
                    sl = slice(start, min(start + int(batch_size), int(samples_per_bucket)))
                    xb = x0[idx_all[sl].to(device)]
                    noise = noise_all[sl].to(device=device, dtype=x0.dtype)
                    level = t_all[sl]
                    x_t = family.noised(xb, noise, level)

                    batch_sq.zero_()
                    batch_min.fill_(math.inf)
                    batch_max.fill_(-math.inf)
                    state["measure_macs"] = first_batch
                    pred, target = family.predict_and_target(denoiser, forward_fn, xb, noise, x_t, level)
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
                    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
                    loss = (family.weight(level).to(per_sample.device) * per_sample).sum()
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
    if bucket_weights is not None:
        act_fisher *= bucket_weights
        weight_fisher *= bucket_weights
    meta = {
        "seed": int(seed),
        "samples_per_bucket": int(samples_per_bucket),
        "batch_size": int(batch_size),
        "num_x0": int(x0.shape[0]),
        "denoiser": type(denoiser).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "num_train_timesteps": num_train,
        "prediction_type": config_of.get("prediction_type", "epsilon"),
        "noise_family": family.describe(),
        "bucket_weights": None if bucket_weights is None else bucket_weights.tolist(),
        "act_fisher_estimator": "per_sample_exact",
        "weight_fisher_estimator": "batch_gradient",
        "weight_range": "rms_group_span",
        "weight_spec": {"granularity": weight_spec.granularity, "symmetric": weight_spec.symmetric},
        "timestep_ranges": timestep_ranges,
        "empty_buckets": empty_buckets,
        "unused_layers": [names[i] for i in range(num_layers) if not bool(seen[i])],
        "weight_numel": [int(m.weight.numel()) for m in modules],
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
