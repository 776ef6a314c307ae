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
from tdq.mixed_precision.families import NoiseFamily
from tdq.mixed_precision.fisher import _per_output_macs, _profile_setup, default_forward_fn
from tdq.mixed_precision.profile import SensitivityProfile

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
) -> SensitivityProfile:
    r"""
    Hessian-trace sensitivity of every layer's input activation and weight in every timestep bucket.

    Draws the noised samples exactly as [`~tdq.mixed_precision.fisher.profile_sensitivity`] does for the same
    `seed` (bucket `k` uses generator seed `seed · 1 000 003 + k`) and the same loss (the noise family's per-sample
    weighted MSE, summed over the batch). For each batch the Hessian traces of the loss with respect to each
    selected layer's weight and input activation are estimated with `probes` Rademacher probes; activation traces
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
    num_layers, num_buckets, edges = len(modules), grid_obj.num_buckets, grid_obj.edges().tolist()
    weight_range = setup.weight_range

    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else x0.device
    x0 = x0.detach().to(device)
    act_h = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    weight_h = torch.zeros(num_layers, num_buckets, dtype=torch.float64)
    act_min = torch.full((num_layers, num_buckets), math.inf, dtype=torch.float64)
    act_max = torch.full((num_layers, num_buckets), -math.inf, dtype=torch.float64)
    macs = torch.zeros(num_layers, dtype=torch.float64)
    num_samples = torch.zeros(num_buckets, dtype=torch.int64)
    captured: dict[int, torch.Tensor] = {}
    state = {"k": 0, "macs": False}

    def make_pre(idx: int):
        def pre(module, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            xa = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            captured[idx] = xa
            act_min[idx, state["k"]] = min(float(act_min[idx, state["k"]]), float(x.detach().min()))
            act_max[idx, state["k"]] = max(float(act_max[idx, state["k"]]), float(x.detach().max()))
            return (xa, *args[1:]), kwargs

        return pre

    def make_post(idx: int, per_out: int):
        def post(module, args, output):
            if state["macs"] and isinstance(output, torch.Tensor):
                macs[idx] += float(output[:1].numel()) * per_out

        return post

    was_training = denoiser.training
    saved = [(p, p.requires_grad) for p in denoiser.parameters()]
    weights = [m.weight for m in modules]
    handles = []
    try:
        denoiser.eval()
        for p in denoiser.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for i, m in enumerate(modules):
            handles.append(m.register_forward_pre_hook(make_pre(i), with_kwargs=True))
            handles.append(m.register_forward_hook(make_post(i, _per_output_macs(m))))
        probe_gen = torch.Generator().manual_seed(int(seed) + 7919)
        first = True
        with torch.enable_grad(), _math_attention():
            for k in range(num_buckets):
                state["k"] = k
                gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
                n_all = int(samples_per_bucket)
                t_all, _ = family.draw(edges[k], edges[k + 1], k == num_buckets - 1, n_all, gen)
                noise_all = torch.randn((n_all, *x0.shape[1:]), generator=gen, dtype=torch.float32)
                idx_all = torch.arange(n_all) % x0.shape[0]
                batches = 0
                for start in range(0, n_all, int(batch_size)):
                    sl = slice(start, min(start + int(batch_size), n_all))
                    xb = x0[idx_all[sl].to(device)]
                    noise = noise_all[sl].to(device=device, dtype=x0.dtype)
                    level = t_all[sl]
                    x_t = family.noised(xb, noise, level)
                    captured.clear()
                    state["macs"] = first
                    pred, target = family.predict_and_target(denoiser, forward_fn, xb, noise, x_t, level)
                    state["macs"] = first = False
                    if (
                        pred.shape != target.shape
                        and pred.dim() >= 2
                        and pred.shape[1] == 2 * target.shape[1]
                    ):
                        pred = pred[:, : target.shape[1]]
                    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
                    loss = (family.weight(level).to(per_sample.device) * per_sample).sum()
                    acts = [captured.get(i) for i in range(num_layers)]
                    params = weights + [a for a in acts if a is not None]
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    traces = _probe_traces(grads, params, int(probes), probe_gen)
                    n = sl.stop - sl.start
                    weight_h[:, k] += traces[:num_layers] / n
                    j = num_layers
                    for i, a in enumerate(acts):
                        if a is not None:
                            act_h[i, k] += traces[j] / n
                            j += 1
                    num_samples[k] += n
                    batches += 1
                act_h[:, k] /= max(batches, 1)
                weight_h[:, k] /= max(batches, 1)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
        denoiser.train(was_training)
        captured.clear()

    act_range = torch.where(torch.isfinite(act_max - act_min), act_max - act_min, torch.zeros_like(act_max))
    negative = int((act_h < 0).sum() + (weight_h < 0).sum())
    return SensitivityProfile(
        layers=names,
        grid=grid_obj.to_dict(),
        act_fisher=act_h.clamp_min(0),
        act_range=act_range,
        weight_fisher=weight_h.clamp_min(0),
        weight_range=weight_range,
        macs=macs.round().to(torch.int64),
        num_samples=num_samples,
        meta={
            "estimator": "hutchinson",
            "negative_entries_clamped": negative,
            "probes": int(probes),
            "seed": int(seed),
            "samples_per_bucket": int(samples_per_bucket),
            "batch_size": int(batch_size),
            "noise_family": family.describe(),
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "weight_numel": [int(m.weight.numel()) for m in modules],
        },
    )
