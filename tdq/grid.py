"""`TimestepGrid`: the grid over a model's native time variable, its buckets, and the timestep-to-bucket map."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from tdq.errors import ConfigError

UNITS = ("auto", "train_timestep", "t", "sigma")


SPACINGS = ("linear", "log")


OUT_OF_RANGE = ("nearest", "error")

# Largest bucket count accepted: every activation quantizer holds this many scales (per-step grids of 1000-step
# samplers fit; 2**40 would reach the allocator).
MAX_NUM_BUCKETS = 4096


def is_int(value: Any) -> bool:
    """Whether `value` is an integer (Python or numpy; `bool` and integral floats such as `8.0` are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any, finite: bool = True) -> bool:
    """Whether `value` is a real number (not `bool`, not a string), finite unless `finite=False`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return not finite or math.isfinite(float(value))


def check_bool(value: Any, field_name: str) -> None:
    """Raise `ConfigError` naming `field_name` unless `value` is a `bool`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} must be true or false, got {type(value).__name__}")


def check_choice(value: Any, choices: tuple[str, ...], field_name: str) -> None:
    """Raise `ConfigError` naming `field_name` unless `value` is one of the strings `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{field_name}={value!r} is unknown; choose one of {list(choices)}")


@dataclass
class TimestepGrid:
    r"""
    The grid of timestep buckets that activation scales live on, in the model's native time variable.

    A sampler with any step count or solver maps onto the same buckets, so one calibration serves DDIM-50,
    DPM-Solver-20 and Euler alike.

    Args:
        units (`str`, *optional*, defaults to `"auto"`):
            `"train_timestep"` (discrete training timestep, e.g. 0..999), `"t"` (continuous time in [0, 1]),
            `"sigma"` (noise level) or `"auto"` (taken from the model adapter).
        t_min (`float`, *optional*):
            Lower end of the grid; `None` takes the adapter's default.
        t_max (`float`, *optional*):
            Upper end of the grid; `None` takes the adapter's default.
        num_buckets (`int`, *optional*, defaults to `10`):
            Number of buckets K. Every activation quantizer holds K scales.
        spacing (`str`, *optional*, defaults to `"linear"`):
            `"linear"` or `"log"` bucket edges (log suits sigma).
        out_of_range (`str`, *optional*, defaults to `"nearest"`):
            What a timestep outside `[t_min, t_max]` does: `"nearest"` uses the nearest bucket, `"error"` raises.
    """

    units: str = "auto"
    t_min: float | None = None
    t_max: float | None = None
    num_buckets: int = 10
    spacing: str = "linear"
    out_of_range: str = "nearest"

    def validate(self, field_name: str = "grid") -> None:
        """Raise `ConfigError` naming the field if the grid is unusable (wrong type or out of range)."""
        check_choice(self.units, UNITS, f"{field_name}.units")
        if not is_int(self.num_buckets) or not 1 <= self.num_buckets <= MAX_NUM_BUCKETS:
            raise ConfigError(
                f"{field_name}.num_buckets={self.num_buckets!r} must be an integer in [1, {MAX_NUM_BUCKETS}]"
            )
        check_choice(self.spacing, SPACINGS, f"{field_name}.spacing")
        check_choice(self.out_of_range, OUT_OF_RANGE, f"{field_name}.out_of_range")
        for end in ("t_min", "t_max"):
            value = getattr(self, end)
            if value is not None and not is_real(value):
                raise ConfigError(f"{field_name}.{end}={value!r} must be a finite number or null")
        if self.t_min is not None and self.t_max is not None and not self.t_min < self.t_max:
            raise ConfigError(f"{field_name}: t_min={self.t_min} must be smaller than t_max={self.t_max}")
        if self.spacing == "log" and self.t_min is not None and self.t_min <= 0:
            raise ConfigError(f"{field_name}: spacing='log' needs t_min > 0, got {self.t_min}")

    @property
    def resolved(self) -> bool:
        """Whether units and both ends are known (no `"auto"`/`None` left)."""
        return self.units != "auto" and self.t_min is not None and self.t_max is not None

    def resolve(self, units: str, t_min: float, t_max: float, spacing: str | None = None) -> TimestepGrid:
        """Return a copy with `"auto"`/`None` fields filled from an adapter's defaults."""
        grid = copy.copy(self)
        if grid.units == "auto":
            grid.units = units
            if spacing is not None and self.spacing == "linear":
                grid.spacing = spacing
        if grid.t_min is None:
            grid.t_min = float(t_min)
        if grid.t_max is None:
            grid.t_max = float(t_max)
        grid.validate()
        return grid

    def edges(self) -> torch.Tensor:
        """Bucket edges, a float64 tensor of shape `[num_buckets + 1]` from `t_min` to `t_max`."""
        if not self.resolved:
            raise ConfigError("grid is not resolved: units/t_min/t_max are still 'auto'/None")
        if self.spacing == "log":
            return torch.logspace(
                math.log10(self.t_min),
                math.log10(self.t_max),
                self.num_buckets + 1,
                dtype=torch.float64,
                device="cpu",  # also under a `torch.device("meta")` context: the edges are host-side constants
            )
        return torch.linspace(self.t_min, self.t_max, self.num_buckets + 1, dtype=torch.float64, device="cpu")

    def centers(self) -> torch.Tensor:
        """Bucket centres (geometric for log spacing), shape `[num_buckets]`."""
        e = self.edges()
        if self.spacing == "log":
            return (e[:-1] * e[1:]).sqrt()
        return (e[:-1] + e[1:]) / 2

    def bucket(self, values: torch.Tensor | float) -> torch.Tensor:
        """
        Map time values (in grid units) to bucket indices.

        Args:
            values (`torch.Tensor` or `float`): time values of any shape.

        Returns:
            `torch.LongTensor` of the same shape with indices in `[0, num_buckets)`.
        """
        v = torch.as_tensor(values, dtype=torch.float64, device="cpu")
        if bool(torch.isnan(v).any()):
            raise ValueError(f"timestep is NaN ({self.units}); a timestep must be a finite number")
        if self.out_of_range == "error":
            tol = 1e-6 * max(abs(self.t_max), 1.0)
            bad = (v < self.t_min - tol) | (v > self.t_max + tol)
            if bool(bad.any()):
                raise ValueError(
                    f"timestep {v[bad].flatten()[0].item():g} lies outside the calibrated grid "
                    f"[{self.t_min:g}, {self.t_max:g}] ({self.units}); set grid.out_of_range='nearest' to use the "
                    "nearest bucket"
                )
        inner = self.edges()[1:-1]
        return torch.bucketize(v, inner, right=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-safe)."""
        return dataclasses.asdict(self)
