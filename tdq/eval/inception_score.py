"""Inception Score from a classifier's logits: `exp(E_x KL(p(y|x) || p(y)))`, averaged over splits.

tdq computes it with the MNIST judge classifier (`tdq.zoo.judge`), not with ImageNet Inception-v3: the offline
Inception weights tdq bundles are a feature extractor without the 1008-way classifier head, so the ImageNet IS of
the literature cannot be computed here. A judge-IS ranges from 1 (every image read as the same digit, or no image
confidently a digit) to the number of classes (10: every image a confident digit, all digits equally often); it
compares runs of this project, not numbers from papers.
"""

from __future__ import annotations

import math

import torch

__all__ = ["inception_score"]


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    r"""
    Inception Score of a set of images from their class logits.

    `IS = exp(mean_x KL(p(y|x) || p(y)))` with `p(y)` the mean of `p(y|x)` over the split, computed on `splits`
    contiguous, equal parts of the set (the usual protocol uses 10 splits of 5000 images); the mean and standard
    deviation (population, as torchmetrics and the original code report) over the splits are returned.

    Args:
        logits (`torch.Tensor` of shape `[N, C]`): unnormalised class scores (softmax is applied here).
        splits (`int`, *optional*, defaults to `1`): number of parts; each must hold at least one image.

    Returns:
        `tuple[float, float]`: mean and standard deviation of the per-split scores (std 0 for one split).

    Raises:
        `ValueError`: logits not of shape `[N, C]`, non-finite, or fewer images than splits.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [N, C], got {list(logits.shape)}")
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"splits={splits!r} must be a positive integer")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"inception_score needs at least splits={splits} images, got {n}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or inf; the Inception Score is undefined")
    logp = logits.double().log_softmax(-1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        p = part.exp()
        log_marginal = p.mean(0).clamp_min(1e-300).log()
        kl = (p * (part - log_marginal[None, :])).sum(-1)
        scores.append(math.exp(float(kl.mean())))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(scores) > 1 else 0.0
