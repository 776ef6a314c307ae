"""tdq: timestep-aware quantization for diffusion models.

The verbs (`quantize_`, `calibration`, `disabled`, `wrap`), the config (`TDQConfig`, `QuantSpec`, `TimestepGrid`),
saved quantization (`save_quantization`, `load_quantization`), the drop-in `TDQPipeline` for Stable Diffusion, and
`evaluate` (the measurements of `tdq run` for any quantizer function, with `register_quantizer` for plug-ins).
"""

from tdq._version import __version__ as __version__
from tdq.adapters import TimestepAdapter, TimestepArgumentError, get_adapter, register_adapter
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
    quantize_static_,
    remove_hook,
    select_layers,
)
from tdq.config import LayerOverride, QuantSpec, TDQConfig
from tdq.errors import ConfigError
from tdq.grid import TimestepGrid
from tdq.hooks import TimestepHook
from tdq.pipelines.wrap import wrap
from tdq.quant import (
    NonFiniteActivationError,
    NotCalibratedError,
    QuantConv2d,
    QuantLinear,
    TimestepActQuantizer,
    WeightQuantizer,
    register_quant_module,
)
from tdq.quant.backends import backend_info, resident_bytes, to_backend
from tdq.serialization import load_quantization, save_quantization


def __getattr__(name):
    # `TDQPipeline` imports diffusers' Stable Diffusion and transformers: loaded on first use, so `import tdq` is light.
    if name == "TDQPipeline":
        from tdq.pipelines.stable_diffusion import TDQPipeline

        return TDQPipeline
    # `evaluate` and the quantizer registry belong to the run layer (sampling, metrics): loaded on first use too.
    if name == "evaluate":
        from tdq.run.evaluate import evaluate

        return evaluate
    if name == "finetune_qat":  # QAT samples through tdq.sampling: loaded on first use
        from tdq.qat import finetune_qat

        return finetune_qat
    if name == "register_quantizer":
        from tdq.run.quantizers import register_quantizer

        return register_quantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "LayerOverride",
    "NonFiniteActivationError",
    "NotCalibratedError",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "TDQPipeline",
    "TDQConfig",
    "TimestepActQuantizer",
    "TimestepAdapter",
    "TimestepArgumentError",
    "TimestepGrid",
    "TimestepHook",
    "WeightQuantizer",
    "backend_info",
    "calibrate",
    "calibration",
    "convert",
    "disabled",
    "finetune_qat",
    "evaluate",
    "get_adapter",
    "get_quantization",
    "install_hook",
    "load_quantization",
    "iter_quant_layers",
    "prepare",
    "quantize_",
    "quantize_static_",
    "register_adapter",
    "register_quant_module",
    "register_quantizer",
    "remove_hook",
    "resident_bytes",
    "save_quantization",
    "select_layers",
    "to_backend",
    "wrap",
]
