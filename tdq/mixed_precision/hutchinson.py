"""Hessian-trace (Hutchinson) sensitivity of every layer, beside the Fisher profile of `fisher.py`.

`hutchinson_sensitivity` draws the same noised samples as `profile_sensitivity` (same noise family, bucket grid and
seeding) and back-propagates the same per-sample weighted denoising loss, but estimates the trace of the loss
Hessian with respect to each layer's weight and input activation with Rademacher probes, `tr(H) ≈ E[vᵀHv]`
(double backward). The result is a `SensitivityProfile` whose `act_fisher` / `weight_fisher` fields hold the
Hessian traces (`meta["estimator"] = "hutchinson"`), so every consumer of a Fisher profile (planner,
`schedule_objective`, heatmaps) can read it unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tdq.config import TDQConfig
from tdq.grid import TimestepGrid
from tdq.mixed_precision.dist_profile import (
    ProfileUnit,
    check_same_inputs,
    gather_unit_results,
    iter_unit_inputs,
    profile_fingerprints,
    profile_units,
    seek_forward,
    shard_plan,
)
from tdq.mixed_precision.families import NoiseFamily
from tdq.mixed_precision.fisher import default_forward_fn, prediction_loss
from tdq.mixed_precision.profile import SensitivityProfile
from tdq.mixed_precision.profile_setup import _LayerHooks, _profile_setup

__all__ = ["hutchinson_trace", "hutchinson_sensitivity"]


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int8).to(like.dtype) * 2 - 1).to(
        like.device
    )


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], probes: int = 16, seed: int = 0
) -> torch.Tensor:
    r"""
    Hutchinson estimate of the trace of the Hessian of a scalar loss with respect to each tensor of `params`.

    Each probe draws Rademacher vectors `v` (±1) for every tensor and forms `vᵀ H v` from one double backward; the
    estimate is the mean over probes. It is unbiased, and exact after one probe when the Hessian is diagonal.

    Args:
        loss_fn (`Callable[[], torch.Tensor]`): recomputes the scalar loss (called once).
        params (`Sequence[torch.Tensor]`): tensors with `requires_grad=True` the loss depends on.
        probes (`int`, *optional*, defaults to `16`): number of Rademacher probes.
        seed (`int`, *optional*, defaults to `0`): seed of the probes.

    Returns:
        `torch.Tensor` of shape `[len(params)]` (float64): one trace estimate per tensor.
    """
    if int(probes) < 1:
        raise ValueError(f"probes={probes!r} must be a positive integer")
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("params must be a non-empty list of tensors with requires_grad=True")
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        return _probe_traces(grads, params, int(probes), torch.Generator().manual_seed(int(seed)))


def _probe_traces(grads, params, probes: int, gen: torch.Generator) -> torch.Tensor:
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = torch.zeros(len(params), dtype=torch.float64)
    if not live:
        return out
    for p in range(probes):
        vs = [_rademacher(params[i], gen) for i in live]
        dot = sum((grads[i] * v).sum() for i, v in zip(live, vs, strict=True))
        hv = torch.autograd.grad(
            dot, [params[i] for i in live], retain_graph=p < probes - 1, allow_unused=True
        )
        for j, (i, v) in enumerate(zip(live, vs, strict=True)):
            if hv[j] is not None:
                out[i] += float((hv[j].detach() * v).double().sum())
    return out / probes


def _math_attention():
    """Double backward needs the math attention kernel (the fused CPU/flash kernels have no second derivative)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()


