"""Seed-survey analyses: per-layer ablation curves P_l(b), per-step local error and its propagation to x_0, the
Fisher / Hessian-trace predictions of P_l(b), and rank correlations between predictions and measurements.

Plots of these results are in `tdq.eval.analysis_plots`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tdq.mixed_precision.profile import SensitivityProfile
from tdq.quant.functional import fake_quantize, qrange
from tdq.sampling.noise import initial_noise, step_generators

__all__ = [
    "evaluate_schedules",
    "layer_ablation",
    "predicted_ablation",
    "quantize_layer",
    "rank_correlation",
    "step_error_propagation",
]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= int(bits) <= 16:
        raise ValueError(f"bits={bits!r} must be an integer in [2, 16]")
    return int(bits)


def _fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric round-to-nearest (the tdq default weight spec)."""
    rows = w.detach().reshape(w.shape[0], -1)
    qmin, qmax = qrange(bits, True)
    scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return fake_quantize(rows, scale, torch.zeros_like(scale), qmin, qmax).reshape(w.shape)


def _fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric round-to-nearest on the tensor's own min/max (dynamic range)."""
    lo = x.detach().amin().clamp_max(0)
    hi = x.detach().amax().clamp_min(0)
    qmin, qmax = qrange(bits, False)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-12)
    zp = (qmin - lo / scale).round()
    return fake_quantize(x, scale, zp, qmin, qmax)


@contextlib.contextmanager
def quantize_layer(
    module: nn.Module, bits: int, *, weights: bool = True, acts: bool = True
) -> Iterator[nn.Module]:
    r"""
    Within the block, fake-quantize one `nn.Linear` / `nn.Conv2d` at `bits`: its weight per output channel
    (symmetric, round to nearest) and its input activation per tensor (asymmetric, on the call's own min/max, so no
    calibration is needed). The weight is restored exactly afterwards.

    Args:
        module (`nn.Module`): an `nn.Linear` or `nn.Conv2d`.
        bits (`int`): bit-width in [2, 16].
        weights (`bool`, *optional*, defaults to `True`): quantize the weight.
        acts (`bool`, *optional*, defaults to `True`): quantize the input activation.

    Yields:
        The same `module`.
    """
    bits = _check_bits(bits)
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise TypeError(f"quantize_layer needs an nn.Linear or nn.Conv2d, got {type(module).__name__}")
    saved = module.weight.data.clone()
    handle = None
    try:
        if weights:
            module.weight.data.copy_(_fake_quant_weight(saved, bits))
        if acts:

            def pre(mod, args):
                return (_fake_quant_act(args[0], bits), *args[1:])

            handle = module.register_forward_pre_hook(pre)
        yield module
    finally:
        if handle is not None:
            handle.remove()
        module.weight.data.copy_(saved)


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"layer {name!r} is not a submodule of {type(model).__name__}") from None


def _final(sampler: Any, seeds: Sequence[int]) -> torch.Tensor:
    """Final samples in model space (latents for latent samplers), float64."""
    x = _run(sampler, seeds)[0]
    return x.double()


