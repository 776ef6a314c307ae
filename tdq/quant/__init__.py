"""Quantizer math, observers, quantizers and quantized modules."""

from tdq.quant.modules import (
    QUANT_MODULES,
    QuantConv2d,
    QuantLinear,
    QuantMixin,
    quant_module_class,
    register_quant_module,
)
from tdq.quant.observers import MinMaxObserver, MSEObserver, Observer, PercentileObserver, make_observer
from tdq.quant.quantizers import (
    NonFiniteActivationError,
    NotCalibratedError,
    TimestepActQuantizer,
    TimestepContext,
    WeightQuantizer,
)

__all__ = [
    "QUANT_MODULES",
    "MSEObserver",
    "MinMaxObserver",
    "NonFiniteActivationError",
    "NotCalibratedError",
    "Observer",
    "PercentileObserver",
    "QuantConv2d",
    "QuantLinear",
    "QuantMixin",
    "TimestepActQuantizer",
    "TimestepContext",
    "WeightQuantizer",
    "make_observer",
    "quant_module_class",
    "register_quant_module",
]
