"""Latent zoo models: a tiny MNIST VAE, a tiny CLIP, ``mnist-t2i`` (Stable Diffusion layout) and ``mnist-dit``.

Usage (stages must run in this order; ``mnist-t2i`` and ``mnist-dit`` may then run in parallel)::

    python -m tdq.zoo.latent vae          # AutoencoderKL on 32x32 padded MNIST -> 4x8x8 latents, + latent cache
    python -m tdq.zoo.latent clip         # tiny CLIPModel (text + vision tower), contrastive on (image, caption)
    python -m tdq.zoo.latent mnist-t2i    # UNet2DConditionModel on cached latents, frozen CLIP text tower
    python -m tdq.zoo.latent mnist-dit    # class-conditional DiTTransformer2DModel on cached latents

Every stage is resumable: each ``--ckpt-every`` steps the model, its EMA, the optimizer state
(``torch.load(weights_only=True)``-compatible) and a JSON state are written under ``<root>/<stage>/ckpt/``;
rerunning the same command continues from the newest checkpoint. Batches, noise and timesteps are derived from
``(seed, step)``, so a resumed run draws the same data as an uninterrupted one. Every ``--export-every`` steps
the EMA weights are exported in diffusers / transformers format (``tdq/zoo/checkpoints/mnist-clip``,
``mnist-t2i``, ``mnist-dit``), so a usable model exists even if training is killed.

The code is split by concern: [`tdq.zoo.captions`] (captions, tokenizer), [`tdq.zoo.latent_models`] (architectures,
configs, the CLIP loader), [`tdq.zoo.latent_stages`] (data, losses and exports of each stage) and the training loop
shared with the pixel model, [`tdq.zoo.loop.train_loop`]; this module is the command line and re-exports the
public names.

Images are MNIST digits padded from 28x28 to 32x32 (background -1 in ``[-1, 1]``); pipelines therefore
produce 32x32 images; crop ``[2:30, 2:30]`` to get MNIST-sized digits (see [`crop28`]).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from tdq.zoo import CHECKPOINT_ROOT
from tdq.zoo.captions import (
    BOS,
    DIGIT_WORDS,
    EOS,
    MAX_TEXT_LEN,
    TEMPLATES,
    all_captions,
    build_tokenizer,
    caption_vocab,
    write_tokenizer_files,
)
from tdq.zoo.latent_models import (
    SCHEDULER_CONFIG,
    STAGE_CONFIGS,
    build_clip,
    build_dit,
    build_scheduler,
    build_unet,
    build_vae,
    crop28,
    load_mnist_clip,
)
from tdq.zoo.latent_stages import _STAGES, _cache_latents

__all__ = [
    "BOS",
    "DIGIT_WORDS",
    "EOS",
    "MAX_TEXT_LEN",
    "SCHEDULER_CONFIG",
    "TEMPLATES",
    "STAGE_CONFIGS",
    "all_captions",
    "caption_vocab",
    "write_tokenizer_files",
    "build_tokenizer",
    "build_vae",
    "build_clip",
    "build_unet",
    "build_dit",
    "build_scheduler",
    "crop28",
    "load_mnist_clip",
    "train_stage",
    "main",
]

DEFAULT_ROOT = Path.home() / ".cache" / "tdq" / "zoo_runs" / "latent"  # --root overrides


def train_stage(
    stage: str,
    root: str | Path = DEFAULT_ROOT,
    steps: int | None = None,
    ckpt_every: int = 100,
    export_every: int = 500,
    threads: int = 1,
    export_root: str | Path | None = None,
) -> None:
    r"""
    Train (or resume) one stage of the latent zoo models.

    Args:
        stage (`str`): ``"vae"``, ``"clip"``, ``"mnist-t2i"`` or ``"mnist-dit"`` (in this order).
        root (`str` or `pathlib.Path`, *optional*): shared work directory of all stages
            (default ``~/.cache/tdq/zoo_runs/latent``); ``mnist-t2i``/``mnist-dit`` read the VAE, the latent
            cache and the CLIP from it.
        steps (`int`, *optional*): total optimizer steps (also the cosine schedule length); default: config.
        ckpt_every (`int`, *optional*, defaults to `100`): steps between resumable checkpoints.
        export_every (`int`, *optional*, defaults to `500`): steps between exports of the EMA weights.
        threads (`int`, *optional*, defaults to `1`): ``torch.set_num_threads`` value.
        export_root (`str` or `pathlib.Path`, *optional*): parent of the exported model directories
            (``mnist-clip``, ``mnist-t2i``, ``mnist-dit``); defaults to the packaged ``tdq/zoo/checkpoints``.
    """
    torch.set_num_threads(threads)
    cfg = copy.deepcopy(STAGE_CONFIGS[stage])
    if steps is not None:
        cfg["steps"] = steps
    _STAGES[stage](Path(root), cfg, ckpt_every, export_every, Path(export_root or CHECKPOINT_ROOT))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``python -m tdq.zoo.latent``."""
    p = argparse.ArgumentParser(prog="python -m tdq.zoo.latent", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(_STAGES))
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="shared work dir of all stages")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--export-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export-root", default=None, help="default: tdq/zoo/checkpoints")
    p.add_argument(
        "--cache-latents", action="store_true", help="vae only: (re)build the latent cache and exit"
    )
    a = p.parse_args(argv)
    if a.cache_latents:
        _cache_latents(Path(a.root))
        return 0
    train_stage(a.stage, a.root, a.steps, a.ckpt_every, a.export_every, a.threads, a.export_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
