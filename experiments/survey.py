"""Seed survey on a bundled model (default mnist-ddpm): per-layer ablation curves P_l(b), Fisher and Hutchinson
predictions of them, the planner's Fisher objective against the measured error of several schedules, and the
per-step local error / propagation E = Σ J_t e_t against the measured drift.

Writes experiments/results/survey.{json,md} and survey_*.png.

Usage::

    python experiments/survey.py                       # mnist-ddpm, all layers, b in 4,6,8, 2 seeds, DDIM 6
    python experiments/survey.py --layers 8 --seeds 2  # smaller
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tdq, not another install's
from _common import env_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--layers", type=int, default=0, help="first N Conv/Linear layers (0: all)")
    ap.add_argument("--bits", default="4,6,8")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)

    import tdq
    from tdq.api import disabled
    from tdq.eval.analysis import (
        evaluate_schedules,
        layer_ablation,
        predicted_ablation,
        quantize_layer,
        rank_correlation,
        step_error_propagation,
    )
    from tdq.eval.analysis_plots import plot_ablation, plot_prediction_scatter, plot_propagation
    from tdq.eval.metrics import build_lpips
    from tdq.mixed_precision.fisher import profile_sensitivity
    from tdq.mixed_precision.hutchinson import hutchinson_sensitivity
    from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform
    from tdq.run.models import ModelConfig, load_model
    from tdq.sampling import make_sampler, make_scheduler

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    env = env_info()
    m = load_model(ModelConfig(name=args.model, source="zoo"))
    if m.kind != "pixel":
        raise SystemExit(
            "experiments/survey.py runs pixel zoo models; the notebooks cover the latent families"
        )
    sampler = make_sampler(
        m, make_scheduler(m.scheduler, "ddim"), num_inference_steps=args.steps, batch_size=64, progress=False
    )
    bits = [int(b) for b in args.bits.split(",")]
    seeds = list(range(args.seeds))
    calib_seeds = list(range(1000, 1000 + args.seeds))
    layers = [
        n for n, mod in m.denoiser.named_modules() if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d)
    ]
    if args.layers:
        layers = layers[: args.layers]
    timings = {}
    result = {
        "model": args.model,
        "sampler": f"DDIM {args.steps} steps (eta 0)",
        "seeds": seeds,
        "calibration_seeds": calib_seeds,
        "profile_x0_seeds": list(range(2000, 2008)),
        "buckets": args.buckets,
        "hutchinson_probes": args.probes,
        "ablation_method": "one layer fake-quantized: weight per-channel symmetric RTN, input per-tensor asymmetric "
        "on the call's own min/max; error = MSE of x_0 (pixels in [-1, 1]) to FP, same seeds",
        "env": env,
        "timings": timings,
        "argv": " ".join(sys.argv[1:]),
        "complete": False,
    }

    def write(**parts) -> None:
        # written after every section, so an interrupted run keeps what it measured
        result.update(parts, total_s=time.time() - t_start)
        (out / "survey.json").write_text(json.dumps(result, indent=1))
        (out / "survey.md").write_text(_markdown(result))

    t0 = time.time()
    abl = layer_ablation(m.denoiser, sampler, layers, bits, seeds)
    timings["ablation_s"] = time.time() - t0
    print(f"ablation {len(layers)} layers x {bits}: {timings['ablation_s']:.0f}s", flush=True)
    write(ablation=abl)

    # profiles on the FP model's own samples (data-free), the same noised samples for Fisher and Hutchinson
    with torch.no_grad():
        x0 = sampler(list(range(2000, 2008))).images * 2 - 1
    config = tdq.TDQConfig(grid=tdq.TimestepGrid(num_buckets=args.buckets))
    grid = config.grid.resolve(*tdq.get_adapter(m.denoiser).default_grid())
    t0 = time.time()
    fisher = profile_sensitivity(
        m.denoiser, m.scheduler, x0, grid, config=config, samples_per_bucket=8, batch_size=8, progress=False
    )
    timings["fisher_s"] = time.time() - t0
    t0 = time.time()
    hutch = hutchinson_sensitivity(
        m.denoiser,
        m.scheduler,
        x0,
        grid,
        config=config,
        samples_per_bucket=8,
        batch_size=8,
        probes=args.probes,
    )
    timings["hutchinson_s"] = time.time() - t0
    print(f"fisher {timings['fisher_s']:.0f}s, hutchinson {timings['hutchinson_s']:.0f}s", flush=True)

    measured = np.asarray(abl["mse"])
    index = {n: i for i, n in enumerate(fisher.layers)}
    rows = [index[n] for n in layers]
    prediction = {}
    for name, prof in (("fisher", fisher), ("hutchinson", hutch)):
        pred = np.asarray(predicted_ablation(prof, bits)["predicted"])[rows]
        corr = {"pooled": rank_correlation(pred.ravel(), measured.ravel())}
        for j, b in enumerate(bits):
            corr[f"b{b}"] = rank_correlation(pred[:, j], measured[:, j])
        prediction[name] = {"predicted": pred.tolist(), "rank_correlation": corr}
        plot_prediction_scatter(
            pred[:, 0],
            measured[:, 0],
            out / f"survey_{name}_vs_ablation.png",
            xlabel=f"{name} predicted error at {bits[0]} bits",
            ylabel=f"measured P_l({bits[0]})",
            title=f"{args.model} {name}",
        )
    plot_ablation(abl, out / "survey_ablation.png", title=f"{args.model}: P_l(b), DDIM {args.steps}")
    write(prediction=prediction, hutchinson_negative_entries_clamped=hutch.meta["negative_entries_clamped"])

    # schedules: uniform 4/6/8 and MILP at average-bit budgets, Fisher objective vs measured error
    schedules = {f"uniform-{b}": plan_uniform(fisher, b, b) for b in (4, 6, 8)}
    for budget in (4.5, 5.0, 6.0, 7.0):
        schedules[f"milp-{budget:g}"] = plan_precision(
            fisher, PrecisionBudget(avg_act_bits=budget, avg_weight_bits=budget)
        )
    t0 = time.time()
    lp = build_lpips("alex")
    sched_rows = evaluate_schedules(
        m.denoiser, sampler, config, fisher, schedules, calib_seeds, seeds, lpips_model=lp
    )
    timings["schedules_s"] = time.time() - t0
    obj = [r["objective"] for r in sched_rows]
    sched_corr = {
        "objective_vs_drift": rank_correlation(obj, [r["drift"] for r in sched_rows]),
        "objective_vs_lpips": rank_correlation(obj, [r["lpips"] for r in sched_rows]),
        "objective_vs_mse": rank_correlation(obj, [r["mse"] for r in sched_rows]),
    }
    plot_prediction_scatter(
        obj,
        [r["drift"] for r in sched_rows],
        out / "survey_schedules.png",
        labels=[r["name"] for r in sched_rows],
        xlabel="planner Fisher objective",
        ylabel="measured relative drift of x_0",
        title=f"{args.model} schedules",
    )
    print(f"schedules {timings['schedules_s']:.0f}s", flush=True)
    write(schedules=sched_rows, schedule_rank_correlation=sched_corr)

    # propagation: the 3 layers with the largest P_l(lowest b) at that b, and the whole model at uniform 6 and 8
    t0 = time.time()
    prop = {}
    for i in np.argsort(-measured[:, 0])[:3]:
        layer = m.denoiser.get_submodule(layers[i])
        prop[f"{layers[i]}@{bits[0]}"] = step_error_propagation(
            sampler, seeds, lambda layer=layer: quantize_layer(layer, bits[0])
        )
    for b in (6, 8):
        import copy

        qmodel = copy.deepcopy(m.denoiser)
        tdq.quantize_(qmodel, config)
        schedules[f"uniform-{b}"].apply_(qmodel)
        qsampler = copy.copy(sampler)
        qsampler.denoiser = qmodel
        with torch.no_grad(), tdq.calibration(qmodel):
            qsampler(calib_seeds)
        prop[f"all-layers-w{b}a{b}"] = step_error_propagation(
            qsampler, seeds, contextlib.nullcontext, fp_context=lambda q=qmodel: disabled(q)
        )
    timings["propagation_s"] = time.time() - t0
    key = "all-layers-w6a6"
    plot_propagation(
        prop[key], out / "survey_propagation.png", title=f"{args.model} {key}: e_t, J_t e_t, E vs drift"
    )

    write(propagation=prop, complete=True)
    print(f"done in {result['total_s']:.0f}s", flush=True)


def _c(c: dict) -> str:
    return f"{c['spearman']:+.3f} (p={c['spearman_p']:.2g}) | {c['kendall']:+.3f} (p={c['kendall_p']:.2g}) | {c['n']}"


def _ablation_summary(abl: dict) -> str:
    mse = np.asarray(abl["mse"])
    order = np.argsort(-mse[:, 0])
    top = ", ".join(f"{abl['layers'][i]} ({mse[i, 0]:.3g})" for i in order[:5])
    mono = int((np.diff(mse, axis=1) < 0).all(axis=1).sum())
    return (
        f"Most sensitive at {abl['bits'][0]} bits: {top}. P_l(b) decreases with b for {mono} of {len(mse)} layers; "
        f"median P_l over layers: "
        + ", ".join(f"b={b}: {np.median(mse[:, j]):.3g}" for j, b in enumerate(abl["bits"]))
        + f" (FP mean square {abl['fp_norm']:.3g})."
    )


def _markdown(r: dict) -> str:
    env = r["env"]
    lines = [
        f"# Seed survey: {r['model']}, {r['sampler']}",
        "",
        f"CPU {env['cpu']} ({env['cpu_capability']}), torch {env['torch']}, diffusers {env['diffusers']}, "
        f"{env['threads']} thread(s); seeds {r['seeds']}, calibration seeds {r['calibration_seeds']}; "
        f"profiles: {r['buckets']} buckets, x0 = FP samples of seeds {r['profile_x0_seeds']}, Hutchinson "
        f"{r['hutchinson_probes']} probes per batch ({r.get('hutchinson_negative_entries_clamped')} negative estimates "
        f"clamped to 0). Command: `python experiments/survey.py {r.get('argv', '')}`. "
        f"{'Total' if r['complete'] else 'INCOMPLETE (still running or interrupted) after'} {r['total_s']:.0f} s.",
        "",
        "## How well each sensitivity predicts the measured per-layer ablation P_l(b)",
        "",
        f"P_l(b): {r['ablation_method']}. {len(r['ablation']['layers'])} layers, b in {r['ablation']['bits']}.",
        _ablation_summary(r["ablation"]),
        "Rank correlation of the predicted error (the planner's noise model on each profile) with P_l(b): per "
        "bit-width across layers, and pooled over all (layer, b) pairs (inflated by the shared bit effect).",
        "",
        "| predictor | pairs | Spearman ρ (p) | Kendall τ (p) | n |",
        "|---|---|---|---|---|",
    ]
    for name, p in r.get("prediction", {}).items():
        for k, c in p["rank_correlation"].items():
            lines.append(f"| {name} | {k} | {_c(c)} |")
    lines += [
        "",
        "## Planner's Fisher objective vs measured error across schedules",
        "",
        "| schedule | avg bits (act, weight) | Fisher objective | MSE x_0 | relative drift | LPIPS (alex) |",
        "|---|---|---|---|---|---|",
    ]
    for s in r.get("schedules", []):
        ab = s["average_bits"]
        bits = (
            f"{ab.get('act', float('nan')):.2f}, {ab.get('weight', float('nan')):.2f}"
            if isinstance(ab, dict)
            else ab
        )
        lines.append(
            f"| {s['name']} | {bits} | {s['objective']:.4g} | {s['mse']:.4g} | {s['drift']:.4f} | {s['lpips']:.4f} |"
        )
    lines += ["", "| correlation | Spearman ρ (p) | Kendall τ (p) | n |", "|---|---|---|---|"]
    for k, c in r.get("schedule_rank_correlation", {}).items():
        lines.append(f"| {k} | {_c(c)} |")
    lines += [
        "",
        "## Local error e_t, propagation J_t e_t and E = Σ J_t e_t vs measured drift",
        "",
        "J_t e_t is measured by injecting 0.1·e_t into the FP trajectory after step t (finite difference). Norms "
        "relative to ‖x_0(FP)‖ over all seeds.",
        "",
        "| quantized | ‖E‖ | Σ‖J_t e_t‖ | measured drift | cos(E, drift) | largest ‖J_t e_t‖ at step |",
        "|---|---|---|---|---|---|",
    ]
    for k, p in r.get("propagation", {}).items():
        top = int(np.argmax(p["propagated"]))
        lines.append(
            f"| {k} | {p['accumulated']:.4f} | {p['bound']:.4f} | {p['measured_drift']:.4f} | {p['cosine']:.3f} | "
            f"{p['steps'][top]} (t={p['timesteps'][top]:.0f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
