"""Timestep-selective evaluation: quantize only the early, middle or late third of a sampler's steps (float
elsewhere) and measure how far each lands from the FP samples, to show where precision matters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tdq.api import get_quantization
from tdq.eval.metrics import psnr_per_image

__all__ = ["quantize_only_timesteps", "step_thirds", "timestep_selective_eval"]


def step_thirds(timesteps: Sequence[float]) -> dict[str, list[float]]:
    r"""
    Split a sampler's timesteps (in stepping order) into its first (`"early"`, noisiest), middle and last thirds.

    Args:
        timesteps (`Sequence[float]`): the timesteps the sampler passes to the denoiser, one per step.

    Returns:
        `dict` with keys `"early"`, `"middle"`, `"late"` (sizes differ by at most one; the middle takes the rest).
    """
    ts = [float(t) for t in timesteps]
    if len(ts) < 3:
        raise ValueError(f"need at least 3 steps to split into thirds, got {len(ts)}")
    third = len(ts) // 3
    return {"early": ts[:third], "middle": ts[third : len(ts) - third], "late": ts[len(ts) - third :]}


@contextlib.contextmanager
def quantize_only_timesteps(model: nn.Module, timesteps: Sequence[float]) -> Iterator[nn.Module]:
    r"""
    Within the block, a tdq-quantized model quantizes only the calls whose timestep is one of `timesteps`; every
    other call computes exactly as the float model. The timestep is read from each call by the model's timestep
    adapter (as the quantization hook reads it), not counted.

    Args:
        model (`nn.Module`): a model quantized with `tdq.quantize_` (and calibrated).
        timesteps (`Sequence[float]`): the raw timesteps (as the sampler passes them) to quantize at. A call whose
            samples carry different timesteps is quantized only if all of them are selected.

    Yields:
        The same `model`.
    """
    state = get_quantization(model)
    selected = torch.as_tensor([float(t) for t in timesteps], dtype=torch.float64)
    name = type(model).__name__

    def pre_hook(module, args, kwargs):
        raw = state.adapter.read(args, kwargs, name)
        v = torch.as_tensor(raw).detach().to("cpu", torch.float64).reshape(-1)
        hit = torch.isclose(v[:, None], selected[None, :], rtol=1e-9, atol=1e-6).any(dim=1)
        state.context.active = state.hook is not None and bool(selected.numel()) and bool(hit.all())
        return None

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()
        state.context.active = state.hook is not None


def timestep_selective_eval(
    sampler: Any, model: nn.Module, seeds: Sequence[int], fp_images: torch.Tensor | None = None
) -> dict[str, Any]:
    r"""
    Sample `seeds` with quantization on in every step (`"all"`), and in only the early, middle or late third of the
    steps, and compare each with the FP samples of the same seeds.

    Args:
        sampler (`DiffusionSampler`): a sampler whose denoiser is `model` (or wraps it).
        model (`nn.Module`): the quantized, calibrated denoiser.
        seeds (`Sequence[int]`): evaluation seeds.
        fp_images (`torch.Tensor`, *optional*): FP samples of `seeds`; sampled here (quantization disabled) if
            not given.

    Returns:
        `dict` with `timesteps` (the thirds) and, per row (`"all"`, `"early"`, `"middle"`, `"late"`), `psnr` (mean
        dB to FP), `psnr_per_image` and `images`.
    """
    from tdq.api import disabled

    if fp_images is None:
        with disabled(model):
            fp_images = sampler(seeds).images
    thirds = step_thirds(sampler.timesteps())
    rows = {"all": sampler.timesteps(), **thirds}
    out: dict[str, Any] = {"timesteps": thirds}
    for row, ts in rows.items():
        with quantize_only_timesteps(model, ts):
            images = sampler(seeds).images
        per = psnr_per_image(images, fp_images)
        out[row] = {"psnr": float(per.mean()), "psnr_per_image": per.tolist(), "images": images}
    return out
