"""Quantization of modules that have no timestep (a text encoder, a VAE decoder) with a single-bucket context.

Such modules run once per prompt or once per image, not once per denoising step, so there is no timestep to key
their activation scales on. tdq quantizes them honestly as *static* quantization: the same weight spec as the
denoiser and one activation scale per layer (a grid of K = 1 bucket), calibrated on the same calibration run. A
`ConstantTimestepAdapter` publishes that single bucket on every call, so the engine's hook and quantizers work
unchanged. Pass a config with `activation.enabled=False` for weight-only quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tdq.adapters import TimestepAdapter
from tdq.config import TDQConfig, TimestepGrid
from tdq.quantize import quantize_


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


def static_config(base: TDQConfig | None = None) -> TDQConfig:
    r"""
    A single-bucket config for a module without a timestep, taking the weight and activation specs of `base`.

    Layer selection (`include`/`exclude`/`overrides`) is not copied: its names refer to the denoiser.

    Args:
        base (`TDQConfig`, *optional*): config whose weight/activation specs are reused; defaults to `TDQConfig()`.
    """
    base = base or TDQConfig()
    return TDQConfig(
        weight=base.weight,
        activation=base.activation,
        grid=TimestepGrid(units="t", t_min=0.0, t_max=1.0, num_buckets=1),
    )


def quantize_static_(module: nn.Module, config: TDQConfig | None = None) -> nn.Module:
    r"""
    Quantize a module that has no timestep (text encoder, VAE decoder) in place with one activation bucket.

    Calibrate it with `tdq.calibration(module)` like a denoiser: every call feeds its single bucket.

    Args:
        module (`nn.Module`): the module.
        config (`TDQConfig`, *optional*):
            Used as is when its grid has one bucket; otherwise its weight/activation specs are taken into
            `static_config`. Defaults to `static_config()`.

    Returns:
        The same `module`.
    """
    if config is None or config.grid.num_buckets != 1:
        config = static_config(config)
    return quantize_(module, config, adapter=ConstantTimestepAdapter())
