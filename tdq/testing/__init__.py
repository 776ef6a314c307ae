"""Tiny model and pipeline factories shared by tdq's tests and by users' own tests (random weights, offline)."""

from tdq.testing.models import (
    GrowingActivationDenoiser,
    ToySigmaDenoiser,
    denoiser_inputs,
    output_tensor,
    tiny_dit,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
    tiny_unet2d,
    tiny_unet2d_condition,
)
from tdq.testing.pipelines import (
    save_tiny_sd,
    tiny_clip_tokenizer,
    tiny_dit_pipeline,
    tiny_sd_components,
    tiny_sd_pipeline,
)

__all__ = [
    "GrowingActivationDenoiser",
    "ToySigmaDenoiser",
    "denoiser_inputs",
    "output_tensor",
    "save_tiny_sd",
    "tiny_clip_tokenizer",
    "tiny_dit",
    "tiny_dit_pipeline",
    "tiny_flux",
    "tiny_pixart",
    "tiny_sd3",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_unet2d",
    "tiny_unet2d_condition",
]
