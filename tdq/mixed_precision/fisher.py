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
from typing import Any

import torch
from torch import nn

from tdq.config import TDQConfig
from tdq.grid import TimestepGrid
from tdq.mixed_precision.dist_profile import (
    ProfileUnit,
    bucket_levels,
    check_same_inputs,
    gather_unit_results,
    iter_unit_inputs,
    profile_fingerprints,
    profile_units,
    seek_forward,
    shard_plan,
)
from tdq.mixed_precision.families import NoiseFamily
from tdq.mixed_precision.profile import SensitivityProfile
from tdq.mixed_precision.profile_setup import _LayerHooks, _occupancy_weights, _profile_setup

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


def prediction_loss(family: NoiseFamily, denoiser, forward_fn, xb, noise, level) -> torch.Tensor:
    """The family's per-sample weighted denoising loss of one batch, summed over the batch."""
    x_t = family.noised(xb, noise, level)
    pred, target = family.predict_and_target(denoiser, forward_fn, xb, noise, x_t, level)
    if pred.shape != target.shape and pred.dim() >= 2 and pred.shape[1] == 2 * target.shape[1]:
        pred = pred[:, : target.shape[1]]  # learned variance: the first half is the prediction
    if pred.shape != target.shape:
        raise ValueError(
            f"the denoiser's prediction has shape {list(pred.shape)} but the target has {list(target.shape)}; "
            "pass a forward_fn that returns the prediction"
        )
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (family.weight(level).to(per_sample.device) * per_sample).sum()


