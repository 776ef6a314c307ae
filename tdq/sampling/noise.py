"""Schedulers by name and the per-seed random numbers of a sample (initial noise, step noise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def make_scheduler(base, name: str | None):
    """
    A scheduler of another type built from `base`'s config (`None` keeps `base`).

    Args:
        base (`SchedulerMixin`): the model's own scheduler.
        name (`str`, *optional*): one of `ddpm`, `ddim`, `dpmsolver`, `euler`, `pndm`.
    """
    if name is None:
        return base
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {sorted(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)


#: Offset added to a sample's seed to seed its step-noise generator (stochastic samplers).
STEP_NOISE_SEED_OFFSET = 7919


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """
    One CPU generator per seed for the step noise of stochastic schedulers (seeded `seed + 7919`).

    Passed as `generator=[...]` to a diffusers scheduler's `step`, `randn_tensor` draws sample `i`'s noise from
    generator `i`, so the noise of a sample does not depend on its batch.

    Args:
        seeds (`Sequence[int]`): one seed per sample of the batch.

    Returns:
        `list[torch.Generator]`: the generators, in the order of `seeds`.
    """
    return [torch.Generator().manual_seed(int(s) + STEP_NOISE_SEED_OFFSET) for s in seeds]


def initial_noise(seeds: Sequence[int], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Stack one standard-normal tensor of `shape` per seed (CPU generator, so it is device independent)."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
            for s in seeds
        ]
    )
