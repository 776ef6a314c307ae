"""Tiny Stable Diffusion and DiT pipelines built in code (no hub access), for tests and examples."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

# A byte-level BPE vocabulary in the CLIP format, small enough to write inline (the one transformers' own tokenizer
# tests use). Characters outside it map to `<unk>`; that is fine for tests, which only need valid token ids.
_TINY_VOCAB = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "s",
    "t",
    "i",
    "d",
    "n",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
]
_TINY_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>", ""]


def tiny_clip_tokenizer(directory: str | os.PathLike | None = None):
    """
    A `CLIPTokenizer` built from a tiny local `vocab.json` / `merges.txt` (no hub).

    Args:
        directory (`str` or `os.PathLike`, *optional*):
            Where to write the vocabulary files; a fresh temporary directory when `None`.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory or tempfile.mkdtemp(prefix="tdq-tok-"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(_TINY_VOCAB)}))
    (directory / "merges.txt").write_text("\n".join(_TINY_MERGES))
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def tiny_sd_components(seed: int = 0) -> dict:
    """
    The components of a tiny Stable Diffusion pipeline (8×8 latents, 8×8 images), with fixed random weights.

    Args:
        seed (`int`, *optional*, defaults to `0`): seed of the random weights.

    Returns:
        `dict` with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`, `safety_checker=None`,
        `feature_extractor=None` and `requires_safety_checker=False`, ready for `StableDiffusionPipeline(**c)`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=21,
            eos_token_id=22,
            pad_token_id=22,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=1000,
            projection_dim=8,
            layer_norm_eps=1e-5,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd_pipeline(seed: int = 0):
    """A tiny `StableDiffusionPipeline` (see `tiny_sd_components`), progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny Stable Diffusion pipeline and `save_pretrained` it into `directory`; returns the path."""
    directory = Path(directory)
    tiny_sd_pipeline(seed).save_pretrained(directory)
    return directory


def tiny_dit_pipeline(seed: int = 0):
    """A tiny `DiTPipeline` (class-conditional DiT on 8×8 latents, the tiny VAE, DDIM), progress bar off."""
    from diffusers import DDIMScheduler, DiTPipeline

    from tdq.testing.models import tiny_dit

    c = tiny_sd_components(seed)
    pipe = DiTPipeline(
        transformer=tiny_dit(num_embeds_ada_norm=1000),  # DiTPipeline uses class 1000 as the null class
        vae=c["vae"],
        scheduler=DDIMScheduler(),
        id2label={i: f"class{i}" for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
