"""The report of `tdq run`: its sections (`report.json`) and their markdown (`report.md`).

Two lists make the report extensible:

- [`REPORT_SECTIONS`]: functions `(RunContext) -> dict` whose results are merged, in list order, into
  `report.json`'s top level. The built-in ones write the run description, the metrics and drift, the reference-cache
  status, the timings, every entry of `RunContext.sections` (where stages put their own sections, e.g.
  `noise_floor`, `data`, `conditioning`) and the schedule summary.
- [`MARKDOWN_SECTIONS`]: functions `(report: dict) -> list[str]` whose lines are inserted, in list order, into
  `report.md` before its figures; a function returns `[]` when its section is absent from the report.

The section builders (`_noise_floor_section`, `_data_section`, `_conditioning_section`) take plain arguments, so
they can be used without a run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tdq.run.config import RunConfig
from tdq.run.context import RunContext
from tdq.run.quantizers import quantizer_markdown
from tdq.sampling import LatentDiffusionSampler, SampleResult
from tdq.utils.io import atomic_write

__all__ = [
    "MARKDOWN_SECTIONS",
    "REPORT_SECTIONS",
    "build_report",
    "markdown_sections",
    "write_config",
    "write_run_report",
]


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    r"""
    Write the resolved run config to `run_dir/config.json`.

    Args:
        run_dir (`Path`): the run directory (must exist).
        cfg (`RunConfig`): the config.
    """
    text = json.dumps(_asdict(cfg), indent=2)
    atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))


def _asdict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------
# report.json: sections from the run context


def _run_section(ctx: RunContext) -> dict[str, Any]:
    """The model, the evaluation and the calibration run."""
    m, ev, seeds = ctx.model, ctx.cfg.eval, ctx.eval_seeds
    model_info: dict[str, Any] = {"name": m.name, "source": m.source, "sample_shape": list(m.sample_shape)}
    if ctx.latent:
        model_info.update(kind=m.kind, latent_shape=list(m.latent_shape), crop=ctx.crop)
    return {
        "model": model_info,
        "num_samples": len(seeds),
        "eval": {
            "scheduler": ev.scheduler,
            "num_inference_steps": ev.num_inference_steps,
            "seeds": [seeds[0], seeds[-1]],
            "batch_size": ev.batch_size,
            "device": str(ctx.device),
            "num_processes": int(ctx.dist.num_processes),
        },
        "calibration": {"num_samples": len(ctx.calib_seeds), "scheduler": ctx.cfg.calibration.scheduler},
    }


def _metrics_section(ctx: RunContext) -> dict[str, Any]:
    """FP-vs-quantized metrics (top level) and the trajectory drift."""
    return {**ctx.metrics, "drift": ctx.drift}


def _reference_cache_section(ctx: RunContext) -> dict[str, Any]:
    """Which FP samples and features came from the reference cache."""
    return {"reference_cache": ctx.cache_report}


def _timings_section(ctx: RunContext) -> dict[str, Any]:
    """Seconds per step."""
    return {"timings_s": ctx.timer.times}


def _stage_sections(ctx: RunContext) -> dict[str, Any]:
    """The sections the stages added to `ctx.sections` (`None` values left out)."""
    return {k: v for k, v in ctx.sections.items() if v is not None}


def _schedule_section(ctx: RunContext) -> dict[str, Any]:
    """
    Planner, achieved average bits, objective, budget rows, costs (BOPs, weight bytes) and the MILP's fallback to
    uniform (`None` when it did not fall back) of the precision schedule (absent without a schedule).
    """
    from tdq.mixed_precision.costs import schedule_costs
    from tdq.mixed_precision.planners import plan_uniform, schedule_objective

    if ctx.schedule is None:
        return {}
    profile = ctx.profile
    meta = ctx.schedule.meta
    return {
        "schedule": {
            "planner": ctx.cfg.schedule.planner,
            "average_bits": ctx.schedule.average_bits(profile.macs),
            "bucket_weights": meta.get("bucket_weights"),
            "objective": schedule_objective(profile, ctx.schedule),
            "objective_uniform_8bit": schedule_objective(profile, plan_uniform(profile, 8, 8)),
            "budget_rows": meta.get("budget_rows"),
            "fallback": meta.get("fallback"),
            "float_cells": [{"layer": n, "bucket": k} for n, k in ctx.schedule.float_cells()],
            "solver": meta.get("solver"),
            "costs": schedule_costs(
                ctx.schedule, macs=profile.macs, weight_numel=profile.meta.get("weight_numel")
            ),
        }
    }


#: Builders of `report.json`, in order: each maps the run context to top-level keys (an empty dict adds nothing).
REPORT_SECTIONS: list[Callable[[RunContext], dict[str, Any]]] = [
    _run_section,
    _metrics_section,
    _reference_cache_section,
    _timings_section,
    _stage_sections,
    _schedule_section,
]


def build_report(ctx: RunContext) -> dict[str, Any]:
    r"""
    The report of a run: the merged results of [`REPORT_SECTIONS`].

    Args:
        ctx (`RunContext`): a run that has been evaluated.

    Returns:
        `dict`
    """
    report: dict[str, Any] = {}
    for section in REPORT_SECTIONS:
        report.update(section(ctx))
    return report


def write_run_report(ctx: RunContext, report: dict[str, Any]) -> dict[str, Path]:
    r"""
    Write `report.json`, `report.md` (with [`MARKDOWN_SECTIONS`]) and the figures into `ctx.run_dir`.

    Args:
        ctx (`RunContext`): the run (supplies the FP and quantized samples and the drift).
        report (`dict`): from [`build_report`].

    Returns:
        `dict[str, Path]`: the files written (as from `tdq.eval.write_report`).
    """
    from tdq.eval import write_report

    run_dir = ctx.run_dir
    extra = {
        k: run_dir / f for k, f in [("sensitivity_act", "sensitivity_act.png"), ("schedule", "schedule.png")]
    }
    return write_report(
        run_dir,
        report,
        ctx.fp.images,
        ctx.q.images,
        ctx.drift,
        extra_figures={k: v for k, v in extra.items() if v.exists()},
        markdown_sections=markdown_sections(report),
    )


# ----------------------------------------------------------------------------------------------------
# section builders (plain arguments)


def _cropped(result: SampleResult, fn) -> SampleResult:
    return SampleResult(images=fn(result.images), seeds=result.seeds)


def _conditioning_section(
    m, smp: LatentDiffusionSampler, seeds, fp_eval, q_eval, fp_images, q_images, judge, ev, device
) -> dict[str, Any]:
    """Class accuracy (judge) w.r.t. the conditioned class, FP-vs-quantized agreement and CLIPScore (text)."""
    from tdq.eval import data as data_eval

    cond = smp.conditioning
    labels = cond.labels(seeds) if cond.has_labels else None
    out: dict[str, Any] = {
        "kind": m.kind,
        "guidance_scale": smp.guidance_scale,
        "class_names": cond.class_names,
    }
    if cond.prompt_list is not None:
        out["prompts_file"] = cond.describe()["prompts_file"]
        out["label_rule"] = "prompt = prompts_file entry seed % entries" + (
            ", class = that entry's label" if labels is not None else " (the file has no labels)"
        )
        out["prompts_histogram"] = torch.bincount(
            torch.tensor(cond.entries(seeds)), minlength=cond.num_entries
        ).tolist()
    else:
        out["label_rule"] = "class = seed % num_classes"
    if labels is not None:
        out["labels_histogram"] = torch.bincount(torch.tensor(labels), minlength=cond.num_classes).tolist()
    if m.kind == "t2i" and cond.prompt_list is None:
        out["prompt_template"] = cond.prompt_template
    skip_judge = f"no judge for {m.name!r} images of shape {list(m.eval_shape)}"
    if labels is None:
        judge = None
        skip_judge = "the prompts file gives no labels, so class accuracy has no reference"
    elif (
        judge is None
        and m.name.lower().startswith("mnist")
        and data_eval.judge_applies("mnist-test", m.eval_shape)
    ):
        judge = data_eval.load_domain_judge("mnist-test", device)[0]
    if judge is not None:
        y = torch.tensor(labels)
        fp_c = data_eval.class_metrics(fp_eval, judge, y)
        q_c = data_eval.class_metrics(q_eval, judge, y)
        fp_pred, q_pred = fp_c.pop("predictions"), q_c.pop("predictions")
        keep = ("accuracy", "mean_confidence", "class_entropy_bits")
        out["judge"] = {
            "fp": {k: fp_c[k] for k in keep},
            "quantized": {k: q_c[k] for k in keep},
            "class_agreement_fp_vs_quantized": sum(a == b for a, b in zip(fp_pred, q_pred, strict=True))
            / max(1, len(fp_pred)),
        }
    else:
        out["judge"] = None
        out["judge_skipped"] = skip_judge
    clip_dir = _resolve_clip(ev.clip, m)
    if clip_dir is not None:
        from tdq.eval.clip import clip_score, load_clip

        clip = load_clip(clip_dir)
        prompts = cond.prompts(seeds)
        out["clip_score"] = {
            "clip": str(clip_dir),
            "fp": clip_score(fp_images, prompts, clip, batch_size=ev.clip_batch_size),
            "quantized": clip_score(q_images, prompts, clip, batch_size=ev.clip_batch_size),
        }
    return out


def _resolve_clip(name: str | None, m) -> str | None:
    if name is None or name == "none" or m.kind != "t2i":
        return None
    if name == "auto":
        if not m.name.lower().startswith("mnist"):
            return None
        from tdq import zoo

        folder = zoo.CHECKPOINT_ROOT / "mnist-clip"
        return str(folder) if (folder / "config.json").is_file() else None
    return name


def _dist_short(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("fid", "kid_mean", "kid_std") if k in d}


def _noise_floor_section(ev, nf_seeds, fp_feats, nf_feats, q_feats, kid_kw) -> dict[str, Any]:
    from tdq.eval.data import distribution_metrics

    out: dict[str, Any] = {
        "description": "FP samples (eval seeds) vs FP samples (other seeds), same counts: the FID/KID an exact "
        "quantized model would score against the FP reference. Quantized-vs-FP values near this are noise.",
        "num_samples": len(nf_seeds),
        "seeds": [nf_seeds[0], nf_seeds[-1]],
    }
    for key in fp_feats:
        floor = distribution_metrics(fp_feats[key], nf_feats[key], **kid_kw)
        quant = distribution_metrics(fp_feats[key], q_feats[key], **kid_kw)
        out[key] = {"fp_vs_fp_other_seeds": _dist_short(floor), "quantized_vs_fp": _dist_short(quant)}
    return out


def _data_section(
    dataset, real_feats, real_labels, real_images, fp, q, nf, fp_feats, nf_feats, q_feats, judge, kid_kw
) -> dict[str, Any]:
    from tdq.eval.data import class_metrics, distribution_metrics

    out: dict[str, Any] = {"dataset": dataset, "num_real": int(real_images.shape[0])}
    for key, real in real_feats.items():
        sec = {
            "fp": _dist_short(distribution_metrics(real, fp_feats[key], **kid_kw)),
            "quantized": _dist_short(distribution_metrics(real, q_feats[key], **kid_kw)),
        }
        if key in nf_feats:
            sec["fp_other_seeds"] = _dist_short(distribution_metrics(real, nf_feats[key], **kid_kw))
        out[key] = sec
    if judge is not None:
        real_c = class_metrics(real_images, judge, real_labels)
        fp_c = class_metrics(fp.images, judge)
        q_c = class_metrics(q.images, judge)
        agree = [a == b for a, b in zip(fp_c.pop("predictions"), q_c.pop("predictions"), strict=True)]
        real_c.pop("predictions")
        # "judge" holds the distribution metrics in the judge's feature space; the classifier's verdicts go here.
        out["judge_classes"] = {
            "real": real_c,
            "fp": fp_c,
            "quantized": q_c,
            "class_agreement_fp_vs_quantized": sum(agree) / max(1, len(agree)),
        }
        if nf is not None:
            nf_c = class_metrics(nf.images, judge)
            nf_c.pop("predictions")
            out["judge_classes"]["fp_other_seeds"] = nf_c
    return out


# ----------------------------------------------------------------------------------------------------
# report.md: markdown of the sections


def _f(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _noise_floor_markdown(report: dict[str, Any]) -> list[str]:
    nf = report.get("noise_floor")
    if not nf:
        return []
    n = nf["num_samples"]
    lines = [
        "## Noise floor",
        "",
        f"FID/KID between two FP sample sets of {n} images (other seeds): what an exact quantized model "
        "would score. Quantized-vs-FP values within about this much are indistinguishable from sampling noise.",
        "",
        "| features | FP vs FP (other seeds) FID | quantized vs FP FID | FP vs FP KID | quantized vs FP KID |",
        "|---|---|---|---|---|",
    ]
    for key in ("inception", "judge"):
        if key in nf:
            a, b = nf[key]["fp_vs_fp_other_seeds"], nf[key]["quantized_vs_fp"]
            lines.append(
                f"| {key} | {_f(a.get('fid'))} | {_f(b.get('fid'))} | "
                f"{_f(a.get('kid_mean'))} ± {_f(a.get('kid_std'))} | "
                f"{_f(b.get('kid_mean'))} ± {_f(b.get('kid_std'))} |"
            )
    lines.append("")
    return lines


def _data_markdown(report: dict[str, Any]) -> list[str]:
    data = report.get("data")
    if not data:
        return []
    lines = [
        f"## Against real data ({data['dataset']}, {data['num_real']} images)",
        "",
        "| features | set | FID | KID |",
        "|---|---|---|---|",
    ]
    for key in ("inception", "judge"):
        for label in ("fp", "fp_other_seeds", "quantized"):
            d = data.get(key, {}).get(label)
            if d:
                lines.append(
                    f"| {key} | {label} | {_f(d.get('fid'))} | {_f(d.get('kid_mean'))} ± {_f(d.get('kid_std'))} |"
                )
    j = data.get("judge_classes")
    if j:
        lines += [
            "",
            "| judge (ccexam MNIST classifier) | mean top-1 confidence | class entropy [bits] | IS (judge) | accuracy |",
            "|---|---|---|---|---|",
        ]
        for label in ("real", "fp", "fp_other_seeds", "quantized"):
            if label in j:
                c = j[label]
                lines.append(
                    f"| {label} | {_f(c['mean_confidence'])} | {_f(c['class_entropy_bits'])} | "
                    f"{_f(c.get('inception_score'))} | {_f(c.get('accuracy'))} |"
                )
        lines += [
            "",
            "IS (judge): the Inception Score formula exp(E KL(p(y|x) || p(y))) on the MNIST judge's logits (1 to 10), "
            "not ImageNet Inception-v3 IS.",
        ]
        lines += [
            "",
            f"Same predicted digit for FP and quantized (same seed): {_f(j['class_agreement_fp_vs_quantized'])}.",
        ]
    lines.append("")
    return lines


def _conditioning_markdown(report: dict[str, Any]) -> list[str]:
    cond = report.get("conditioning")
    if not cond:
        return []
    pf = cond.get("prompts_file")
    if pf:
        rule = (
            f"Sample of seed `s` takes entry `s % {pf['entries']}` of the prompts file `{pf['path']}` "
            f"(sha256 `{pf['sha256'][:12]}`)"
            + ("." if cond.get("labels_histogram") is not None else "; the file gives no labels.")
        )
    else:
        rule = f"Sample of seed `s` is conditioned on class `s % {len(cond['class_names'])}`" + (
            f", prompt `{cond['prompt_template']}`." if cond.get("prompt_template") else "."
        )
    lines = [
        f"## Conditioning ({cond['kind']}, guidance scale {_f(cond['guidance_scale'])})",
        "",
        rule,
        "",
        "| set | class accuracy (judge) | mean confidence | CLIPScore |",
        "|---|---|---|---|",
    ]
    j, c = cond.get("judge") or {}, cond.get("clip_score") or {}
    for label in ("fp", "quantized"):
        lines.append(
            f"| {label} | {_f((j.get(label) or {}).get('accuracy'))} | "
            f"{_f((j.get(label) or {}).get('mean_confidence'))} | {_f(c.get(label))} |"
        )
    if j:
        lines += ["", f"Same judged digit for FP and quantized: {_f(j['class_agreement_fp_vs_quantized'])}."]
    lines.append("")
    return lines


def _reference_cache_markdown(report: dict[str, Any]) -> list[str]:
    cache = report.get("reference_cache")
    if not cache:
        return []
    entries = {k: v["status"] for k, v in cache.items() if isinstance(v, dict) and "status" in v}
    entries.update({f"features {k}": v for k, v in cache.get("features", {}).items()})
    lines = [
        "## Reference cache",
        "",
        f"Folder: `{cache.get('dir')}`.",
        "",
        "| entry | status |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in entries.items()]
    lines.append("")
    return lines


#: Markdown of the report sections, in `report.md` order: each maps the report to lines (`[]`: nothing to show).
def _backend_markdown(report: dict[str, Any]) -> list[str]:
    be = report.get("backend")
    if not be:
        return []
    lat, cap = be["latency"], be["capability"]
    kernels = ", ".join(f"{k}: {n}" for k, n in be["kernels"].items())
    return [
        "## Backend",
        "",
        f"Quantized samples ran on `{be['backend']}` (asked `{be['requested']}`), {cap['cpu_model']} "
        f"({cap['torch_cpu_capability']}), torch {cap['torch_version']}. Per denoiser call "
        f"{lat['ratio_median']:.3f}x FP32 eager (min {lat['ratio_min']:.3f}, {lat['pairs']} interleaved pairs, "
        f"{lat['threads']} threads); resident weight bytes {be['resident_bytes_ratio']:.3f}x FP32. "
        f"Kernels (layers): {kernels}.",
        "",
    ]


def _schedule_markdown(report: dict[str, Any]) -> list[str]:
    sc = report.get("schedule")
    if not sc:
        return []
    avg, costs = sc["average_bits"], sc.get("costs") or {}
    lines = [
        f"## Precision schedule ({sc['planner']})",
        "",
        f"Average bits (MAC-weighted, buckets by step occupancy): activations {avg['act']:.3f}, "
        f"weights {avg['weight']:.3f}. BOPs per call {_f(costs.get('bops'))} "
        f"({_f(costs.get('bops_ratio'))}x FP32); integer weight bytes {_f(costs.get('weight_bytes'))} "
        f"({_f(costs.get('weight_bytes_ratio'))}x FP32).",
    ]
    fb = sc.get("fallback")
    if fb:
        lines.append(
            f"**The MILP planner fell back to uniform W{fb['weight_bits']}A{fb['act_bits']}**: {fb['reason']}."
        )
    elif sc["planner"] == "milp":
        lines.append("The MILP planner's own schedule is used (no fallback to uniform).")
    cells = sc.get("float_cells") or []
    if cells:
        by_layer: dict[str, list[int]] = {}
        for c in cells:
            by_layer.setdefault(c["layer"], []).append(int(c["bucket"]))
        lines += [
            "",
            f"Float fallback: {len(cells)} (layer, bucket) cells keep their input in float (16 bits in the average, "
            "MACs x 32 x 32 BOPs):",
            "",
            "| layer | buckets in float |",
            "|---|---|",
            *(f"| `{n}` | {', '.join(map(str, ks))} |" for n, ks in by_layer.items()),
        ]
    lines.append("")
    return lines


def _outliers_markdown(report: dict[str, Any]) -> list[str]:
    section = report.get("outliers")
    return [section["markdown"], ""] if section else []


MARKDOWN_SECTIONS: list[Callable[[dict[str, Any]], list[str]]] = [
    quantizer_markdown,
    _schedule_markdown,
    _backend_markdown,
    _outliers_markdown,
    _noise_floor_markdown,
    _data_markdown,
    _conditioning_markdown,
    _reference_cache_markdown,
]


def markdown_sections(report: dict[str, Any]) -> str:
    r"""
    The markdown of [`MARKDOWN_SECTIONS`] for `report` (inserted into `report.md` before the figures).

    Args:
        report (`dict`): the run report.

    Returns:
        `str`: the sections' lines, joined (empty when no section applies).
    """
    return "\n".join(line for section in MARKDOWN_SECTIONS for line in section(report))


_markdown_sections = markdown_sections  # the name before the split of tdq/run/job.py
