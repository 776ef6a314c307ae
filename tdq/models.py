"""Loading the denoiser and scheduler that a run quantizes: a bundled zoo model, a diffusers folder, or a tiny
random model built in code (for fast tests only: random weights say nothing about quantization quality)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class ModelConfig:
    r"""
    Which model a run uses.

    Args:
        name (`str`, *optional*, defaults to `"mnist-ddpm"`): a zoo model name, or a label for `path`/`random`.
        source (`str`, *optional*, defaults to `"zoo"`): `"zoo"` (bundled), `"path"` (a diffusers pipeline folder
            with `unet` and `scheduler`) or `"random"` (a tiny `UNet2DModel` with random weights).
        path (`str`, *optional*): the folder, for `source="path"`.
        sample_size (`int`, *optional*, defaults to `16`): image size of the random model.
    """

    name: str = "mnist-ddpm"
    source: str = "zoo"
    path: str | None = None
    sample_size: int = 16


@dataclass
class LoadedModel:
    r"""
    A denoiser ready for a run.

    Args:
        name (`str`): model label.
        denoiser (`nn.Module`): the UNet (eval mode).
        scheduler (`SchedulerMixin`): its training/sampling scheduler.
        sample_shape (`tuple[int, int, int]`): shape `(C, H, W)` of one sample.
        source (`str`): where it came from (path or `"random"`).
    """

    name: str
    denoiser: nn.Module
    scheduler: object
    sample_shape: tuple[int, int, int]
    source: str

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training noise schedule."""
        return int(self.scheduler.config.num_train_timesteps)


def load_model(cfg: ModelConfig, device: str = "cpu") -> LoadedModel:
    """
    Load the model described by `cfg`, offline.

    Args:
        cfg (`ModelConfig`): what to load.
        device (`str`, *optional*, defaults to `"cpu"`): where to put the denoiser.
    """
    if cfg.source == "random":
        from diffusers import DDPMScheduler

        from tdq.testing import tiny_unet2d

        unet = tiny_unet2d(sample_size=cfg.sample_size)
        return LoadedModel(
            cfg.name, unet.to(device), DDPMScheduler(num_train_timesteps=1000), _shape(unet), "random"
        )
    if cfg.source == "zoo":
        from tdq import zoo

        folder = zoo.path(cfg.name)
    elif cfg.source == "path":
        if not cfg.path:
            raise ValueError("model.path must be set when model.source='path'")
        folder = Path(cfg.path)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.path={cfg.path!r} is not a diffusers pipeline folder (no model_index.json)"
            )
    else:
        raise ValueError(f"model.source={cfg.source!r} is unknown; choose 'zoo', 'path' or 'random'")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{folder}: tdq run supports pixel-space pipelines with a 'unet' component for now")
    unet.eval().to(device)
    return LoadedModel(cfg.name, unet, pipe.scheduler, _shape(unet), str(folder))


def _shape(unet: nn.Module) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)