class _FisherHooks(_LayerHooks):
    """
    The hooks of a Fisher profile on the selected layers (a context manager: the model's training flag,
    `requires_grad` flags and `.grad` tensors are restored and the hooks removed on exit, also on error), and the
    per-unit measurement (`run_unit`).
    """

    def __init__(self, denoiser: nn.Module, modules: list[nn.Module], device: torch.device):
        super().__init__(denoiser, modules)
        n = len(modules)
        self.batch_sq = torch.zeros(n, dtype=torch.float32, device=device)
        self.batch_min = torch.full((n,), math.inf, dtype=torch.float32, device=device)
        self.batch_max = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
        self.batch_macs = torch.zeros(n, dtype=torch.float64)
        self.seen = torch.zeros(n, dtype=torch.bool)

    def _pre_hook(self, idx: int):
        batch_sq, batch_min, batch_max = self.batch_sq, self.batch_min, self.batch_max

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

    def _post_hook(self, idx: int, per_out: int):
        def post_hook(module, args, output):
            self.seen[idx] = True
            if self.measure_macs and isinstance(output, torch.Tensor):
                self.batch_macs[idx] += float(output.numel()) * per_out

        return post_hook

    def run_unit(self, unit: ProfileUnit, family, forward_fn, xb, noise, level) -> dict[str, torch.Tensor]:
        """One batch: the summed squared input gradients, input min/max, summed squared weight gradient per layer
        (CPU float64), the layers seen so far and, for the first unit, the MACs per sample."""
        self.batch_sq.zero_()
        self.batch_min.fill_(math.inf)
        self.batch_max.fill_(-math.inf)
        self.measure_macs = unit.index == 0
        with torch.enable_grad():
            loss = prediction_loss(family, self.denoiser, forward_fn, xb, noise, level)
            self.measure_macs = False
            if not loss.requires_grad:
                raise RuntimeError("none of the selected layers takes part in the denoiser's forward pass")
            loss.backward()
        zero = torch.zeros((), device=self.batch_sq.device)
        w_sq = [
            zero if w.grad is None else w.grad.detach().float().pow(2).sum().to(zero.device)
            for w in self.weights
        ]
        for w in self.weights:
            w.grad = None
        return {
            "act_sq": self.batch_sq.double().cpu(),
            "act_min": self.batch_min.double().cpu(),
            "act_max": self.batch_max.double().cpu(),
            "weight_sq": torch.stack(w_sq).double().cpu(),
            "seen": self.seen.clone(),
            "macs": self.batch_macs / xb.shape[0] if unit.index == 0 else None,
        }


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
    shard: bool | None = None,
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
    the device's kernels), and equal whether computed by one process or sharded across several (`shard`).

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
        shard (`bool`, *optional*):
            Split the work across the processes of the initialized `torch.distributed` group (e.g. under
            `accelerate launch`): each process computes its round-robin share of the (bucket, batch) units and the
            per-unit sums are gathered and added in unit order, so every process gets the single-process profile
            (see `tdq.mixed_precision.dist_profile`). `None` (default) shards when such a group with more than one
            process exists; `False` computes everything here. Every process must call with the same model,
            arguments and `x0` (checked: a `ValueError` names the field that differs). Recorded as
            `meta["distribution"]`.

    Returns:
        `SensitivityProfile`.
    """
    setup = _profile_setup(
        denoiser, scheduler, x0, grid, config, layers, family, samples_per_bucket, batch_size
    )
    forward_fn = forward_fn or default_forward_fn
    names, modules, grid_obj, family = setup.names, setup.modules, setup.grid, setup.family
    num_layers, num_buckets = len(modules), grid_obj.num_buckets
    bucket_weights = _occupancy_weights(grid_obj, step_timesteps, setup.adapter)
    plan = shard_plan(profile_units(num_buckets, samples_per_bucket, batch_size), shard)
    check_same_inputs(
        profile_fingerprints(setup, denoiser, x0, forward_fn, "fisher", seed, samples_per_bucket, batch_size,
                             step_timesteps=step_timesteps),
        plan,
    )  # fmt: skip

    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else x0.device
    x0 = x0.detach().to(device).clone()
    with _FisherHooks(denoiser, modules, device) as hooks:
        local = {}
        for unit, (xb, noise, level) in iter_unit_inputs(plan, family, grid_obj, x0, seed, progress):
            seek_forward(forward_fn, unit)
            local[unit.index] = hooks.run_unit(unit, family, forward_fn, xb, noise, level)
    results = gather_unit_results(plan, local)

    # sums in unit order, the same additions in one process and in many
    act_fisher = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    weight_fisher = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    act_min = torch.full((num_layers, num_buckets), math.inf, dtype=torch.float64)
    act_max = torch.full((num_layers, num_buckets), -math.inf, dtype=torch.float64)
    num_samples = torch.zeros(num_buckets, dtype=torch.int64)
    num_batches = torch.zeros(num_buckets, dtype=torch.int64)
    seen = torch.zeros(num_layers, dtype=torch.bool)
    for unit, r in zip(plan.units, results, strict=True):
        k = unit.bucket
        act_fisher[:, k] += r["act_sq"]
        act_min[:, k] = torch.minimum(act_min[:, k], r["act_min"])
        act_max[:, k] = torch.maximum(act_max[:, k], r["act_max"])
        weight_fisher[:, k] += r["weight_sq"] / unit.size
        num_samples[k] += unit.size
        num_batches[k] += 1
        seen |= r["seen"]
    act_fisher /= num_samples.clamp_min(1).to(torch.float64)
    weight_fisher /= num_batches.clamp_min(1).to(torch.float64)
    macs_total = results[0]["macs"]

    act_range = torch.where(torch.isfinite(act_max - act_min), act_max - act_min, torch.zeros_like(act_max))
    if bucket_weights is not None:
        act_fisher *= bucket_weights
        weight_fisher *= bucket_weights
    ranges, empty_buckets = bucket_levels(family, grid_obj, samples_per_bucket, seed)
    config_of, weight_spec = setup.scheduler_config, setup.weight_spec
    meta = {
        "seed": int(seed),
        "samples_per_bucket": int(samples_per_bucket),
        "batch_size": int(batch_size),
        "num_x0": int(x0.shape[0]),
        "denoiser": type(denoiser).__name__,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "num_train_timesteps": setup.num_train,
        "prediction_type": config_of.get("prediction_type", "epsilon"),
        "noise_family": family.describe(),
        "bucket_weights": None if bucket_weights is None else bucket_weights.tolist(),
        "act_fisher_estimator": "per_sample_exact",
        "weight_fisher_estimator": "batch_gradient",
        "weight_range": "rms_group_span",
        "weight_spec": {"granularity": weight_spec.granularity, "symmetric": weight_spec.symmetric},
        "timestep_ranges": ranges,
        "empty_buckets": empty_buckets,
        "unused_layers": [names[i] for i in range(num_layers) if not bool(seen[i])],
        "weight_numel": [int(m.weight.numel()) for m in modules],
        "distribution": plan.meta(),
    }
    return SensitivityProfile(
        layers=names,
        grid=grid_obj.to_dict(),
        act_fisher=act_fisher,
        act_range=act_range,
        weight_fisher=weight_fisher,
        weight_range=setup.weight_range,
        macs=macs_total.round().to(torch.int64),
        num_samples=num_samples,
        meta=meta,
    )