def hutchinson_sensitivity(
    denoiser: nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    grid: TimestepGrid | dict | None,
    *,
    layers: Sequence[str] | None = None,
    config: TDQConfig | None = None,
    samples_per_bucket: int = 4,
    batch_size: int = 4,
    probes: int = 8,
    forward_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    family: NoiseFamily | None = None,
    progress: bool = False,
    shard: bool | None = None,
) -> SensitivityProfile:
    r"""
    Hessian-trace sensitivity of every layer's input activation and weight in every timestep bucket.

    Draws the noised samples exactly as [`~tdq.mixed_precision.fisher.profile_sensitivity`] does for the same
    `seed` (bucket `k` uses generator seed `seed · 1 000 003 + k`) and the same loss (the noise family's per-sample
    weighted MSE, summed over the batch). For each batch the Hessian traces of the loss with respect to each
    selected layer's weight and input activation are estimated with `probes` Rademacher probes (each batch's probes
    from its own generator, `probe_seed`, so a sharded run draws the same ones); activation traces
    are divided by the batch size (each sample's activation affects only its own loss), weight traces too (the
    batch loss is a sum). Bucket values are the mean over the bucket's batches.

    Args:
        denoiser (`torch.nn.Module`): the floating-point denoiser.
        scheduler (diffusers scheduler or `None`): selects the noise family (as in `profile_sensitivity`).
        x0 (`torch.Tensor` of shape `[N, ...]`): clean samples (cycled).
        grid (`TimestepGrid` or `dict`, *optional*): bucket grid; `None` takes `config.grid`.
        layers (`list[str]`, *optional*): module names (`nn.Linear` / `nn.Conv2d`); default all (filtered by
            `config`).
        config (`TDQConfig`, *optional*): layer selection, default grid, weight spec for `weight_range`.
        samples_per_bucket (`int`, *optional*, defaults to `4`): noised samples per bucket.
        batch_size (`int`, *optional*, defaults to `4`): samples per double backward.
        probes (`int`, *optional*, defaults to `8`): Rademacher probes per batch.
        forward_fn (`Callable`, *optional*): as in `profile_sensitivity`.
        seed (`int`, *optional*, defaults to `0`): seed of the noised samples and the probes.
        family (`NoiseFamily`, *optional*): overrides the noise family.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar over the batches.
        shard (`bool`, *optional*): split the (bucket, batch) units across the processes of the initialized
            `torch.distributed` group, as in `profile_sensitivity` (`None`: when one with several processes exists);
            the result equals one process's. Recorded as `meta["distribution"]`.

    Returns:
        `SensitivityProfile` with Hessian traces in `act_fisher` and `weight_fisher`, ranges and MACs as a Fisher
        profile, and `meta["estimator"] = "hutchinson"`. The Hessian of a non-convex loss is indefinite, so an
        estimate can be negative; those are clamped to 0 (a profile holds no negative value) and counted in
        `meta["negative_entries_clamped"]`.
    """
    if int(probes) < 1:
        raise ValueError(f"probes={probes!r} must be a positive integer")
    setup = _profile_setup(
        denoiser, scheduler, x0, grid, config, layers, family, samples_per_bucket, batch_size
    )
    forward_fn = forward_fn or default_forward_fn
    names, modules, grid_obj, family = setup.names, setup.modules, setup.grid, setup.family
    num_layers, num_buckets = len(modules), grid_obj.num_buckets
    plan = shard_plan(profile_units(num_buckets, samples_per_bucket, batch_size), shard)
    check_same_inputs(
        profile_fingerprints(setup, denoiser, x0, forward_fn, "hutchinson", seed, samples_per_bucket, batch_size,
                             probes=int(probes)),
        plan,
    )  # fmt: skip

    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else x0.device
    x0 = x0.detach().to(device)
    with _HessianHooks(denoiser, modules) as hooks, torch.enable_grad(), _math_attention():
        local = {}
        for unit, (xb, noise, level) in iter_unit_inputs(plan, family, grid_obj, x0, seed, progress):
            seek_forward(forward_fn, unit)
            probe_gen = torch.Generator().manual_seed(probe_seed(seed, unit))
            local[unit.index] = hooks.run_unit(
                unit, family, forward_fn, xb, noise, level, int(probes), probe_gen
            )
    results = gather_unit_results(plan, local)

    # sums in unit order, the same additions in one process and in many
    act_h = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    weight_h = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    act_min = torch.full((num_layers, num_buckets), math.inf, dtype=torch.float64)
    act_max = torch.full((num_layers, num_buckets), -math.inf, dtype=torch.float64)
    num_samples = torch.zeros(num_buckets, dtype=torch.int64)
    batches = torch.zeros(num_buckets, dtype=torch.int64)
    for unit, r in zip(plan.units, results, strict=True):
        k = unit.bucket
        weight_h[:, k] += r["weight_trace"] / unit.size
        act_h[:, k] += r["act_trace"] / unit.size
        act_min[:, k] = torch.minimum(act_min[:, k], r["act_min"])
        act_max[:, k] = torch.maximum(act_max[:, k], r["act_max"])
        num_samples[k] += unit.size
        batches[k] += 1
    act_h /= batches.clamp_min(1).to(torch.float64)
    weight_h /= batches.clamp_min(1).to(torch.float64)
    macs = results[0]["macs"]

    act_range = torch.where(torch.isfinite(act_max - act_min), act_max - act_min, torch.zeros_like(act_max))
    negative = int((act_h < 0).sum() + (weight_h < 0).sum())
    return SensitivityProfile(
        layers=names,
        grid=grid_obj.to_dict(),
        act_fisher=act_h.clamp_min(0),
        act_range=act_range,
        weight_fisher=weight_h.clamp_min(0),
        weight_range=setup.weight_range,
        macs=macs.round().to(torch.int64),
        num_samples=num_samples,
        meta={
            "estimator": "hutchinson",
            "negative_entries_clamped": negative,
            "probes": int(probes),
            "probe_seeds": "per_unit",
            "seed": int(seed),
            "samples_per_bucket": int(samples_per_bucket),
            "batch_size": int(batch_size),
            "noise_family": family.describe(),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "weight_numel": [int(m.weight.numel()) for m in modules],
            "distribution": plan.meta(),
        },
    )


