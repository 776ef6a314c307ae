"""Write an evaluation run directory: ``report.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tdq.utils.io import atomic_copy, atomic_write, json_safe

__all__ = ["json_safe", "write_report"]

_PER_IMAGE_SUFFIX = "_per_image"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if math.isnan(value):
            return "n/a"
        return f"{value:.6g}"
    return str(value)


_METRIC_ROWS = (
    # key, label, sample-count description
    ("fid", "FID (quantized vs FP)", "n"),
    ("kid_mean", "KID mean", "kid"),
    ("kid_std", "KID std", "kid"),
    ("psnr", "PSNR [dB] (mean per image)", "n"),
    ("ssim", "SSIM (mean per image)", "n"),
)


def _markdown(report: Mapping[str, Any], figures: Sequence[str]) -> str:
    n = report.get("num_images")
    lines = ["# TDQ evaluation report", ""]
    if n is not None:
        shape = report.get("image_shape")
        lines.append(f"Samples: {n} paired images" + (f" of shape {tuple(shape)}" if shape else "") + ".")
        lines.append("")
    lines += ["| metric | value | samples |", "|---|---|---|"]
    used = set()
    rows = list(_METRIC_ROWS)
    rows += [
        (k, f"LPIPS ({k[len('lpips_') :]}, mean per image)", "n") for k in sorted(report) if _is_lpips(k)
    ]
    for key, label, count in rows:
        if key not in report:
            continue
        used.add(key)
        if count == "kid":
            samples = f"{n} vs {n}, {report.get('kid_subsets')} subsets of {report.get('kid_subset_size')}"
        elif key == "fid":
            samples = f"{n} vs {n}"
        else:
            samples = str(n)
        lines.append(f"| {label} | {_fmt(report[key])} | {samples} |")
    others = [
        k
        for k, v in report.items()
        if k not in used
        and not k.endswith(_PER_IMAGE_SUFFIX)
        and k not in {"num_images", "image_shape"}
        and (v is None or isinstance(v, int | float | str | bool))
    ]
    if others:
        lines += ["", "| field | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(report[k])} |" for k in others]
    if "drift" in report and isinstance(report["drift"], list | tuple) and report["drift"]:
        d = [float(v) for v in report["drift"]]
        lines += [
            "",
            f"Trajectory drift over {len(d)} steps: first {_fmt(d[0])}, last {_fmt(d[-1])}, max {_fmt(max(d))}.",
        ]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _is_lpips(key: str) -> bool:
    return key.startswith("lpips_") and not key.endswith(_PER_IMAGE_SUFFIX) and key != "lpips_input_min_side"


def _new_figure(figsize=(6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas, independent of the global pyplot backend
    return fig


def _save_figure(fig, path: Path) -> None:
    """`fig.savefig` as PNG through a temporary file and a rename (a kill never leaves half an image)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _save_grid(path: Path, fp_images: torch.Tensor, q_images: torch.Tensor, max_images: int) -> None:
    from torchvision.utils import save_image

    k = min(max_images, fp_images.shape[0], q_images.shape[0])
    fp = fp_images[:k].detach().float().cpu()
    q = q_images[:k].detach().float().cpu()
    if fp_images.dtype == torch.uint8:
        fp = fp / 255.0
    if q_images.dtype == torch.uint8:
        q = q / 255.0
    if fp.shape[1] != q.shape[1]:
        fp, q = fp.expand(-1, 3, -1, -1), q.expand(-1, 3, -1, -1)
    factor = max(1, -(-64 // max(1, min(fp.shape[-2:]))))  # small images: nearest upscale to >= 64 px
    if factor > 1:
        fp = torch.nn.functional.interpolate(fp, scale_factor=factor, mode="nearest")
        q = torch.nn.functional.interpolate(q, scale_factor=factor, mode="nearest")
    grid = torch.cat([fp, q]).clamp(0, 1)
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png", nrow=k, padding=2, pad_value=1.0))


def _save_drift(path: Path, drift: Sequence[float] | Mapping[str, Sequence[float]]) -> None:
    curves = dict(drift) if isinstance(drift, Mapping) else {"quantized vs FP": drift}
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    positive = True
    for label, values in curves.items():
        vals = [float(v) for v in values]
        finite = [v for v in vals if math.isfinite(v)]
        positive = positive and bool(finite) and min(finite) > 0
        ax.plot(range(len(vals)), vals, marker="o", markersize=2, label=str(label))
    if positive:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sampler step")
    ax.set_ylabel(r"$\|x_t^{q} - x_t^{FP}\| / \|x_t^{FP}\|$")
    ax.set_title("Trajectory drift")
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def _save_lpips_hist(path: Path, per_image: Mapping[str, Sequence[float]]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, values in per_image.items():
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        ax.hist(vals, bins=min(30, max(5, len(vals) // 2)), alpha=0.6, label=label)
    ax.set_xlabel("LPIPS (quantized vs FP, per image)")
    ax.set_ylabel("images")
    ax.set_title("Per-image LPIPS")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def write_report(
    run_dir: str | os.PathLike,
    report: Mapping[str, Any],
    fp_images: torch.Tensor | None = None,
    q_images: torch.Tensor | None = None,
    drift: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    extra_figures: Mapping[str, Any] | None = None,
    *,
    max_grid_images: int = 16,
    markdown_sections: str = "",
) -> dict[str, Path]:
    """Write the evaluation artifacts of a run.

    Files: ``report.json`` (strict JSON: no NaN, ``inf`` as the string ``"inf"``), ``report.md`` (a metric
    table with sample counts), ``grid.png`` (FP row above quantized row, same seeds), ``drift.png`` (relative
    trajectory drift per step) and ``lpips_hist.png`` (when per-image LPIPS values are in ``report``).

    Args:
        run_dir (`str` or `os.PathLike`): output directory (created when missing).
        report (`Mapping[str, Any]`): metrics, e.g. from :func:`~tdq.eval.paired_metrics` plus any run fields.
        fp_images (`torch.Tensor` of shape `[N, C, H, W]`, *optional*, defaults to `None`): FP images in ``[0, 1]``.
        q_images (`torch.Tensor` of shape `[N, C, H, W]`, *optional*, defaults to `None`): quantized images.
        drift (`Sequence[float]` or `Mapping[str, Sequence[float]]`, *optional*, defaults to `None`):
            Per-step drift from :func:`~tdq.eval.trajectory_drift`, or several labelled curves. Stored in the
            JSON under ``"drift"`` unless ``report`` already has that key.
        extra_figures (`Mapping[str, Any]`, *optional*, defaults to `None`):
            More figures, written as ``<name>.png``: a matplotlib ``Figure``, an image tensor ``[C, H, W]`` /
            ``[N, C, H, W]`` in ``[0, 1]``, or the path of an existing PNG to copy.
        max_grid_images (`int`, *optional*, defaults to `16`):
            Images per row of ``grid.png``; images smaller than 64 px are upscaled (nearest) for legibility.
        markdown_sections (`str`, *optional*, defaults to `""`):
            More markdown, placed in ``report.md`` before its figures.

    Every file is written through a temporary file and a rename, ``report.json`` last, so a run killed while
    writing leaves no half-written file, and ``report.json`` exists only once everything else is written.

    Returns:
        `dict[str, pathlib.Path]`: the written files by short name (``"json"``, ``"md"``, ``"grid"``, ...).
    """
    out_dir = Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    data = dict(report)
    if drift is not None and "drift" not in data:
        data["drift"] = (
            {str(k): list(v) for k, v in drift.items()} if isinstance(drift, Mapping) else list(drift)
        )

    figures: list[str] = []
    if fp_images is not None and q_images is not None and fp_images.shape[0] and q_images.shape[0]:
        written["grid"] = out_dir / "grid.png"
        _save_grid(written["grid"], fp_images, q_images, max_grid_images)
        figures.append("grid.png")
    if drift is not None and len(drift):
        written["drift"] = out_dir / "drift.png"
        _save_drift(written["drift"], drift)
        figures.append("drift.png")
    per_image = {
        k[len("lpips_") : -len(_PER_IMAGE_SUFFIX)]: v
        for k, v in data.items()
        if k.startswith("lpips_") and k.endswith(_PER_IMAGE_SUFFIX) and v is not None and len(v)
    }
    if per_image:
        written["lpips_hist"] = out_dir / "lpips_hist.png"
        _save_lpips_hist(written["lpips_hist"], per_image)
        figures.append("lpips_hist.png")
    for name, fig in (extra_figures or {}).items():
        dst = out_dir / f"{name}.png"
        if hasattr(fig, "savefig"):
            _save_figure(fig, dst)
        elif isinstance(fig, torch.Tensor):
            from torchvision.utils import save_image

            img = fig.detach().float().cpu().clamp(0, 1)
            atomic_write(dst, lambda tmp, img=img: save_image(img, tmp, format="png"))
        elif isinstance(fig, str | os.PathLike):
            if Path(fig).resolve() != dst.resolve():
                atomic_copy(fig, dst, mode=None)
        else:
            raise TypeError(f"extra figure {name!r}: unsupported type {type(fig).__name__}")
        written[name] = dst
        figures.append(dst.name)

    # report.md, then report.json last, each through a temporary file and a rename: report.json is the run's
    # completion marker (`tdq run` deletes an old one before it starts)
    md = _markdown(data, figures)
    if markdown_sections:
        head, sep, figs = md.partition("\n## Figures")
        md = head.rstrip("\n") + "\n\n" + markdown_sections + (sep + figs if sep else "")
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    written["md"] = out_dir / "report.md"
    atomic_write(written["md"], lambda tmp: Path(tmp).write_text(md))
    written["json"] = out_dir / "report.json"
    atomic_write(written["json"], lambda tmp: Path(tmp).write_text(text))
    return written
