"""tdq: timestep-aware quantization for diffusion models."""

from tdq.adapters import TimestepAdapter, TimestepArgumentError, get_adapter
from tdq.config import ConfigError, LayerOverride, QuantSpec, TDQConfig, TimestepGrid
from tdq.hooks import TimestepHook
from tdq.pipelines.wrap import wrap
from tdq.quant import NotCalibratedError, QuantConv2d, QuantLinear, TimestepActQuantizer, WeightQuantizer
from tdq.quantize import (
    calibrate,
    calibration,
    convert,
    disabled,
    get_state,
    install_hook,
    iter_quant_layers,
    prepare,
    quantize_,
    remove_hook,
    select_layers,
)

__version__ = "0.1.0"

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
    "get_state",
    "install_hook",
    "iter_quant_layers",
    "prepare",
    "quantize_",
    "remove_hook",
    "select_layers",
    "wrap",
]