def probe_seed(seed: int, unit: ProfileUnit) -> int:
    """The seed of `unit`'s Rademacher probes: its own stream, so any process draws the probes one process would."""
    return (int(seed) + 7919) * 1_000_003 + unit.index


class _HessianHooks(_LayerHooks):
    """
    Hooks that capture each selected layer's input (as a fresh autograd leaf) and its min/max, and the per-unit
    Hutchinson measurement (`run_unit`). A context manager: hooks removed and flags restored on exit.
    """

    def __init__(self, denoiser: nn.Module, modules: list[nn.Module]):
        super().__init__(denoiser, modules)
        n = len(modules)
        self.captured: dict[int, torch.Tensor] = {}
        self.unit_min = [math.inf] * n
        self.unit_max = [-math.inf] * n
        self.macs = torch.zeros(n, dtype=torch.float64)

    def _on_exit(self) -> None:
        self.captured.clear()

    def _pre_hook(self, idx: int):
        def pre(module, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            xa = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            self.captured[idx] = xa
            self.unit_min[idx] = min(self.unit_min[idx], float(x.detach().min()))
            self.unit_max[idx] = max(self.unit_max[idx], float(x.detach().max()))
            return (xa, *args[1:]), kwargs

        return pre

    def _post_hook(self, idx: int, per_out: int):
        def post(module, args, output):
            if self.measure_macs and isinstance(output, torch.Tensor):
                self.macs[idx] += float(output[:1].numel()) * per_out

        return post

    def run_unit(
        self, unit, family, forward_fn, xb, noise, level, probes: int, gen
    ) -> dict[str, torch.Tensor]:
        """One batch: Hutchinson traces of the summed loss per layer weight and input (CPU float64, the input's 0
        where the layer did not run), input min/max and, for the first unit, the MACs per sample."""
        n = len(self.modules)
        self.captured.clear()
        self.unit_min[:] = [math.inf] * n
        self.unit_max[:] = [-math.inf] * n
        self.measure_macs = unit.index == 0
        loss = prediction_loss(family, self.denoiser, forward_fn, xb, noise, level)
        self.measure_macs = False
        acts = [self.captured.get(i) for i in range(n)]
        params = self.weights + [a for a in acts if a is not None]
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        traces = _probe_traces(grads, params, probes, gen)
        act_trace = torch.zeros(n, dtype=torch.float64)
        j = n
        for i, a in enumerate(acts):
            if a is not None:
                act_trace[i] = traces[j]
                j += 1
        self.captured.clear()
        return {
            "weight_trace": traces[:n].clone(),
            "act_trace": act_trace,
            "act_min": torch.tensor(self.unit_min, dtype=torch.float64),
            "act_max": torch.tensor(self.unit_max, dtype=torch.float64),
            "macs": self.macs.clone() if unit.index == 0 else None,
        }
