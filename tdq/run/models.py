"""Loading the model that a run quantizes: a bundled zoo model, a diffusers folder, or a tiny random model built in
code (for fast tests only: random weights say nothing about quantization quality).

Three kinds of pipelines are supported:

- `"pixel"`: unconditional pixel-space pipelines with a `unet` (e.g. `DDPMPipeline`, `DDIMPipeline`);
- `"t2i"`: latent text-to-image pipelines in the Stable Diffusion layout (`vae`, `text_encoder`, `tokenizer`,
  `unet` = `UNet2DConditionModel`, `scheduler`);
- `"class"`: latent class-conditional `DiTPipeline`s (`transformer`, `vae`, `scheduler`).

Only the denoiser (`unet` / `transformer`) is quantized by `tdq run`; the VAE and the text encoder stay in floating
point and are kept in [`LoadedModel`] for the sampler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

KINDS = ("pixel", "t2i", "class")


@dataclass
class ModelConfig:
    r"""
    Which model a run uses.

    Args:
        name (`str`, *optional*, defaults to `"mnist-ddpm"`): a zoo model name, or a label for `path`/`random`.
        source (`str`, *optional*, defaults to `"zoo"`): `"zoo"` (bundled), `"path"` (a diffusers pipeline folder:
            pixel `unet` + `scheduler`, Stable Diffusion layout, or `DiTPipeline`) or `"random"` (a tiny
            `UNet2DModel` with random weights).
        path (`str`, *optional*): the folder, for `source="path"`.
        sample_size (`int`, *optional*, defaults to `16`): image size of the random model.
        guidance_scale (`float`, *optional*): classifier-free guidance scale of conditional models (`eval.guidance_scale`
            overrides it); `None` takes the pipeline's default (7.5 for text-to-image, 4.0 for DiT). Guidance is on
            when it is above 1 (cond and uncond batched in one denoiser call).
        prompt_template (`str`, *optional*, defaults to `"a handwritten digit {}"`): text-to-image prompt, `{}` is
            filled with the class name of the sample (`eval.prompt_template` overrides it).
        class_names (`list[str]`, *optional*): the class names; sample `i` of seed `s` is conditioned on class
            `s % len(class_names)`. `None` takes the `DiTPipeline`'s `id2label` (class models) and is required for
            text-to-image models.
        crop (`int`, *optional*, defaults to `0`): pixels cut from every border of the decoded images before
            feature and judge metrics (the latent MNIST models produce 32×32 images of 28×28 digits padded by 2).
    """

    name: str = "mnist-ddpm"
    source: str = "zoo"
    path: str | None = None
    sample_size: int = 16
    guidance_scale: float | None = None
    prompt_template: str = "a handwritten digit {}"
    class_names: list[str] | None = None
    crop: int = 0


@dataclass
class LoadedModel:
    r"""
    A denoiser ready for a run, with what its sampler needs.

    Args:
        name (`str`): model label.
        denoiser (`nn.Module`): the UNet or transformer (eval mode); the only part `tdq run` quantizes.
        scheduler (`SchedulerMixin`): its training/sampling scheduler.
        sample_shape (`tuple[int, int, int]`): shape `(C, H, W)` of one output image (decoded, for latent models).
        source (`str`): where it came from (path or `"random"`).
        kind (`str`, *optional*, defaults to `"pixel"`): `"pixel"`, `"t2i"` or `"class"`.
        latent_shape (`tuple[int, int, int]`, *optional*): shape `(C, h, w)` of the denoiser's input (equals
            `sample_shape` for pixel models).
        vae (`nn.Module`, *optional*): the `AutoencoderKL` of latent models (floating point).
        text_encoder (`nn.Module`, *optional*): the text encoder of text-to-image models (floating point).
        tokenizer (*optional*): its tokenizer.
        class_names (`list[str]`): class names of conditional models (empty for pixel models).
        guidance_scale (`float`, *optional*, defaults to `1.0`): classifier-free guidance scale.
        prompt_template (`str`, *optional*): text-to-image prompt template (`{}` = class name).
        null_class (`int`, *optional*, defaults to `1000`): the unconditional class label of DiT models (as in
            `DiTPipeline`).
        crop (`int`, *optional*, defaults to `0`): border cut before feature and judge metrics.
    """

    name: str
    denoiser: nn.Module
    scheduler: object
    sample_shape: tuple[int, int, int]
    source: str
    kind: str = "pixel"
    latent_shape: tuple[int, int, int] | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    class_names: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    prompt_template: str | None = None
    null_class: int = 1000
    crop: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is unknown; choose one of {KINDS}")
        if self.latent_shape is None:
            self.latent_shape = tuple(self.sample_shape)

    @property
    def num_train_timesteps(self) -> int:
        """Length of the training noise schedule."""
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def conditional(self) -> bool:
        """Whether samples are conditioned (text or class)."""
        return self.kind != "pixel"

    @property
    def eval_shape(self) -> tuple[int, int, int]:
        """Shape `(C, H, W)` of the images that feature and judge metrics see (after `crop`)."""
        c, h, w = self.sample_shape
        return (c, h - 2 * self.crop, w - 2 * self.crop)


def _zoo_folder(name: str) -> Path:
    from tdq import zoo

    try:
        return zoo.path(name)
    except (KeyError, FileNotFoundError):
        folder = zoo.CHECKPOINT_ROOT / name
        if (folder / "model_index.json").is_file():
            return folder
        raise


def load_model(cfg: ModelConfig, device: str = "cpu") -> LoadedModel:
    """
    Load the model described by `cfg`, offline.

    Args:
        cfg (`ModelConfig`): what to load.
        device (`str`, *optional*, defaults to `"cpu"`): where to put the denoiser (and VAE / text encoder).

    Returns:
        [`LoadedModel`]: its `kind` says which sampler fits (see [`tdq.sampling.make_sampler`]).
    """
    if cfg.source == "random":
        from diffusers import DDPMScheduler

        from tdq.testing.models import tiny_unet2d

        unet = tiny_unet2d(sample_size=cfg.sample_size)
        return LoadedModel(
            cfg.name, unet.to(device), DDPMScheduler(num_train_timesteps=1000), _shape(unet), "random"
        )
    if cfg.source == "zoo":
        folder = _zoo_folder(cfg.name)
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
    if cfg.crop < 0:
        raise ValueError(f"model.crop={cfg.crop} must be >= 0")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    vae = getattr(pipe, "vae", None)
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    text_encoder = getattr(pipe, "text_encoder", None)

    if unet is not None and vae is None:  # pixel space
        unet.eval().to(device)
        return LoadedModel(cfg.name, unet, pipe.scheduler, _shape(unet), str(folder), crop=cfg.crop)

    if vae is None:
        raise ValueError(
            f"{folder}: tdq run supports pixel pipelines with a 'unet', Stable Diffusion-layout pipelines "
            f"(vae, text_encoder, tokenizer, unet) and DiTPipeline (transformer, vae); got {type(pipe).__name__}"
        )
    vae.eval().requires_grad_(False).to(device)
    if unet is not None and text_encoder is not None:
        # class names are filled into the template; without them the prompts come from eval.prompts_file
        if cfg.class_names and "{}" not in cfg.prompt_template:
            raise ValueError(
                f"model.prompt_template={cfg.prompt_template!r} has no '{{}}' for the class name"
            )
        unet.eval().to(device)
        text_encoder.eval().requires_grad_(False).to(device)
        latent = _shape(unet)
        return LoadedModel(
            cfg.name,
            unet,
            pipe.scheduler,
            _decoded_shape(vae, latent),
            str(folder),
            kind="t2i",
            latent_shape=latent,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=pipe.tokenizer,
            class_names=list(cfg.class_names or []),
            guidance_scale=7.5 if cfg.guidance_scale is None else float(cfg.guidance_scale),
            prompt_template=cfg.prompt_template,
            crop=cfg.crop,
        )
    if transformer is not None and type(pipe).__name__ == "DiTPipeline":
        names = list(cfg.class_names or []) or _dit_class_names(pipe, folder)
        transformer.eval().to(device)
        latent = _shape(transformer)
        return LoadedModel(
            cfg.name,
            transformer,
            pipe.scheduler,
            _decoded_shape(vae, latent),
            str(folder),
            kind="class",
            latent_shape=latent,
            vae=vae,
            class_names=names,
            guidance_scale=4.0 if cfg.guidance_scale is None else float(cfg.guidance_scale),
            crop=cfg.crop,
        )
    raise ValueError(
        f"{folder}: {type(pipe).__name__} is not supported by tdq run (pixel 'unet' pipelines, Stable "
        "Diffusion layout and DiTPipeline are)"
    )


def _dit_class_names(pipe: Any, folder: Path) -> list[str]:
    """Class names of a DiTPipeline in label order: its `id2label`, else `training_info.json`'s."""
    labels = getattr(pipe, "labels", None) or {}
    if labels:  # DiTPipeline.labels maps name -> id (several names per id for ImageNet)
        by_id: dict[int, str] = {}
        for name, idx in labels.items():
            by_id.setdefault(int(idx), name)
        return [by_id[i] for i in sorted(by_id)]
    info = folder / "training_info.json"
    if info.is_file():
        id2label = json.loads(info.read_text()).get("id2label") or {}
        if id2label:
            return [id2label[k] for k in sorted(id2label, key=int)]
    raise ValueError(f"{folder}: the DiTPipeline has no id2label; set model.class_names")


def _decoded_shape(vae: nn.Module, latent: tuple[int, int, int]) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.out_channels), latent[1] * factor, latent[2] * factor)


def _shape(unet: nn.Module) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)