def layer_ablation(
    model: nn.Module,
    sampler: Any,
    layers: Sequence[str],
    bits: Sequence[int],
    seeds: Sequence[int],
) -> dict[str, Any]:
    r"""
    Per-layer ablation curves `P_l(b)`: quantize one layer at `b` bits (weight and input activation, see
    [`quantize_layer`]), everything else float, sample `seeds` and measure the mean squared error of the final
    samples (model space: pixels in [-1, 1] or latents) to the FP samples of the same seeds.

    Args:
        model (`nn.Module`): the denoiser holding `layers` (the one `sampler` calls, or a module inside it).
        sampler (`DiffusionSampler`): the sampler to run.
        layers (`Sequence[str]`): names of `nn.Linear` / `nn.Conv2d` submodules of `model`.
        bits (`Sequence[int]`): bit-widths.
        seeds (`Sequence[int]`): sample seeds (each seed's error is kept).

    Returns:
        `dict` with `layers`, `bits`, `seeds`, `mse` (`[L][B]` mean over seeds), `mse_per_seed` (`[L][B][S]`) and
        `fp_norm` (mean squared value of the FP samples, for scale).
    """
    layers, bits, seeds = list(layers), [_check_bits(b) for b in bits], [int(s) for s in seeds]
    if not layers or not bits or not seeds:
        raise ValueError("layer_ablation needs at least one layer, one bit-width and one seed")
    modules = [_layer(model, n) for n in layers]
    with torch.no_grad():
        fp = _final(sampler, seeds)
        per = np.zeros((len(layers), len(bits), len(seeds)))
        for i, m in enumerate(modules):
            for j, b in enumerate(bits):
                with quantize_layer(m, b):
                    q = _final(sampler, seeds)
                per[i, j] = (q - fp).pow(2).flatten(1).mean(1).numpy()
    return {
        "layers": layers,
        "bits": bits,
        "seeds": seeds,
        "mse": per.mean(axis=2).tolist(),
        "mse_per_seed": per.tolist(),
        "fp_norm": float(fp.pow(2).mean()),
    }


def predicted_ablation(profile: SensitivityProfile, bits: Sequence[int]) -> dict[str, Any]:
    r"""
    The `P_l(b)` a sensitivity profile predicts under the planner's noise model: uniform rounding noise of variance
    `(range / (2^b − 1))² / 12` on the layer's input activation (per bucket) and weight, weighted by the profile's
    sensitivities (Fisher traces, or Hessian traces for a Hutchinson profile) and summed over buckets.

    Args:
        profile (`SensitivityProfile`): a Fisher or Hutchinson profile.
        bits (`Sequence[int]`): bit-widths.

    Returns:
        `dict` with `layers`, `bits` and `predicted` (`[L][B]`).
    """
    bits = [_check_bits(b) for b in bits]
    out = np.zeros((len(profile.layers), len(bits)))
    for j, b in enumerate(bits):
        step = 2.0**b - 1.0
        act = (profile.act_fisher * (profile.act_range / step).pow(2) / 12).sum(1)
        w = profile.weight_fisher.sum(1) * (profile.weight_range / step).pow(2) / 12
        out[:, j] = (act + w).numpy()
    return {"layers": list(profile.layers), "bits": bits, "predicted": out.tolist()}


