"""Architectures of the latent zoo models (MNIST VAE, tiny CLIP, ``mnist-t2i`` UNet, ``mnist-dit``), their training
configurations ([`STAGE_CONFIGS`]), the shared noise schedule and the loader of the exported CLIP."""

from __future__ import annotations

from pathlib import Path

import torch

from tdq.zoo import CHECKPOINT_ROOT
from tdq.zoo.captions import MAX_TEXT_LEN

__all__ = [
    "SCHEDULER_CONFIG",
    "STAGE_CONFIGS",
    "build_clip",
    "build_dit",
    "build_scheduler",
    "build_unet",
    "build_vae",
    "crop28",
    "load_mnist_clip",
]

STAGE_CONFIGS: dict[str, dict] = {
    "vae": {
        "vae": {
            "in_channels": 1,
            "out_channels": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": (16, 32, 64),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 32,
            "mid_block_add_attention": False,
        },
        "steps": 1000,
        "batch_size": 32,
        "lr": 2e-3,
        "min_lr_ratio": 0.05,
        "warmup": 50,
        "ema_decay": 0.995,
        "grad_clip": 1.0,
        "kl_weight": 5e-4,
        "seed": 0,
    },
    "clip": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_TEXT_LEN,
        },
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        "projection_dim": 64,
        "steps": 1200,
        "batch_size": 128,
        "lr": 2e-3,
        "min_lr_ratio": 0.05,
        "warmup": 50,
        "ema_decay": 0.99,
        "grad_clip": 1.0,
        "seed": 1,
    },
    "mnist-t2i": {
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "steps": 4000,
        "batch_size": 64,
        "lr": 1e-3,
        "min_lr_ratio": 0.05,
        "warmup": 100,
        "ema_decay": 0.999,
        "grad_clip": 1.0,
        "uncond_prob": 0.1,
        "seed": 2,
    },
    "mnist-dit": {
        "dit": {
            "num_attention_heads": 4,
            "attention_head_dim": 24,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 6,
            "sample_size": 8,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,  # DiTPipeline hard-codes class 1000 as the null (CFG) class
            "dropout": 0.0,
        },
        "steps": 4800,
        "batch_size": 128,
        "lr": 5e-4,
        "min_lr_ratio": 0.05,
        "warmup": 100,
        "ema_decay": 0.999,
        "grad_clip": 1.0,
        "uncond_prob": 0.1,
        "seed": 3,
    },
}

#: noise schedule shared by both latent denoisers (Stable Diffusion's, 1000 steps)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_vae():
    r"""
    Build the untrained MNIST [`~diffusers.AutoencoderKL`] (1x32x32 <-> 4x8x8).

    Returns:
        `diffusers.AutoencoderKL`: the autoencoder.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(**STAGE_CONFIGS["vae"]["vae"])


def build_clip(vocab_size: int):
    r"""
    Build the untrained tiny [`~transformers.CLIPModel`] (text: 2 layers x 64, vision: ViT 2 layers x 64 on 32x32).

    Args:
        vocab_size (`int`): tokenizer vocabulary size.

    Returns:
        `transformers.CLIPModel`: the model (eos token id 1, bos 0, pad 1).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    c = STAGE_CONFIGS["clip"]
    text = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **c["text"])
    vision = CLIPVisionConfig(**c["vision"])
    cfg = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=c["projection_dim"]
    )
    return CLIPModel(cfg)


def build_unet():
    r"""
    Build the untrained ``mnist-t2i`` [`~diffusers.UNet2DConditionModel`] (4x8x8 latents, 64-d cross-attention).

    Returns:
        `diffusers.UNet2DConditionModel`: the denoiser.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**STAGE_CONFIGS["mnist-t2i"]["unet"])


def build_dit():
    r"""
    Build the untrained ``mnist-dit`` [`~diffusers.DiTTransformer2DModel`] (4x8x8 latents, patch 2, 6 layers x 96).

    Returns:
        `diffusers.DiTTransformer2DModel`: the denoiser.
    """
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    model = DiTTransformer2DModel(**STAGE_CONFIGS["mnist-dit"]["dit"])
    # Every block's LabelEmbedding would otherwise drop labels independently (p=0.1, global RNG) in training
    # mode; label dropout for classifier-free guidance is done once per sample by the training loop instead.
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


def build_scheduler():
    r"""
    Build the exported sampler: [`~diffusers.DDIMScheduler`] with Stable Diffusion's 1000-step noise schedule.

    Returns:
        `diffusers.DDIMScheduler`: the scheduler.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def crop28(images: torch.Tensor) -> torch.Tensor:
    r"""
    Crop 32x32 pipeline outputs back to 28x28 MNIST digits.

    Args:
        images (`torch.Tensor`): ``[N, C, 32, 32]``.

    Returns:
        `torch.Tensor`: ``[N, C, 28, 28]``.
    """
    return images[..., 2:30, 2:30]


def load_mnist_clip(path: str | Path | None = None):
    r"""
    Load the tiny in-domain CLIP (``tdq/zoo/checkpoints/mnist-clip``) and its processor, offline.

    The returned model's ``get_image_features`` / ``get_text_features`` return plain projected tensors (as in
    transformers 4.x), so the pair works as torchmetrics' callable form:
    ``CLIPScore(model_name_or_path=tdq.zoo.latent.load_mnist_clip)``. Images are 32x32 (MNIST padded by 2 px),
    white digit on black, any RGB/uint8 input the ``CLIPImageProcessor`` accepts.

    Args:
        path (`str` or `pathlib.Path`, *optional*): checkpoint directory; defaults to the packaged one.

    Returns:
        `tuple[transformers.CLIPModel, transformers.CLIPProcessor]`: model (eval mode) and processor.
    """
    from transformers import CLIPModel, CLIPProcessor

    class _TensorFeaturesCLIP(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return _pooled(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _pooled(super().get_text_features(*args, **kwargs))

    d = Path(path) if path is not None else CHECKPOINT_ROOT / "mnist-clip"
    model = _TensorFeaturesCLIP.from_pretrained(d, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(d, local_files_only=True)


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def _pooled(out) -> torch.Tensor:
    """CLIP ``get_*_features`` return a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
