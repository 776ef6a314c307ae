"""Tiny models for tests and examples, shared by tdq's own tests and users' tests (no hub access).

Every factory returns a model in eval mode with fixed random weights, plus `denoiser_inputs(model, x, t)` that
builds the keyword arguments of one denoiser call with the right conditioning for its architecture.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_unet2d(**overrides) -> nn.Module:
    """A 2-level pixel `UNet2DModel` (1 channel, 16×16) with self-attention."""
    from diffusers import UNet2DModel

    cfg = dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return UNet2DModel(**cfg).eval()


def tiny_unet2d_condition(**overrides) -> nn.Module:
    """A tiny `UNet2DConditionModel` with cross-attention (4 latent channels, 8×8)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


def tiny_dit(**overrides) -> nn.Module:
    """A tiny class-conditional `DiTTransformer2DModel` (4 channels, 8×8, patch 2)."""
    from diffusers import DiTTransformer2DModel

    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return DiTTransformer2DModel(**cfg).eval()


def tiny_pixart(**overrides) -> nn.Module:
    """A tiny `PixArtTransformer2DModel` with cross-attention to 8-d text states."""
    from diffusers import PixArtTransformer2DModel

    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=8,
        norm_num_groups=4,
        use_additional_conditions=False,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return PixArtTransformer2DModel(**cfg).eval()


def tiny_sd3(**overrides) -> nn.Module:
    """A tiny `SD3Transformer2DModel` (MMDiT)."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return SD3Transformer2DModel(**cfg).eval()


def tiny_flux(**overrides) -> nn.Module:
    """A tiny `FluxTransformer2DModel` (one double and one single stream block)."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return FluxTransformer2DModel(**cfg).eval()


class ToySigmaDenoiser(nn.Module):
    r"""
    A plain torch denoiser `f(x, sigma)` in EDM style (no diffusers base class).

    Args:
        channels (`int`, *optional*, defaults to `1`): image channels.
        width (`int`, *optional*, defaults to `16`): hidden channels.
    """

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(1, width)
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)
        self.eval()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        c_in = 1 / (1 + sigma**2).sqrt()
        h = self.conv1(x * c_in.view(-1, 1, 1, 1))
        h = torch.nn.functional.silu(h + self.embed(sigma.log().view(-1, 1) / 4)[:, :, None, None])
        return self.conv2(h)


class GrowingActivationDenoiser(nn.Module):
    r"""
    Toy denoiser whose hidden activation range grows with the timestep: `h = (1 + t / 100) * x` before a linear
    layer. A static scale must cover the largest range; per-bucket scales follow it.

    Args:
        dim (`int`, *optional*, defaults to `16`): feature size.
    """

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(dim, dim)
        self.eval()

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return self.proj(x * (1 + t / 100))


def denoiser_inputs(
    model: nn.Module, batch: int = 2, t=500.0, generator: torch.Generator | None = None
) -> dict:
    """
    Keyword arguments for one call of a model built by this module, at timestep `t` (model's native units).

    Args:
        model (`nn.Module`): a model from this module's factories.
        batch (`int`, *optional*, defaults to `2`): batch size.
        t (`float` or `torch.Tensor`, *optional*, defaults to `500.0`): the timestep argument as passed.
        generator (`torch.Generator`, *optional*): for the random inputs.
    """
    g = generator or torch.Generator().manual_seed(0)
    name = type(model).__name__
    bases = {c.__name__ for c in type(model).__mro__}  # subclasses of the diffusers models take their inputs
    if "UNet2DModel" in bases:
        c, s = model.config.in_channels, model.config.sample_size
        return dict(sample=torch.randn(batch, c, s, s, generator=g), timestep=t)
    if "UNet2DConditionModel" in bases:
        c, s = model.config.in_channels, model.config.sample_size
        return dict(
            sample=torch.randn(batch, c, s, s, generator=g),
            timestep=t,
            encoder_hidden_states=torch.randn(batch, 5, model.config.cross_attention_dim, generator=g),
        )
    if "DiTTransformer2DModel" in bases:
        c, s = model.config.in_channels, model.config.sample_size
        return dict(
            hidden_states=torch.randn(batch, c, s, s, generator=g),
            timestep=torch.as_tensor(t).expand(batch)
            if not isinstance(t, float)
            else torch.full((batch,), t),
            class_labels=torch.arange(batch) % model.config.num_embeds_ada_norm,
        )
    if "PixArtTransformer2DModel" in bases:
        c, s = model.config.in_channels, model.config.sample_size
        return dict(
            hidden_states=torch.randn(batch, c, s, s, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, model.config.caption_channels, generator=g),
            timestep=torch.as_tensor(t).expand(batch)
            if not isinstance(t, float)
            else torch.full((batch,), t),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if "SD3Transformer2DModel" in bases:
        c, s = model.config.in_channels, model.config.sample_size
        return dict(
            hidden_states=torch.randn(batch, c, s, s, generator=g),
            encoder_hidden_states=torch.randn(batch, 5, model.config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g),
            timestep=torch.as_tensor(t).expand(batch)
            if not isinstance(t, float)
            else torch.full((batch,), t),
        )
    if "FluxTransformer2DModel" in bases:
        n_img, n_txt = 16, 5
        return dict(
            hidden_states=torch.randn(batch, n_img, model.config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(batch, n_txt, model.config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g),
            timestep=torch.as_tensor(t).expand(batch)
            if not isinstance(t, float)
            else torch.full((batch,), t),
            img_ids=torch.zeros(n_img, 3),
            txt_ids=torch.zeros(n_txt, 3),
        )
    if isinstance(model, ToySigmaDenoiser):
        return dict(x=torch.randn(batch, 1, 8, 8, generator=g), sigma=t)
    if isinstance(model, GrowingActivationDenoiser):
        return dict(x=torch.randn(batch, model.proj.in_features, generator=g), timestep=t)
    raise TypeError(f"no input recipe for {name}")


def output_tensor(out) -> torch.Tensor:
    """The prediction tensor of a denoiser output (`.sample`, first tuple element, or the tensor itself)."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple):
        return out[0]
    return out
