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


@dataclass(frozen=True)
class _AdapterSpec:
    arg_name: str
    units: str
    t_min: float
    t_max: float | None  # None: num_train_timesteps - 1
    spacing: str = "linear"
    scale: float = 1.0


# The registry: denoiser class -> where its timestep is. Looked up along the MRO, so a user's subclass of a
# registered class gets its parent's adapter (diffusers' `_helpers` registries work the same way).
_REGISTRY: dict[type, _AdapterSpec] = {}
_DIFFUSERS_REGISTERED = False

# diffusers classes, registered by name on first lookup (so `import tdq` does not import diffusers).
_DIFFUSERS_SPECS: dict[str, _AdapterSpec] = {
    "UNet2DModel": _AdapterSpec("timestep", "train_timestep", 0.0, None),
    "UNet2DConditionModel": _AdapterSpec("timestep", "train_timestep", 0.0, None),
    "DiTTransformer2DModel": _AdapterSpec("timestep", "train_timestep", 0.0, None),
    "PixArtTransformer2DModel": _AdapterSpec("timestep", "train_timestep", 0.0, None),
    "Transformer2DModel": _AdapterSpec("timestep", "train_timestep", 0.0, None),
    # SD3 pipelines pass t × 1000 (flow matching), Flux pipelines pass t in [0, 1].
    "SD3Transformer2DModel": _AdapterSpec("timestep", "t", 0.0, 1.0, "linear", 1e-3),
    "FluxTransformer2DModel": _AdapterSpec("timestep", "t", 0.0, 1.0, "linear", 1.0),
}


def register_adapter(
    model_cls: type,
    arg_name: str,
    units: str,
    t_min: float,
    t_max: float | None,
    spacing: str = "linear",
    scale: float = 1.0,
) -> None:
    r"""
    Register where the timestep of `model_cls` (and of its subclasses) is and in which units.

    Args:
        model_cls (`type`): the denoiser class.
        arg_name (`str`): name of the timestep parameter of its `forward`.
        units (`str`): grid units of the mapped value: `"train_timestep"`, `"t"` or `"sigma"`.
        t_min (`float`): default lower end of the grid.
        t_max (`float` or `None`): default upper end; `None` means `num_train_timesteps - 1`.
        spacing (`str`, *optional*, defaults to `"linear"`): default bucket spacing.
        scale (`float`, *optional*, defaults to `1.0`): grid value = raw timestep × `scale`.
    """
    if not isinstance(model_cls, type):
        raise TypeError(f"register_adapter needs a class, got {type(model_cls).__name__}")
    _REGISTRY[model_cls] = _AdapterSpec(arg_name, units, t_min, t_max, spacing, scale)


def _register_diffusers() -> None:
    global _DIFFUSERS_REGISTERED
    if _DIFFUSERS_REGISTERED:
        return
    _DIFFUSERS_REGISTERED = True
    try:
        import diffusers
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    for name, spec in _DIFFUSERS_SPECS.items():
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type):
            _REGISTRY.setdefault(cls, spec)


def _registered_spec(model_cls: type) -> _AdapterSpec | None:
    if any(c.__module__.startswith("diffusers") for c in model_cls.__mro__):
        _register_diffusers()
    for cls in model_cls.__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def get_adapter(model: nn.Module, num_train_timesteps: int = 1000) -> TimestepAdapter:
    """
    The adapter of a denoiser: the registered one of its class or nearest registered base class (MRO), else one
    found from `forward`'s signature.

    Args:
        model (`nn.Module`): the denoiser.
        num_train_timesteps (`int`, *optional*, defaults to `1000`): length of the training schedule, for models
            whose timestep is a discrete training timestep.

    Raises:
        `TimestepArgumentError` if no parameter of `forward` looks like a timestep.
    """
    cls_name = type(model).__name__
    forward = model.forward
    spec = _registered_spec(type(model))
    if spec is not None:
        t_max = float(num_train_timesteps - 1) if spec.t_max is None else spec.t_max
        return TimestepAdapter(
            spec.arg_name,
            _position(forward, spec.arg_name),
            spec.units,
            spec.t_min,
            t_max,
            spec.spacing,
            spec.scale,
        )
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


@dataclass
class ConstantTimestepAdapter(TimestepAdapter):
    r"""
    Adapter for modules without a timestep argument: every call reads the constant `value`.

    Args:
        arg_name (`str`, *optional*, defaults to `"<constant>"`): a label only; no argument is read.
        position (`int`, *optional*): unused.
        units (`str`, *optional*, defaults to `"t"`): grid units of `value`.
        t_min (`float`, *optional*, defaults to `0.0`): lower end of the (single-bucket) grid.
        t_max (`float`, *optional*, defaults to `1.0`): upper end of the grid.
        value (`float`, *optional*, defaults to `0.0`): the time value published on every call.
    """

    arg_name: str = "<constant>"
    position: int | None = None
    units: str = "t"
    t_min: float = 0.0
    t_max: float = 1.0
    value: float = 0.0

    def read(self, args: tuple, kwargs: dict[str, Any], model_name: str = "module") -> float:
        """Return the constant time value (no argument of the call is read)."""
        return self.value
