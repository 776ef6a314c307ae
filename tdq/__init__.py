"""tdq: timestep-aware quantization for diffusion models."""

from tdq._version import __version__ as __version__
from tdq.adapters import TimestepAdapter, TimestepArgumentError, get_adapter
from tdq.api import (
    calibrate,
    calibration,
    convert,
    disabled,
    get_quantization,
    install_hook,
    iter_quant_layers,
    prepare,
    quantize_,
    remove_hook,
    select_layers,
)
from tdq.config import LayerOverride, QuantSpec, TDQConfig
from tdq.errors import ConfigError
from tdq.grid import TimestepGrid
from tdq.hooks import TimestepHook
from tdq.pipelines.wrap import wrap
from tdq.quant import NotCalibratedError, QuantConv2d, QuantLinear, TimestepActQuantizer, WeightQuantizer

__all__ = [
    "ConfigError",
    "LayerOverride",
    "NotCalibratedError",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "TDQConfig",
    "TimestepActQuantizer",
    "TimestepAdapter",
    "TimestepArgumentError",
    "TimestepGrid",
    "TimestepHook",
    "WeightQuantizer",
    "calibrate",
    "calibration",
    "convert",
    "disabled",
    "get_adapter",
    "get_quantization",
    "install_hook",
    "iter_quant_layers",
    "prepare",
    "quantize_",
    "remove_hook",
    "select_layers",
    "wrap",
]
