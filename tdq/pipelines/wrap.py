"""`tdq.pipelines.wrap`: timestep-aware quantization of the denoiser of any diffusers pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from tdq.api import calibration, quantize_
from tdq.config import TDQConfig

DENOISER_ATTRS = ("unet", "transformer")


def get_denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """
    The denoiser of a diffusers pipeline: `(attribute name, module)` for `pipe.unet` or `pipe.transformer`.

    Raises:
        `TypeError` if the pipeline has neither.
    """
    for attr in DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    raise TypeError(
        f"{type(pipe).__name__} has no denoiser at pipe.unet or pipe.transformer; quantize its denoiser with "
        "tdq.quantize_ directly"
    )


def wrap(
    pipe: Any,
    config: TDQConfig | None = None,
    calibrate_fn: Callable[[Any], Any] | None = None,
    *,
    schedule: Any = None,
    calibration_seed: int = 0,
    backend: str | None = None,
    **calibration_kwargs,
) -> Any:
    r"""
    Quantize the denoiser of any diffusers pipeline in place and calibrate it through the sampler hook.

    Works with every pipeline whose denoiser is `pipe.unet` or `pipe.transformer` (DDPM/DDIM, Stable Diffusion, DiT,
    PixArt, SD3, Flux, ...): the timestep adapter is chosen from the denoiser's class and the grid from the
    scheduler's `num_train_timesteps`.

    ```python
    pipe = tdq.pipelines.wrap(pipe, TDQConfig(), class_labels=[1, 2, 3], num_inference_steps=20)
    images = pipe(class_labels=[7], num_inference_steps=50).images
    ```

    Args:
        pipe (`DiffusionPipeline`):
            The pipeline; its denoiser is quantized in place.
        config (`TDQConfig`, *optional*):
            Quantization config; defaults to `TDQConfig()`.
        calibrate_fn (`Callable[[DiffusionPipeline], Any]`, *optional*):
            Runs the calibration sampling, e.g. `lambda p: p(prompts, num_inference_steps=20)`; called inside
            `tdq.calibration(denoiser)`.
        schedule (`PrecisionSchedule`, *optional*):
            Mixed-precision schedule applied before calibration.
        calibration_seed (`int`, *optional*, defaults to `0`):
            Seed of the observers (percentile/MSE subsampling).
        backend (`str`, *optional*):
            After calibration, lower the denoiser onto this backend (`tdq.to_backend`: `"auto"`, `"x86"`, ...);
            needs calibration (`calibrate_fn` or calibration keyword arguments).
        **calibration_kwargs:
            Without `calibrate_fn`: arguments of one pipeline call used for calibration. When neither is given the
            denoiser is left uncalibrated: run the sampler inside `tdq.calibration(denoiser)` yourself before use.

    Returns:
        The same `pipe`.
    """
    if calibrate_fn is not None and calibration_kwargs:
        raise ValueError("pass calibrate_fn or calibration keyword arguments, not both")
    _, denoiser = get_denoiser(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    num_train = int(getattr(scheduler, "config", {}).get("num_train_timesteps", 1000)) if scheduler else 1000
    quantize_(denoiser, config, num_train_timesteps=num_train)
    if schedule is not None:
        schedule.apply_(denoiser, attention_bits=(config or TDQConfig()).activation.bits)
    if calibrate_fn is not None or calibration_kwargs:
        with calibration(denoiser, seed=calibration_seed):
            if calibrate_fn is not None:
                calibrate_fn(pipe)
            else:
                pipe(**calibration_kwargs)
    if backend is not None:
        from tdq.quant.backends import to_backend

        to_backend(denoiser, backend)
    return pipe