def rank_correlation(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    r"""
    Spearman's ρ and Kendall's τ (with two-sided p-values) between a prediction and a measurement.

    Args:
        predicted (`Sequence[float]`): predicted values (any monotone scale).
        measured (`Sequence[float]`): measured values, same length.

    Returns:
        `dict` with `n`, `spearman`, `spearman_p`, `kendall`, `kendall_p`.
    """
    from scipy.stats import kendalltau, spearmanr

    a = np.asarray(predicted, dtype=np.float64).reshape(-1)
    b = np.asarray(measured, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"predicted has {a.size} values but measured has {b.size}")
    if a.size < 3:
        raise ValueError(f"rank correlation needs at least 3 pairs, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("predicted and measured must be finite")
    rho, rho_p = spearmanr(a, b)
    tau, tau_p = kendalltau(a, b)
    return {
        "n": int(a.size),
        "spearman": float(rho),
        "spearman_p": float(rho_p),
        "kendall": float(tau),
        "kendall_p": float(tau_p),
    }


# ----------------------------------------------------------------------------------------------------------------
# Per-step error and its propagation
# ----------------------------------------------------------------------------------------------------------------


def _run(
    sampler: Any,
    seeds: Sequence[int],
    *,
    inject: dict[int, torch.Tensor] | None = None,
    local: Callable[[], contextlib.AbstractContextManager] | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The sampler loop of `DiffusionSampler.sample_batch` over all `seeds` in one batch, in model space.

    `inject[i]` is added to x after step `i`. With `local`, each step also computes the step from the same state
    with the model inside `local()` (on a copy of the scheduler) and returns the differences (local errors).
    `context` wraps every model call of the main trajectory. Returns the final x, the trajectory and local errors.
    """
    sch = sampler.scheduler
    sch.set_timesteps(sampler.num_inference_steps)
    x = initial_noise(seeds, sampler.model_shape).to(sampler.device) * sch.init_noise_sigma
    cond = sampler.conditioning_inputs(seeds)
    kw = sampler._step_kwargs(step_generators(seeds))
    traj, errors = [], []
    context = context or contextlib.nullcontext
    for i, t in enumerate(sch.timesteps):
        inp = sch.scale_model_input(x, t)
        if local is not None:
            alt = copy.deepcopy(sch)
            alt_kw = sampler._step_kwargs(copy.deepcopy(kw.get("generator")))
            with local():
                eps_q = sampler.predict_noise(inp, t, **cond)
            x_q = alt.step(eps_q, t, x, **alt_kw).prev_sample
        with context():
            eps = sampler.predict_noise(inp, t, **cond)
        x = sch.step(eps, t, x, **kw).prev_sample
        if local is not None:
            errors.append((x_q - x).detach().double().cpu())
        if inject is not None and i in inject:
            x = x + inject[i].to(x.device, x.dtype)
        traj.append(x.detach().double().cpu())
    return x.detach().double().cpu(), traj, errors


def step_error_propagation(
    sampler: Any,
    seeds: Sequence[int],
    quantized: Callable[[], contextlib.AbstractContextManager],
    *,
    fp_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    inject_scale: float = 0.1,
    steps: Sequence[int] | None = None,
) -> dict[str, Any]:
    r"""
    Per-step local error `e_t`, its propagation gain `J_t` to x_0, and the accumulated error `E = Σ_t J_t e_t`
    against the measured final drift of the quantized run.

    - `e_t`: from the FP state x_t, one step with the quantized model minus one step with the FP model.
    - `J_t e_t`: the effect on the final sample of injecting `α · e_t` into the FP trajectory after step t, divided
      by `α` (`inject_scale`; a finite-difference directional derivative of the FP flow along `e_t`).
    - `E = Σ_t J_t e_t` (a vector; first-order prediction of the drift) and the measured drift
      `x_0(quantized) − x_0(FP)` of the same seeds.

    Norms are Frobenius norms over all seeds in model space, reported relative to `‖x_0(FP)‖`.

    Args:
        sampler (`DiffusionSampler`): the sampler; its denoiser computes FP outside `quantized()`.
        seeds (`Sequence[int]`): seeds, run in one batch.
        quantized (`Callable[[], ContextManager]`): returns a context inside which the denoiser computes quantized
            (e.g. `lambda: quantize_layer(layer, 4)`; `contextlib.nullcontext` for a tdq-quantized model).
        fp_context (`Callable[[], ContextManager]`, *optional*): a context inside which the denoiser computes FP
            (default: none needed; `lambda: tdq.disabled(model)` for a tdq-quantized model).
        inject_scale (`float`, *optional*, defaults to `0.1`): `α` of the injection.
        steps (`Sequence[int]`, *optional*): step indices to inject at (default: all).

    Returns:
        `dict` with `timesteps`, `local_error` (`‖e_t‖ / ‖x_0‖` per step), `gain` (`‖J_t e_t‖ / ‖e_t‖`),
        `propagated` (`‖J_t e_t‖ / ‖x_0‖`), `accumulated` (`‖E‖ / ‖x_0‖`), `bound` (`Σ‖J_t e_t‖ / ‖x_0‖`),
        `measured_drift` (`‖x_0(q) − x_0(FP)‖ / ‖x_0‖`), `cosine` (between `E` and the measured drift vector),
        and `inject_scale`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    alpha = float(inject_scale)
    if not alpha > 0:
        raise ValueError(f"inject_scale={inject_scale!r} must be positive")
    with torch.no_grad():
        fp, _, errors = _run(sampler, seeds, local=quantized, context=fp_context)
        q, _, _ = _run(sampler, seeds, context=quantized)
        timesteps = [float(t) for t in sampler.scheduler.timesteps]
        idx = list(range(len(errors))) if steps is None else [int(s) for s in steps]
        bad = [i for i in idx if not 0 <= i < len(errors)]
        if bad:
            raise ValueError(f"steps {bad} are outside 0..{len(errors) - 1}")
        ref = float(fp.norm()) or 1.0
        total = torch.zeros_like(fp)
        propagated, gains = [], []
        for i in idx:
            out, _, _ = _run(sampler, seeds, inject={i: alpha * errors[i]}, context=fp_context)
            je = (out - fp) / alpha
            total += je
            propagated.append(float(je.norm()) / ref)
            e = float(errors[i].norm())
            gains.append(float(je.norm()) / e if e > 0 else 0.0)
    drift = q - fp
    denom = float(total.norm() * drift.norm())
    return {
        "timesteps": [timesteps[i] for i in idx],
        "steps": idx,
        "local_error": [float(errors[i].norm()) / ref for i in idx],
        "gain": gains,
        "propagated": propagated,
        "accumulated": float(total.norm()) / ref,
        "bound": float(sum(propagated)),
        "measured_drift": float(drift.norm()) / ref,
        "cosine": float((total * drift).sum()) / denom if denom > 0 else 0.0,
        "inject_scale": alpha,
    }


def evaluate_schedules(
    model: nn.Module,
    sampler: Any,
    config: Any,
    profile: SensitivityProfile,
    schedules: dict[str, Any],
    calibration_seeds: Sequence[int],
    seeds: Sequence[int],
    *,
    lpips_model: nn.Module | None = None,
) -> list[dict[str, Any]]:
    r"""
    Score precision schedules two ways: the planner's Fisher objective (`schedule_objective` on `profile`) and the
    measured error of the model quantized with the schedule (a copy of `model` per schedule: `quantize_` with
    `config`, `schedule.apply_`, calibration on `calibration_seeds`), against the FP samples of `seeds`.

    Args:
        model (`nn.Module`): the FP denoiser `sampler` calls (left unchanged).
        sampler (`DiffusionSampler`): the sampler (run on a shallow copy holding the quantized copy).
        config (`TDQConfig`): quantization config; its grid must have the profile's number of buckets.
        profile (`SensitivityProfile`): the Fisher profile the schedules are scored with.
        schedules (`dict[str, PrecisionSchedule]`): named schedules over the profile's layers.
        calibration_seeds (`Sequence[int]`): seeds of the calibration run.
        seeds (`Sequence[int]`): evaluation seeds.
        lpips_model (`nn.Module`, *optional*): from `tdq.eval.metrics.build_lpips`; adds `lpips` (mean over the
            decoded images) and `lpips_per_seed`.

    Returns:
        `list[dict]`: per schedule `name`, `objective`, `average_bits`, `mse` (final samples in model space, mean
        over seeds), `drift` (relative final drift `‖x_0(q) − x_0(FP)‖ / ‖x_0(FP)‖`) and `mse_per_seed`.
    """
    from tdq.api import calibration, quantize_
    from tdq.mixed_precision.planners import schedule_objective

    if not schedules:
        raise ValueError("no schedules given")
    seeds = [int(s) for s in seeds]
    rows = []
    with torch.no_grad():
        fp = _final(sampler, seeds)
        for name, schedule in schedules.items():
            qmodel = copy.deepcopy(model)
            quantize_(qmodel, config)
            schedule.apply_(qmodel)
            qsampler = copy.copy(sampler)
            qsampler.denoiser = qmodel
            with calibration(qmodel):
                _run(qsampler, [int(s) for s in calibration_seeds])
            q = _final(qsampler, seeds)
            per = (q - fp).pow(2).flatten(1).mean(1)
            extra = {}
            if lpips_model is not None:
                from tdq.eval.metrics import lpips_distance

                lp = lpips_distance(sampler.decode(q.float()), sampler.decode(fp.float()), lpips_model)
                extra = {"lpips": float(lp.mean()), "lpips_per_seed": lp.tolist()}
            rows.append(
                {
                    "name": str(name),
                    "objective": float(schedule_objective(profile, schedule)),
                    "average_bits": schedule.average_bits(profile.macs),
                    "mse": float(per.mean()),
                    "drift": float((q - fp).norm() / fp.norm()),
                    "mse_per_seed": per.tolist(),
                    **extra,
                }
            )
    return rows
