"""Evaluation of quantized diffusion samplers against their full-precision reference.

Metrics (FID/KID, LPIPS, PSNR/SSIM) come from torchmetrics and the ``lpips`` package; this package supplies
the offline feature extractors and weights (:mod:`tdq.assets`), trajectory drift and the run report.
"""

from tdq.eval.drift import trajectory_drift
from tdq.eval.features import TF_INPUT_RANGE, InceptionFeatures
from tdq.eval.metrics import (
    build_lpips,
    extract_features,
    fid_from_features,
    kid_from_features,
    lpips_distance,
    paired_metrics,
    psnr_per_image,
    ssim_per_image,
)
from tdq.eval.report import json_safe, write_report

__all__ = [
    "InceptionFeatures",
    "TF_INPUT_RANGE",
    "build_lpips",
    "extract_features",
    "fid_from_features",
    "json_safe",
    "kid_from_features",
    "lpips_distance",
    "paired_metrics",
    "psnr_per_image",
    "ssim_per_image",
    "trajectory_drift",
    "write_report",
]
