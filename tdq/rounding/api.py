"""The entry points of `tdq.rounding`: round a quantized model's weights (and calibrate) by its `weight_rounding`.

```python
tdq.quantize_(unet, TDQConfig(weight=QuantSpec(bits=4, granularity="per_channel"),
                              weight_rounding=WeightRounding(method="gptq")))
run = lambda: sampler(calib_seeds)           # the real sampler over `unet`
report = tdq.rounding.calibrate_with_rounding(unet, run)   # FP stats -> GPTQ -> activation calibration
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from tdq.api import calibrate, get_quantization, iter_quant_layers
from tdq.config import WeightRounding
from tdq.rounding.adaround import recalibrate_, reconstruct_
from tdq.rounding.brecq import brecq_reconstruct_
from tdq.rounding.calib_stats import LayerStats, collect_layer_stats, smoothed_stats, supports_stats
from tdq.rounding.clipping import search_clipping_
from tdq.rounding.corrections import fit_bias_correction_, fit_output_correction
from tdq.rounding.gptq import gptq_layer_

logger = logging.getLogger(__name__)


def apply_weight_rounding(
    model: nn.Module,
    run: Callable[[], object] | None = None,
    spec: WeightRounding | None = None,
    *,
    stats: dict[str, LayerStats] | None = None,
) -> dict[str, Any]:
    """
    Round every quantized layer's weight by `spec` (clipping search, then GPTQ or round-to-nearest), in place.

    Call after `tdq.quantize_` (and after a precision schedule changed bit-widths), before activation
    calibration: input statistics come from the model as it is now, run in floating point, so calling it on a
    fresh quantized model gives FP-model statistics. GPTQ leaves each weight on its quantizer's grid.

    Args:
        model (`nn.Module`): a model quantized by `tdq.quantize_`.
        run (`Callable[[], object]`, *optional*): runs the real sampler over `model` (calibration seeds); needed
            unless `stats` is given or the spec needs no statistics.
        spec (`WeightRounding`, *optional*): defaults to the model config's `weight_rounding`.
        stats (`dict[str, LayerStats]`, *optional*): precomputed input statistics (`collect_layer_stats`).

    Returns:
        `dict`: `method`, `clip`, `seconds`, and per layer (`layers`) the rounding that ran and its relative
        output error on the calibration inputs; with `spec.corrections`, also `bias_correction_max_abs` (per
        layer, when `"bias"` is asked) and `_fp_weights` (the weights before rounding, for the PTQD fit); with
        `method="adaround"` or `"brecq"`, `_fp_weights` and `_stats` (for `finish_adaround_` / `finish_brecq_`).
    """
    state = get_quantization(model)
    spec = spec or state.config.weight_rounding
    spec.validate("weight_rounding")
    t0 = time.perf_counter()
    clip = spec.clip
    if spec.method == "mse" and clip == "observer":
        clip = "output_mse"
    # AdaRound/BRECQ start from round-to-nearest or GPTQ here; they learn the rounding after calibration
    learned = spec.method in ("adaround", "brecq")
    method = spec.adaround_init if learned else spec.method
    need = method == "gptq" or clip == "output_mse" or "bias" in spec.corrections
    if need and stats is None:
        if run is None:
            raise ValueError(
                f"weight_rounding.method={spec.method!r} (clip={clip!r}) needs calibration inputs: pass run="
            )
        stats = collect_layer_stats(model, run)
    t_stats = time.perf_counter() - t0
    fp_weights = (
        {n: m.weight.detach().clone() for n, m in iter_quant_layers(model)}
        if spec.corrections or learned
        else None
    )
    layers: dict[str, Any] = {}
    mods = dict(iter_quant_layers(model))
    for name, m in mods.items():
        entry: dict[str, Any] = {"weight_bits": int(m.weight_quantizer.bits)}
        st = (stats or {}).get(name)
        if st is not None:  # a layer smoothed by the outlier handling is rounded in its smoothed coordinates
            st = smoothed_stats(st, m)
        if not m.weight_quantizer.spec.enabled:
            layers[name] = {"method": "float (weights not quantized)"}
            continue
        if clip != "observer":
            if clip == "output_mse" and st is None:
                entry["clip"] = "observer (no input statistics)"
            else:
                r = search_clipping_(
                    m,
                    None if st is None else st.hessian,
                    objective="weight_mse" if clip == "weight_mse" else clip,
                )
                entry["clip"] = clip
                entry["clip_mean_ratio"] = r["mean_ratio"]
        else:
            entry["clip"] = m.weight_quantizer.spec.observer
        if method == "gptq":
            if st is None:
                entry["method"] = (
                    "nearest (no input statistics)" if supports_stats(m) else "nearest (unsupported)"
                )
            else:
                entry.update(
                    gptq_layer_(
                        m, st.hessian, damp=spec.damp, act_order=spec.act_order, block_size=spec.block_size
                    )
                )
        else:
            entry["method"] = "nearest"
        layers[name] = entry
    counts: dict[str, int] = {}
    for e in layers.values():
        counts[e["method"]] = counts.get(e["method"], 0) + 1
    extra: dict[str, Any] = {}
    if "bias" in spec.corrections:
        sstats = {n: smoothed_stats(st, mods[n]) for n, st in (stats or {}).items() if n in mods}
        extra["bias_correction_max_abs"] = fit_bias_correction_(model, sstats, fp_weights)
    if fp_weights is not None:
        extra["_fp_weights"] = fp_weights
    if learned:
        extra["_stats"] = stats
    return {
        **extra,
        "method": spec.method,
        "clip": clip,
        "act_order": spec.act_order,
        "damp": spec.damp,
        "seconds_statistics": round(t_stats, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "methods_count": counts,
        "layers": layers,
    }


def _refit_bias(model, spec: WeightRounding, fp_weights: dict, stats, rep: dict[str, Any]) -> dict[str, Any]:
    """Refit the bias correction on the relearned weights when `"bias"` is asked (FP-model `stats`, smoothed)."""
    if "bias" in spec.corrections and stats is not None:
        mods = dict(iter_quant_layers(model))
        sstats = {n: smoothed_stats(st, mods[n]) for n, st in stats.items() if n in mods}
        rep["bias_correction_max_abs"] = fit_bias_correction_(model, sstats, fp_weights)
    return rep


def finish_adaround_(
    model: nn.Module,
    run: Callable[[], object],
    spec: WeightRounding,
    fp_weights: dict,
    stats: dict[str, LayerStats] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """
    The AdaRound step of `method="adaround"` on a model rounded by `apply_weight_rounding` and calibrated:
    `tdq.rounding.adaround.reconstruct_` (learned rounding, activation recalibration), then the bias correction
    is refitted on the new weights when `"bias"` is asked (FP-model `stats`).

    Returns:
        `dict`: the `reconstruct_` report (with `filled_buckets` of the recalibration).
    """
    rep = reconstruct_(
        model, run, fp_weights, iters=spec.adaround_iters, reg_weight=spec.adaround_reg, seed=seed
    )
    return _refit_bias(model, spec, fp_weights, stats, rep)


def finish_brecq_(
    model: nn.Module,
    run: Callable[[], object],
    spec: WeightRounding,
    fp_weights: dict,
    stats: dict[str, LayerStats] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """
    The BRECQ step of `method="brecq"` on a model rounded by `apply_weight_rounding` and calibrated:
    `tdq.rounding.brecq.brecq_reconstruct_` (block reconstruction), activation recalibration (`recalibrate_`), then
    the bias correction is refitted on the new weights when `"bias"` is asked (FP-model `stats`).

    Returns:
        `dict`: the `brecq_reconstruct_` report, `seconds_recalibration` and `filled_buckets`.
    """
    rep = brecq_reconstruct_(
        model, run, fp_weights, iters=spec.brecq_iters, reg_weight=spec.brecq_reg, lr=spec.brecq_lr,
        batch=spec.brecq_batch, samples_per_call=spec.brecq_samples_per_call, seed=seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    rep["filled_buckets"] = recalibrate_(model, run, seed=seed)
    rep["seconds_recalibration"] = round(time.perf_counter() - t0, 3)
    return _refit_bias(model, spec, fp_weights, stats, rep)


def calibrate_with_rounding(
    model: nn.Module,
    run: Callable[[], object],
    spec: WeightRounding | None = None,
    seed: int = 0,
    *,
    stats: dict[str, LayerStats] | None = None,
) -> dict[str, Any]:
    """
    Weight rounding by `spec` (see `apply_weight_rounding`), then activation calibration with the same `run`.

    With `spec.smooth_first` (and a rounding beyond nearest), the activations are calibrated first on the unrounded
    weights so the outlier handling can choose its SmoothQuant smoothing, the weights are then rounded in the
    smoothed coordinates (input statistics transformed accordingly), and the activations are calibrated again with
    that smoothing kept. Otherwise the weights are rounded first and the outlier handling does not smooth (it would
    re-round the weights to nearest).

    Args:
        model (`nn.Module`): a model quantized by `tdq.quantize_` (activations not yet calibrated).
        run (`Callable[[], object]`): runs the real sampler over `model` on the calibration seeds.
        spec (`WeightRounding`, *optional*): defaults to the model config's `weight_rounding`.
        seed (`int`, *optional*, defaults to `0`): observer seed.
        stats (`dict[str, LayerStats]`, *optional*): precomputed FP-model input statistics (`collect_layer_stats`).

    Corrections in `spec.corrections`: `"bias"` is fitted with the rounding (FP-model statistics), `"ptqd"` after
    activation calibration on a further run of the quantized sampler (see `tdq.rounding.corrections`).
    `method="adaround"` runs `finish_adaround_` after the calibration, `method="brecq"` `finish_brecq_`.

    Returns:
        `dict`: the rounding report, plus `filled_buckets` from calibration, `adaround`, `brecq` and `ptqd` (if run),
        `seconds_calibration` (activation calibration runs) and `seconds_total`.
    """
    t0 = time.perf_counter()
    state = get_quantization(model)
    spec = spec or state.config.weight_rounding
    smooth_first = spec.smooth_first and spec.active
    t_cal = 0.0
    if smooth_first:
        t1 = time.perf_counter()
        calibrate(model, run, seed=seed)
        t_cal += time.perf_counter() - t1
    report = apply_weight_rounding(model, run, spec, stats=stats)
    fp_weights = report.pop("_fp_weights", None)
    stats = report.pop("_stats", None)
    t1 = time.perf_counter()
    report["filled_buckets"] = (recalibrate_ if smooth_first else calibrate)(model, run, seed=seed)
    t_cal += time.perf_counter() - t1
    if spec.method in ("adaround", "brecq"):
        finish = finish_adaround_ if spec.method == "adaround" else finish_brecq_
        report[spec.method] = finish(model, run, spec, fp_weights, stats, seed=seed)
        report["filled_buckets"] = report[spec.method].pop("filled_buckets")
        t_cal += report[spec.method]["seconds_recalibration"]
    if "ptqd" in spec.corrections:
        t1 = time.perf_counter()
        _, report["ptqd"] = fit_output_correction(model, run, fp_weights)
        report["ptqd"]["seconds"] = round(time.perf_counter() - t1, 3)
    report["smooth_first"] = smooth_first
    report["seconds_calibration"] = round(t_cal, 3)
    report["seconds_total"] = round(time.perf_counter() - t0, 3)
    return report
