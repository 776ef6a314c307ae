"""Plots of the seed-survey analyses (`tdq.eval.analysis`): PNG files with titles and axis labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_ablation", "plot_prediction_scatter", "plot_propagation"]


def _figure(figsize=(5.5, 3.8)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=figsize)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(
    result: dict[str, Any], path: str | os.PathLike, *, top: int = 12, title: str | None = None
) -> Path:
    r"""
    Ablation curves `P_l(b)` (log scale), one line per layer, for the `top` layers with the largest error at the
    lowest bit-width.

    Args:
        result (`dict`): from [`~tdq.eval.analysis.layer_ablation`].
        path (`str` or `os.PathLike`): PNG to write.
        top (`int`, *optional*, defaults to `12`): layers shown.
        title (`str`, *optional*): figure title.

    Returns:
        `Path` of the PNG.
    """
    mse = np.asarray(result["mse"], dtype=np.float64)
    order = np.argsort(-mse[:, 0])[:top]
    plt, fig, ax = _figure((6.5, 4.2))
    for i in order:
        ax.semilogy(result["bits"], np.maximum(mse[i], 1e-16), "o-", lw=1, ms=3, label=result["layers"][i])
    ax.set_xlabel("bits of the one quantized layer (weight and input activation)")
    ax.set_ylabel("P_l(b): MSE of x_0 to FP")
    ax.set_title(title or "Per-layer ablation curves P_l(b)")
    ax.legend(fontsize=5, ncol=2)
    return _save(plt, fig, path)


def plot_propagation(result: dict[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    r"""
    Per-step local error `‖e_t‖`, its propagated effect `‖J_t e_t‖` on x_0, and the accumulated `‖Σ J_t e_t‖`
    against the measured drift (horizontal lines).

    Args:
        result (`dict`): from [`~tdq.eval.analysis.step_error_propagation`].
        path (`str` or `os.PathLike`): PNG to write.
        title (`str`, *optional*): figure title.

    Returns:
        `Path` of the PNG.
    """
    plt, fig, ax = _figure()
    steps = result["steps"]
    ax.plot(steps, result["local_error"], "o-", label="local error ‖e_t‖")
    ax.plot(steps, result["propagated"], "s-", label="propagated ‖J_t e_t‖")
    ax.axhline(result["accumulated"], color="C2", ls="--", label=f"‖Σ J_t e_t‖ = {result['accumulated']:.3g}")
    ax.axhline(
        result["measured_drift"], color="C3", ls=":", label=f"measured drift = {result['measured_drift']:.3g}"
    )
    ax.set_xlabel("sampler step (0 = noisiest)")
    ax.set_ylabel("norm relative to ‖x_0(FP)‖")
    ax.set_title(title or "Local error and its propagation to x_0")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_prediction_scatter(
    predicted: Sequence[float],
    measured: Sequence[float],
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    xlabel: str = "predicted",
    ylabel: str = "measured",
    title: str | None = None,
) -> Path:
    r"""
    Log-log scatter of a prediction against a measurement, titled with Spearman's ρ.

    Args:
        predicted (`Sequence[float]`): x values (non-positive values are drawn at the smallest positive one).
        measured (`Sequence[float]`): y values.
        path (`str` or `os.PathLike`): PNG to write.
        labels (`Sequence[str]`, *optional*): point annotations.
        xlabel (`str`, *optional*): x-axis label.
        ylabel (`str`, *optional*): y-axis label.
        title (`str`, *optional*): title prefix.

    Returns:
        `Path` of the PNG.
    """
    from tdq.eval.analysis import rank_correlation

    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    corr = rank_correlation(x, y)
    floor = lambda v: np.maximum(v, v[v > 0].min() if (v > 0).any() else 1e-16)  # noqa: E731
    plt, fig, ax = _figure()
    ax.loglog(floor(x), floor(y), "o", ms=4)
    if labels is not None:
        for xi, yi, lab in zip(floor(x), floor(y), labels, strict=True):
            ax.annotate(str(lab), (xi, yi), fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title + ': ' if title else ''}Spearman ρ = {corr['spearman']:.2f} (n = {corr['n']})")
    return _save(plt, fig, path)
