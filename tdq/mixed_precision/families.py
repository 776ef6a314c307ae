"""Noise families: how `profile_sensitivity` noises clean samples and scores the denoiser, per scheduler family.

The Fisher of a layer in a timestep bucket is the gradient of the model's own training loss at noise levels inside
that bucket, so the profiler needs each family's forward process, prediction target and loss weighting:

- `DDPMFamily` (DDPM/DDIM/PNDM/Euler-on-DDPM schedulers: `alphas_cumprod`): `x_t = √ᾱ x0 + √(1−ᾱ) ε` at integer
  train timesteps, target ε, v or x0 from `prediction_type`.
- `EDMFamily` (σ-parameterised models: `EDMEulerScheduler`/`EDMDPMSolverMultistepScheduler`, or a plain
  `f(x, sigma)` module with no scheduler): `x = x0 + σ ε`, σ drawn log-uniformly inside the bucket, the model's own
  call preconditioned (the scheduler's `precondition_inputs/noise/outputs` when it has them), x0 target, EDM loss
  weight `λ(σ) = (σ² + σ_d²) / (σ σ_d)²`.
- `FlowMatchingFamily` (`FlowMatchEulerDiscreteScheduler`, SD3, Flux, or a plain `f(x, t)` with t in [0, 1]):
  `x_t = (1 − t) x0 + t ε`, t uniform inside the bucket, velocity target `ε − x0`.

`noise_family(scheduler, units)` picks the family; pass `family=` to `profile_sensitivity` to override.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "DDPMFamily",
    "EDMFamily",
    "FlowMatchingFamily",
    "NoiseFamily",
    "is_ddpm_scheduler",
    "noise_family",
]

ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseFamily:
    r"""
    The forward process and training loss of one scheduler family, as the profiler needs them.

    Subclasses implement `draw` (noise levels inside a bucket), `noised`, `predict_and_target` and `weight`.
    Noise levels are tensors `[B]` in the family's own parameter (train timestep, σ or t).
    """

    name = "base"

    def draw(
        self, lo: float, hi: float, last: bool, n: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, bool]:
        """`n` noise levels whose grid value lies in `[lo, hi)` (`[lo, hi]` for the last bucket), and whether the
        bucket was empty (the nearest level was taken instead)."""
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The noisy input at `level`."""
        raise NotImplementedError

    def predict_and_target(
        self,
        denoiser: nn.Module,
        forward_fn: ForwardFn,
        x0: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        level: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's prediction (through its own call) and the training target."""
        raise NotImplementedError

    def weight(self, level: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight `[B]`."""
        return torch.ones(level.shape[0], dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for the profile's metadata."""
        return {"family": self.name}


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DDPMFamily(NoiseFamily):
    r"""
    Discrete-time DDPM-type schedulers (`alphas_cumprod`, `add_noise`).

    Args:
        scheduler: the diffusers scheduler (`add_noise`, `config.num_train_timesteps`, `config.prediction_type`).
        grid_values (`torch.Tensor`): the grid-unit value of every train timestep `0..num_train-1`.
    """

    name = "ddpm"

    def __init__(self, scheduler: Any, grid_values: torch.Tensor):
        self.scheduler = scheduler
        self.grid_values = grid_values
        self.prediction_type = getattr(scheduler, "config", {}).get("prediction_type", "epsilon") or "epsilon"
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; use epsilon, v_prediction or sample"
            )

    def draw(self, lo, hi, last, n, gen):
        u = self.grid_values
        hi_ok = u <= hi if last else u < hi
        cand = torch.nonzero((u >= lo) & hi_ok).flatten()
        empty = cand.numel() == 0
        if empty:
            cand = torch.argmin((u - (lo + hi) / 2).abs()).reshape(1)
        return cand[torch.randint(cand.numel(), (n,), generator=gen)], empty

    def noised(self, x0, noise, level):
        return self.scheduler.add_noise(x0, noise, level.to(device=x0.device, dtype=torch.long))

    def predict_and_target(self, denoiser, forward_fn, x0, noise, x_t, level):
        t = level.to(device=x0.device, dtype=torch.long)
        pred = forward_fn(denoiser, x_t, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        return pred, target

    def describe(self):
        return {"family": self.name, "prediction_type": self.prediction_type}


class _ContinuousFamily(NoiseFamily):
    """Families with a continuous noise level equal to the grid value (σ or t); `to_model` maps it to the value the
    denoiser's forward takes (grid value / adapter scale)."""

    log_uniform = False

    def __init__(self, to_model: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.to_model = to_model or (lambda v: v)

    def draw(self, lo, hi, last, n, gen):
        r = torch.rand(n, generator=gen, dtype=torch.float64)
        if self.log_uniform and lo > 0:
            return torch.exp(math.log(lo) + r * (math.log(hi) - math.log(lo))), False
        return lo + r * (hi - lo), False


class EDMFamily(_ContinuousFamily):
    r"""
    σ-parameterised models: `x = x0 + σ ε`, EDM preconditioning and loss weight.

    Args:
        scheduler (*optional*): an EDM scheduler with `precondition_inputs`, `precondition_noise` and
            `precondition_outputs` (the denoiser is then the raw network those wrap), or `None` for a model whose
            own call `f(x, sigma)` is the preconditioned denoiser returning x0.
        sigma_data (`float`, *optional*): σ_d of the loss weight; defaults to the scheduler's, else 0.5.
        to_model (`Callable`, *optional*): σ → the value passed to the model (without a scheduler).
    """

    name = "edm"
    log_uniform = True

    def __init__(self, scheduler: Any = None, sigma_data: float | None = None, to_model=None):
        super().__init__(to_model)
        self.scheduler = scheduler
        cfg = getattr(scheduler, "config", {}) or {}
        self.sigma_data = float(sigma_data if sigma_data is not None else cfg.get("sigma_data", 0.5))
        self.preconditioned = scheduler is not None and callable(
            getattr(scheduler, "precondition_inputs", None)
        )

    def noised(self, x0, noise, level):
        return x0 + _expand(level, x0) * noise

    def predict_and_target(self, denoiser, forward_fn, x0, noise, x_t, level):
        sigma = level.to(device=x0.device, dtype=x0.dtype)
        if self.preconditioned:
            s = self.scheduler
            x_in = s.precondition_inputs(x_t, _expand(sigma, x_t))
            c_noise = s.precondition_noise(sigma)
            out = forward_fn(denoiser, x_in, c_noise)
            pred = s.precondition_outputs(x_t, out, _expand(sigma, x_t))
        else:
            pred = forward_fn(denoiser, x_t, self.to_model(sigma))
        return pred, x0

    def weight(self, level):
        sd = self.sigma_data
        sigma = level.float()
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def describe(self):
        return {"family": self.name, "sigma_data": self.sigma_data, "preconditioned": self.preconditioned}


class FlowMatchingFamily(_ContinuousFamily):
    r"""
    Rectified flow / flow matching: `x_t = (1 − t) x0 + t ε`, velocity target `ε − x0`.

    Args:
        to_model (`Callable`, *optional*): t → the value passed to the model (e.g. `t × 1000` for SD3).
    """

    name = "flow_matching"

    def noised(self, x0, noise, level):
        t = _expand(level, x0)
        return (1 - t) * x0 + t * noise

    def predict_and_target(self, denoiser, forward_fn, x0, noise, x_t, level):
        t = level.to(device=x0.device, dtype=x0.dtype)
        return forward_fn(denoiser, x_t, self.to_model(t)), noise - x0


def _is_flow(scheduler: Any) -> bool:
    return callable(getattr(scheduler, "scale_noise", None)) or "FlowMatch" in type(scheduler).__name__


def is_ddpm_scheduler(scheduler: Any) -> bool:
    """Whether `scheduler` is a discrete DDPM-type scheduler (`alphas_cumprod` + `add_noise`, not EDM or flow)."""
    return (
        scheduler is not None
        and not _is_flow(scheduler)
        and not callable(getattr(scheduler, "precondition_inputs", None))
        and callable(getattr(scheduler, "add_noise", None))
        and getattr(scheduler, "alphas_cumprod", None) is not None
    )


def noise_family(
    scheduler: Any,
    units: str,
    grid_values: Callable[[], torch.Tensor] | None = None,
    to_model: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> NoiseFamily:
    r"""
    The noise family of a scheduler (or of a plain model without one).

    Args:
        scheduler: a diffusers scheduler or `None`.
        units (`str`): the grid units (`"train_timestep"`, `"t"` or `"sigma"`).
        grid_values (`Callable`, *optional*): for DDPM schedulers, returns the grid value of every train timestep.
        to_model (`Callable`, *optional*): grid value → the value the denoiser's forward takes.

    Raises:
        `ValueError` naming the scheduler when no family fits.
    """
    if scheduler is None:
        if units == "sigma":
            return EDMFamily(None, to_model=to_model)
        if units == "t":
            return FlowMatchingFamily(to_model)
        raise ValueError(
            f"without a scheduler, profile_sensitivity needs grid units 'sigma' (x = x0 + σε) or 't' (flow "
            f"matching), not {units!r}"
        )
    if _is_flow(scheduler):
        return FlowMatchingFamily(to_model)
    if callable(getattr(scheduler, "precondition_inputs", None)):
        return EDMFamily(scheduler)
    if (
        callable(getattr(scheduler, "add_noise", None))
        and getattr(scheduler, "alphas_cumprod", None) is not None
    ):
        if grid_values is None:
            raise ValueError("a DDPM-type scheduler needs the grid values of its train timesteps")
        return DDPMFamily(scheduler, grid_values())
    raise ValueError(
        f"{type(scheduler).__name__} is neither DDPM-type (alphas_cumprod + add_noise), EDM (precondition_*) nor "
        "flow matching (scale_noise); pass family=EDMFamily(...) / FlowMatchingFamily(...) to profile_sensitivity"
    )
