"""Pipelines: `TDQPipeline` (a quantized `StableDiffusionPipeline`) and `wrap` for any diffusers pipeline."""

from tdq.adapters import ConstantTimestepAdapter
from tdq.api import quantize_static_, static_config
from tdq.pipelines.wrap import get_denoiser, wrap


def __getattr__(name):
    # TDQPipeline imports diffusers' Stable Diffusion (and transformers) lazily: `import tdq.pipelines` stays light.
    if name in ("TDQPipeline", "DEFAULT_CALIBRATION_PROMPTS"):
        from tdq.pipelines import stable_diffusion

        return getattr(stable_diffusion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConstantTimestepAdapter",
    "DEFAULT_CALIBRATION_PROMPTS",
    "TDQPipeline",
    "get_denoiser",
    "quantize_static_",
    "static_config",
    "wrap",
]
