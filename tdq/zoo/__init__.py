"""Small diffusion models trained by this project and shipped with it (the "zoo").

No pretrained image diffusion model can be downloaded in the offline build environment, so ``tdq``
trains its own tiny MNIST models (``python -m tdq.zoo.train <name>``) and packages the exported
diffusers pipelines under ``tdq/zoo/checkpoints/<name>/``. [`load`] opens them fully offline.

Example::

    >>> import tdq.zoo
    >>> pipe = tdq.zoo.load("mnist-ddpm")  # diffusers.DDPMPipeline, 1x28x28 digits
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["REGISTRY", "ZooModel", "available", "path", "load", "CHECKPOINT_ROOT"]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class ZooModel:
    r"""
    Registry entry of a zoo model.

    Args:
        name (`str`): model name (directory under ``tdq/zoo/checkpoints/``).
        pipeline (`str`): diffusers pipeline class used by [`load`]; ``""`` for a non-pipeline model
            (only [`path`] applies).
        description (`str`): one-line description.
        train_command (`str`): command that trains and exports it.
    """

    name: str
    pipeline: str
    description: str
    train_command: str


REGISTRY: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "mnist-ddpm",
            "DDPMPipeline",
            "unconditional pixel-space UNet2DModel DDPM on MNIST 28x28 (eps-pred, 1000 steps)",
            "python -m tdq.zoo.train mnist-ddpm",
        ),
        ZooModel(
            "mnist-t2i",
            "StableDiffusionPipeline",
            "text-to-image latent UNet2DConditionModel on MNIST (Stable Diffusion layout, 32x32)",
            "python -m tdq.zoo.latent vae && python -m tdq.zoo.latent clip && python -m tdq.zoo.latent mnist-t2i",
        ),
        ZooModel(
            "mnist-dit",
            "DiTPipeline",
            "class-conditional latent DiTTransformer2DModel on MNIST (32x32)",
            "python -m tdq.zoo.latent vae && python -m tdq.zoo.latent mnist-dit",
        ),
        ZooModel(
            "mnist-clip",
            "",
            "tiny transformers CLIPModel trained on MNIST captions (for CLIPScore); not a pipeline",
            "python -m tdq.zoo.latent clip",
        ),
    )
}


def available() -> list[str]:
    r"""
    Names of zoo models whose checkpoint is present in this installation.

    Returns:
        `list[str]`: sorted model names.
    """
    return sorted(n for n in REGISTRY if _marker(n).is_file())


def _marker(name: str) -> Path:
    """File whose presence means the checkpoint was exported."""
    return CHECKPOINT_ROOT / name / ("model_index.json" if REGISTRY[name].pipeline else "config.json")


def path(name: str) -> Path:
    r"""
    Directory of a packaged zoo checkpoint (diffusers layout: ``model_index.json``, ``unet/``, ``scheduler/``).

    Args:
        name (`str`): zoo model name, e.g. ``"mnist-ddpm"``.

    Returns:
        `pathlib.Path`: the checkpoint directory.

    Raises:
        `KeyError`: unknown name.
        `FileNotFoundError`: the model is registered but not trained / exported yet.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown zoo model {name!r}; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    p = CHECKPOINT_ROOT / name
    if not _marker(name).is_file():
        raise FileNotFoundError(
            f"zoo checkpoint {name!r} is not trained / exported yet (nothing at {p}). "
            f"Available models: {available() or 'none'}. Train and export it with `{entry.train_command}`."
        )
    return p


def load(name: str, **kwargs):
    r"""
    Load a zoo model as a diffusers pipeline, offline.

    Args:
        name (`str`): zoo model name: ``"mnist-ddpm"`` (``DDPMPipeline``), ``"mnist-t2i"``
            (``StableDiffusionPipeline``) or ``"mnist-dit"`` (``DiTPipeline``).
        **kwargs: forwarded to ``DiffusionPipeline.from_pretrained`` (e.g. ``torch_dtype``).

    Returns:
        `diffusers.DiffusionPipeline`: the pipeline. For a DDIM sampler on the same weights use
        ``diffusers.DDIMPipeline.from_pretrained(tdq.zoo.path(name))``.
    """
    import diffusers

    p = path(name)
    if not REGISTRY[name].pipeline:
        raise ValueError(
            f"zoo model {name!r} is not a diffusers pipeline; open tdq.zoo.path({name!r}) directly"
        )
    cls = getattr(diffusers, REGISTRY[name].pipeline)
    kwargs.setdefault("local_files_only", True)
    return cls.from_pretrained(p, **kwargs)
