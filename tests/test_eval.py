"""Evaluator: Inception features, FID/KID against clean-fid, LPIPS against the lpips package, drift, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _figures import png_size, record_figures
from torch import nn

from tdq import assets
from tdq.eval import (
    InceptionFeatures,
    build_lpips,
    kid_from_features,
    lpips_distance,
    paired_metrics,
    trajectory_drift,
    write_report,
)


@pytest.fixture(scope="session")
def asset_paths():
    return assets.fetch()


@pytest.fixture(scope="module")
def inception(asset_paths):
    return InceptionFeatures()


def _images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _perturb(x: torch.Tensor, sigma: float = 0.05, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


class TinyFeatures(nn.Module):
    """A cheap fixed feature extractor (images in [0, 1] -> [N, 12]) so FID arithmetic tests stay fast."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 12, 3, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.5)
            self.conv.bias.copy_(torch.randn(12, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return torch.tanh(self.conv(x)).mean(dim=(2, 3)) * 10


class _FromUint8Range(nn.Module):
    """clean-fid hands custom extractors float images in [0, 255]; map them to [0, 1]."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / 255.0)


def _write_folder(path, images_u8: torch.Tensor) -> None:
    from PIL import Image

    path.mkdir()
    for i, im in enumerate(images_u8):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path / f"{i:04d}.png")


def _clean_fid(tmp_path, fp_u8, q_u8, extractor) -> float:
    from cleanfid import fid

    _write_folder(tmp_path / "fp", fp_u8)
    _write_folder(tmp_path / "q", q_u8)
    return float(
        fid.compute_fid(
            str(tmp_path / "fp"),
            str(tmp_path / "q"),
            mode="legacy_tensorflow",  # no resize inside clean-fid: the extractor sees the stored pixels
            custom_feat_extractor=_FromUint8Range(extractor),
            device=torch.device("cpu"),
            num_workers=0,
            batch_size=64,
            verbose=False,
        )
    )


# ----------------------------------------------------------------------------------------------------
# Inception


def test_inception_features_fixed_image(inception):
    gray = _images(1, size=28, channels=1)
    batch = torch.cat([gray.expand(-1, 3, -1, -1), gray.expand(-1, 3, -1, -1) * 0.5])
    feats = inception(batch)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 follows a ReLU
    assert not torch.allclose(feats[0], feats[1])
    # grayscale input is repeated to 3 channels; uint8 input is scaled to [0, 1]
    pre_gray = inception.preprocess(gray)
    pre_rgb = inception.preprocess(gray.expand(-1, 3, -1, -1))
    assert torch.equal(pre_gray, pre_rgb) and pre_rgb.shape == (1, 3, 299, 299)
    assert math.isclose(float(inception.preprocess(torch.zeros(1, 3, 8, 8)).min()), -1.0)
    assert math.isclose(
        float(inception.preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)).max()), 0.9921875
    )


def test_inception_plugs_into_torchmetrics(inception):
    from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=inception, normalize=True)  # no dummy forward: num_features is set
    assert fid.inception is inception and fid.real_features_sum.shape == (2048,)
    fid.update(_images(2, size=28, seed=7), real=True)
    assert int(fid.real_features_num_samples) == 2 and torch.isfinite(fid.real_features_sum).all()
    with pytest.warns(UserWarning):
        kid = KernelInceptionDistance(feature=inception, subset_size=2, normalize=True)
    assert kid.inception is inception


# ----------------------------------------------------------------------------------------------------
# FID / KID


def test_fid_matches_clean_fid(tmp_path):
    fp_u8 = (_images(40, size=16, seed=3) * 255).round().to(torch.uint8)
    q_u8 = (_perturb(fp_u8.float() / 255, sigma=0.1) * 255).round().to(torch.uint8)
    feature = TinyFeatures()
    ours = paired_metrics(fp_u8, q_u8, feature=feature, lpips_nets=(), per_image=False)["fid"]
    ref = _clean_fid(tmp_path, fp_u8, q_u8, feature)
    assert ours > 0.1
    assert ours == pytest.approx(ref, rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_fid_matches_clean_fid_inception(tmp_path, inception):
    fp_u8 = (_images(6, size=32, seed=3) * 255).round().to(torch.uint8)
    q_u8 = (_perturb(fp_u8.float() / 255, sigma=0.1) * 255).round().to(torch.uint8)
    ours = paired_metrics(fp_u8, q_u8, feature=inception, lpips_nets=(), per_image=False)["fid"]
    ref = _clean_fid(tmp_path, fp_u8, q_u8, inception)
    assert ours == pytest.approx(ref, rel=1e-3, abs=1e-3)


def test_kid_subset_adapts_to_small_n():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g) + 1
    out = kid_from_features(real, fake, subsets=10, subset_size=1000)
    assert out["kid_subset_size"] == 5 and out["kid_mean"] > 0 and math.isfinite(out["kid_std"])
    assert kid_from_features(real, fake) == kid_from_features(real, fake)  # seeded subsets
    assert kid_from_features(real[:1], fake)["kid_mean"] is None


# ----------------------------------------------------------------------------------------------------
# LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_package(net, asset_paths, monkeypatch):
    """Our model equals lpips' own construction path (pretrained trunk + its v0.1 heads) given the same trunk."""
    import lpips
    import torchvision

    name, ctor = {"alex": ("lpips_alex", "alexnet"), "vgg": ("lpips_vgg", "vgg16")}[net]
    backbone = assets.load_state_dict(asset_paths[name])
    original = getattr(torchvision.models, ctor)

    def pretrained_tv(*args, **kwargs):
        with torch.device("meta"):  # skip the classifier's random init; the features get real tensors
            model = original()
        model.features.load_state_dict(backbone, strict=True, assign=True)
        return model

    monkeypatch.setattr(lpips.pretrained_networks.tv, ctor, pretrained_tv)
    reference = lpips.LPIPS(pretrained=True, net=net, version="0.1", verbose=False).eval()

    ours = build_lpips(net)
    x, y = _images(3, size=64, seed=5), _perturb(_images(3, size=64, seed=5), sigma=0.1)
    with torch.no_grad():
        expected = reference(x, y, normalize=True).reshape(-1)
    got = lpips_distance(x, y, ours)
    assert got.shape == (3,) and (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lpips_small_images_are_upsampled(asset_paths):
    model = build_lpips("alex")
    x = _images(2, size=28, channels=1)
    d = lpips_distance(x, _perturb(x), model)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(lpips_distance(x, x, model), torch.zeros(2))


# ----------------------------------------------------------------------------------------------------
# paired metrics


def test_identical_sets(asset_paths):
    x = _images(6, size=32)
    out = paired_metrics(x, x.clone(), feature=TinyFeatures(), lpips_nets=("alex",))
    assert out["num_images"] == 6
    assert out["psnr"] == float("inf") and all(v == float("inf") for v in out["psnr_per_image"])
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert out["lpips_alex"] == 0.0 and out["lpips_alex_per_image"] == [0.0] * 6
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["kid_subset_size"] == 6


def test_paired_metrics_detect_degradation(asset_paths):
    x = _images(6, size=32)
    small, large = (
        paired_metrics(x, _perturb(x, s), feature=TinyFeatures(), lpips_nets=("alex",)) for s in (0.02, 0.2)
    )
    assert small["psnr"] > large["psnr"] and small["ssim"] > large["ssim"]
    assert small["lpips_alex"] < large["lpips_alex"] and small["fid"] < large["fid"]
    with pytest.raises(ValueError):
        paired_metrics(x, x[:3], feature=None, lpips_nets=())


# ----------------------------------------------------------------------------------------------------
# drift


def test_trajectory_drift():
    g = torch.Generator().manual_seed(0)
    fp = [torch.randn(2, 1, 4, 4, generator=g) for _ in range(5)]
    assert trajectory_drift(fp, [t.clone() for t in fp]) == [0.0] * 5
    scales = [0.0, 0.01, 0.1, -0.5, 2.0]
    drift = trajectory_drift(fp, [t * (1 + s) for t, s in zip(fp, scales, strict=True)])
    np.testing.assert_allclose(drift, [abs(s) for s in scales], rtol=1e-6, atol=1e-12)
    per_sample = trajectory_drift(fp, [t * 1.25 for t in fp], per_sample=True)
    np.testing.assert_allclose(per_sample, [0.25] * 5, rtol=1e-6)
    zero = [torch.zeros(3)]
    assert trajectory_drift(zero, zero) == [0.0]
    assert trajectory_drift(zero, [torch.ones(3)]) == [float("inf")]
    with pytest.raises(ValueError):
        trajectory_drift(fp, fp[:-1])


# ----------------------------------------------------------------------------------------------------
# report


def test_write_report(tmp_path):
    x = _images(4, size=16, channels=1)
    report = {
        "num_images": 4,
        "image_shape": [1, 16, 16],
        "fid": 12.5,
        "kid_mean": float("nan"),
        "psnr": float("inf"),
        "psnr_per_image": [float("inf")] * 4,
        "lpips_alex": 0.1,
        "lpips_alex_per_image": [0.05, 0.1, 0.12, 0.13],
        "bits": torch.tensor(4),
        "note": np.float32(0.5),
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "schedule.png").write_bytes(b"png")  # a figure already in the run dir
    with record_figures() as figs:
        written = write_report(
            tmp_path / "run",
            report,
            x,
            _perturb(x),
            drift=[0.0, 0.01, 0.02],
            extra_figures={"schedule": tmp_path / "run" / "schedule.png", "noise": torch.rand(1, 8, 8)},
        )
    for key in ("json", "md", "grid", "drift", "lpips_hist", "schedule", "noise"):
        assert written[key].is_file(), key
    saved = {rec["path"].name: rec for rec in figs}
    drift, hist = saved["drift.png"], saved["lpips_hist.png"]
    assert png_size(written["drift"]) == drift["size_px"] == (600, 400)
    (ax,) = drift["axes"]
    assert ax["title"] == "Trajectory drift" and ax["xlabel"] == "sampler step" and "x_t^{q}" in ax["ylabel"]
    assert ax["lines"] == 1 and ax["ydata"] == [0.0, 0.01, 0.02]
    assert png_size(written["lpips_hist"]) == hist["size_px"]
    (ax,) = hist["axes"]
    assert ax["title"] == "Per-image LPIPS" and ax["xlabel"].startswith("LPIPS") and ax["ylabel"] == "images"
    assert ax["patches"] > 0  # histogram bars
    assert png_size(written["noise"]) == (8, 8)

    def reject(constant):
        raise ValueError(f"non-JSON constant {constant}")

    data = json.loads(written["json"].read_text(), parse_constant=reject)
    assert data["psnr"] == "inf" and data["psnr_per_image"] == ["inf"] * 4
    assert data["kid_mean"] is None and data["bits"] == 4 and data["drift"] == [0.0, 0.01, 0.02]
    md = written["md"].read_text()
    assert "| metric | value | samples |" in md and "| FID (quantized vs FP) | 12.5 | 4 vs 4 |" in md
    assert "grid.png" in md and "lpips_hist.png" in md and "schedule.png" in md
    from PIL import Image

    assert Image.open(written["grid"]).size == (4 * 66 + 2, 2 * 66 + 2)  # 2 rows x 4 of 16 px x4, padding 2
