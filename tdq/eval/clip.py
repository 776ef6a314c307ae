"""CLIPScore of generated images against their prompts, through torchmetrics' callable form.

No CLIP weights can be downloaded on the build machines, so the CLIP comes from a local directory (a
`transformers.CLIPModel` + `CLIPProcessor` saved with `save_pretrained`), e.g. the bundled in-domain tiny CLIP
`tdq/zoo/checkpoints/mnist-clip`, or is passed in as `(model, processor)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


class _TensorFeatures(torch.nn.Module):
    # transformers 5 returns output objects from `get_*_features`; torchmetrics 1.9 expects tensors.
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def load_clip(path: str | os.PathLike):
    """
    Load a local CLIP directory.

    Args:
        path (`str` or `os.PathLike`): directory with a `CLIPModel` and a `CLIPProcessor` (tokenizer + image
            processor).

    Returns:
        `(CLIPModel, CLIPProcessor)` in eval mode.
    """
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model in {path} (config.json missing); pass a local CLIP directory")
    return CLIPModel.from_pretrained(str(path)).eval(), CLIPProcessor.from_pretrained(str(path))


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    clip,
    *,
    batch_size: int = 64,
) -> float:
    """
    Mean CLIPScore (100 × cosine similarity, clipped at 0) of images and prompts, computed by
    `torchmetrics.multimodal.CLIPScore`.

    Args:
        images (`torch.Tensor` of shape `[N, C, H, W]`): images in [0, 1]; grayscale is repeated to RGB.
        prompts (`Sequence[str]`): one prompt per image.
        clip (`str`, `os.PathLike` or `tuple`): a local CLIP directory, or `(CLIPModel, CLIPProcessor)`.
        batch_size (`int`, *optional*, defaults to `64`): images per update.

    Returns:
        `float`: the CLIPScore.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(prompts) != images.shape[0]:
        raise ValueError(f"clip_score: {images.shape[0]} images but {len(prompts)} prompts")
    model, processor = load_clip(clip) if isinstance(clip, str | os.PathLike) else clip
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x * 255).round().to(torch.uint8)  # the processor rescales by 1/255
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            metric.update(x[i : i + batch_size], list(prompts[i : i + batch_size]))
        return float(metric.compute())
