"""Model adapters: where a denoiser's timestep argument is and in which units it comes.

An adapter reads the raw timestep from a forward call (positional or keyword) and converts it to the grid units of
`TimestepGrid` (`"train_timestep"`, `"t"` in [0, 1] or `"sigma"`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Parameter names tried, in order, for models without a registered adapter.
TIMESTEP_ARG_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")


class TimestepArgumentError(ValueError):
    """Raised when the timestep argument of a denoiser cannot be found."""


@dataclass
class TimestepAdapter:
    r"""
    Where the timestep is in a denoiser's `forward` and how to map it onto the grid.

    Args:
        arg_name (`str`): name of the timestep parameter of `forward`.
        position (`int` or `None`): its positional index (not counting `self`); `None` if keyword-only.
        units (`str`): grid units of the mapped value: `"train_timestep"`, `"t"` or `"sigma"`.
        t_min (`float`): default lower end of the grid.
        t_max (`float`): default upper end of the grid.
        spacing (`str`, *optional*, defaults to `"linear"`): default bucket spacing (`"log"` suits sigma).
        scale (`float`, *optional*, defaults to `1.0`): grid value = raw timestep × `scale` (SD3 passes t × 1000).
    """

    arg_name: str
    position: int | None
    units: str
    t_min: float
    t_max: float
    spacing: str = "linear"
    scale: float = 1.0

    def read(self, args: tuple, kwargs: dict[str, Any], model_name: str = "denoiser") -> Any:
        """Return the raw timestep of a forward call; raises `TimestepArgumentError` if it was not passed."""
        if self.arg_name in kwargs:
            value = kwargs[self.arg_name]
        elif self.position is not None and len(args) > self.position:
            value = args[self.position]
        else:
            value = None
        if value is None:
            raise TimestepArgumentError(
                f"{model_name} was called without its timestep argument {self.arg_name!r}; tdq needs the timestep "
                "of every denoiser call"
            )
        return value

    def to_grid(self, value: Any) -> torch.Tensor | float:
        """Convert a raw timestep (number or tensor) to grid units."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
            return value * self.scale if self.scale != 1.0 else value
        return float(value) * self.scale

    def default_grid(self) -> tuple[str, float, float, str]:
        """`(units, t_min, t_max, spacing)` used to resolve an `"auto"` grid."""
        return self.units, self.t_min, self.t_max, self.spacing


def _position(forward, name: str) -> int | None:
    params = [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
    for i, p in enumerate(params):
        if p.name == name:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                return i
            return None
    raise TimestepArgumentError(f"forward() has no parameter {name!r}")


# class name -> (arg_name, units, t_min, t_max, spacing, scale). num_train_timesteps-dependent t_max is filled later.
_KNOWN: dict[str, tuple[str, str, float | None, float | None, str, float]] = {
    "UNet2DModel": ("timestep", "train_timestep", 0.0, None, "linear", 1.0),
    "UNet2DConditionModel": ("timestep", "train_timestep", 0.0, None, "linear", 1.0),
    "DiTTransformer2DModel": ("timestep", "train_timestep", 0.0, None, "linear", 1.0),
    "PixArtTransformer2DModel": ("timestep", "train_timestep", 0.0, None, "linear", 1.0),
    "Transformer2DModel": ("timestep", "train_timestep", 0.0, None, "linear", 1.0),
    # SD3 pipelines pass t × 1000 (flow matching), Flux pipelines pass t in [0, 1].
    "SD3Transformer2DModel": ("timestep", "t", 0.0, 1.0, "linear", 1e-3),
    "FluxTransformer2DModel": ("timestep", "t", 0.0, 1.0, "linear", 1.0),
}


def get_adapter(model: nn.Module, num_train_timesteps: int = 1000) -> TimestepAdapter:
    """
    The adapter of a denoiser: a registered one for known diffusers classes, else found from `forward`'s signature.

    Args:
        model (`nn.Module`): the denoiser.
        num_train_timesteps (`int`, *optional*, defaults to `1000`): length of the training schedule, for models
            whose timestep is a discrete training timestep.

    Raises:
        `TimestepArgumentError` if no parameter of `forward` looks like a timestep.
    """
    cls_name = type(model).__name__
    forward = model.forward
    if cls_name in _KNOWN:
        arg, units, t_min, t_max, spacing, scale = _KNOWN[cls_name]
        if t_max is None:
            t_max = float(num_train_timesteps - 1)
        return TimestepAdapter(arg, _position(forward, arg), units, t_min, t_max, spacing, scale)
    names = [p for p in inspect.signature(forward).parameters if p != "self"]
    for cand in TIMESTEP_ARG_NAMES:
        if cand in names:
            if cand.startswith("sigma") or cand == "noise_level":
                # EDM's noise levels by default; pass your own grid for other ranges.
                return TimestepAdapter(cand, _position(forward, cand), "sigma", 0.002, 80.0, "log")
            if cand == "t":
                return TimestepAdapter(cand, _position(forward, cand), "t", 0.0, 1.0, "linear")
            return TimestepAdapter(
                cand,
                _position(forward, cand),
                "train_timestep",
                0.0,
                float(num_train_timesteps - 1),
                "linear",
            )
    raise TimestepArgumentError(
        f"cannot find the timestep argument of {cls_name}.forward{tuple(names)}: none of {list(TIMESTEP_ARG_NAMES)}; "
        "pass adapter=TimestepAdapter(arg_name=..., position=..., units=..., t_min=..., t_max=...)"
    )
