"""tdq against baseline quantizers on a bundled model, every row measured by `tdq.evaluate` (the `tdq run` stages).

Every row quantizes the mnist-ddpm denoiser with one quantizer plug-in (`tdq.run.quantizers`), calibrates on the
same calibration seeds through the real DDIM sampler (where the method calibrates), samples the same evaluation
seeds and compares with the FP model's samples of those seeds: PSNR and LPIPS (alex) to FP (means with 95 %
bootstrap CIs over images), FID-to-FP (Inception pool3) beside the noise floor (FID between FP samples of the eval
seeds and of other seeds: what an exact quantizer would score against the FP set), final trajectory drift, and the
share of the denoiser's Conv/Linear MACs the quantizer quantized (torchao's configs touch nn.Linear only). With
same-seed pairing an exact quantizer scores PSNR inf, LPIPS 0 and FID-to-FP 0; the noise floor is what an
independent FP draw scores.

Bits come from the `quant` preset of each row (`schedule=none`: no mixed precision), so `tdq`, `static` and
`dynamic-per-token` differ only in how activation ranges are chosen. tdq's outlier handling (on by default: per-layer
smoothing, shortcut split, 16-bit fallback after calibration) applies to `tdq` and `static` alike; the
`*-no-outliers` rows turn it off. Rows whose plug-in cannot run here (a missing
`[baselines]` extra, or `torchao-int4-wo`, which has CUDA kernels only) are recorded with the error message.

Rows are written to the JSON as they finish; a rerun with the same settings skips finished rows (resume). FP
samples and features come from tdq's reference cache, so only the first row samples the FP model.

Usage::

    python experiments/baselines.py                   # mnist-ddpm, DDIM 20, 32 seeds, all rows
    python experiments/baselines.py --seeds 64 --rows tdq-w8a8,quanto-w8a8
    python experiments/baselines.py --markdown-only   # rewrite baselines.md from baselines.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tdq, not another install's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bootstrap_ci, env_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# row -> (quantizer, overrides, label of the bits)
ROWS: dict[str, tuple[str, list[str], str]] = {
    "tdq-w8a8": ("tdq", ["quant=w8a8"], "W8A8"),
    "static-w8a8": ("static", ["quant=w8a8"], "W8A8"),
    "dynamic-per-token-w8a8": ("dynamic-per-token", ["quant=w8a8"], "W8A8"),
    "quanto-w8a8": ("quanto-w8a8", [], "W8A8"),
    "quanto-w4a8": ("quanto-w4a8", [], "W4A8"),
    "quanto-w4": ("quanto-w4", [], "W4A16"),
    "torchao-int8-dyn": ("torchao-int8-dyn", [], "W8A8 (Linear)"),
    "torchao-int8-wo": ("torchao-int8-wo", [], "W8A16 (Linear)"),
    "torchao-int4-wo": ("torchao-int4-wo", [], "W4A16 (Linear)"),
    "torchao-intx-int4-wo": ("torchao-intx-int4-wo", [], "W4A16 (Linear)"),
    "tdq-w4a8-rtn": ("tdq", ["quant=w4a8-rtn"], "W4A8"),
    "tdq-w8a6": ("tdq", ["quant=w8a8", "quant.activation.bits=6"], "W8A6"),
    "static-w8a6": ("static", ["quant=w8a8", "quant.activation.bits=6"], "W8A6"),
    "dynamic-per-token-w8a6": ("dynamic-per-token", ["quant=w8a8", "quant.activation.bits=6"], "W8A6"),
    "tdq-w4a8": ("tdq", ["quant=w4a8"], "W4A8"),
    # without tdq's outlier handling (SmoothQuant-style smoothing, shortcut split, 16-bit fallback), which the rows
    # above apply after calibration, to static as much as to timestep-aware scales
    "tdq-w8a8-no-outliers": ("tdq", ["quant=w8a8", "quant.outliers.handle=false"], "W8A8"),
    "static-w8a8-no-outliers": ("static", ["quant=w8a8", "quant.outliers.handle=false"], "W8A8"),
}


def _ci(values) -> list[float] | None:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not t.numel() or not torch.isfinite(t).all():
        return None
    return bootstrap_ci(t)


def summarize(report: dict) -> dict:
    """The numbers of one row from a `tdq.evaluate` report."""
    q = report["quantizer"]
    nf = report.get("noise_floor", {}).get("inception", {})
    data = report.get("data", {})
    judge = data.get("judge_classes", {})
    row = {
        "psnr": report.get("psnr"),
        "psnr_ci95": _ci(report.get("psnr_per_image", [])),
        "lpips_alex": report.get("lpips_alex"),
        "lpips_alex_ci95": _ci(report.get("lpips_alex_per_image", [])),
        "ssim": report.get("ssim"),
        "fid_to_fp": report.get("fid"),
        "kid_to_fp": report.get("kid_mean"),
        "noise_floor_fid_fp_vs_fp": nf.get("fp_vs_fp_other_seeds", {}).get("fid"),
        "fid_to_mnist_test": data.get("inception", {}).get("quantized", {}).get("fid"),
        "judge_agreement_fp_vs_quantized": judge.get("class_agreement_fp_vs_quantized"),
        "drift_final": report["drift"][-1] if report.get("drift") else None,
        "drift_mean": sum(report["drift"]) / len(report["drift"]) if report.get("drift") else None,
        "mac_share_quantized": q["mac_share_quantized"],
        "mac_share_weights": q["mac_share_weights"],
        "mac_share_activations": q["mac_share_activations"],
        "layers_quantized": q["layers_quantized"],
        "layers_total": q["layers_total"],
        "quantized_as": q["quantized_as"],
        "nonfinite_samples": q.get("nonfinite_samples"),
        "outlier_layers_smoothed": len(report["outliers"]["summary"]["smoothed"])
        if "outliers" in report
        else None,
        "scheme": q.get("scheme") or q.get("tdq_config"),
        "library": q.get("library"),
        "timings_s": report.get("timings_s"),
        "psnr_per_image": report.get("psnr_per_image"),
        "lpips_alex_per_image": report.get("lpips_alex_per_image"),
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--seeds", type=int, default=32, help="evaluation seeds 0..N-1 (noise floor: 1000000..)")
    ap.add_argument("--calib-seeds", type=int, default=16, help="calibration seeds 100000..")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=None, help="result stem (default baselines / baselines_<model>)")
    ap.add_argument(
        "--runs", default=str(Path.home() / ".cache" / "tdq" / "baselines"), help="run directories"
    )
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON and exit")
    args = ap.parse_args()
    stem = args.out or ("baselines" if args.model == "mnist-ddpm" else f"baselines_{args.model}")
    out_json = RESULTS / f"{stem}.json"
    if args.markdown_only:  # re-read each finished row's report.json (its run dir) for fields added later
        result = json.loads(out_json.read_text())
        for name, row in result["rows"].items():
            rep = Path(args.runs) / stem / name / "report.json"
            if rep.is_file():
                row.update(summarize(json.loads(rep.read_text())))
        _save(result, out_json)
        write_markdown(result, out_json.with_suffix(".md"))
        return
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tdq
    from tdq.run.quantizers import QuantizerUnavailableError

    common = [
        f"model={args.model}",
        "schedule=none",
        "eval.scheduler=ddim",
        f"eval.num_inference_steps={args.steps}",
        f"eval.num_samples={args.seeds}",
        "eval.seed=0",
        "eval.noise_floor_seed=1000000",
        "calibration.scheduler=ddim",
        f"calibration.num_inference_steps={args.steps}",
        f"calibration.num_samples={args.calib_seeds}",
        "calibration.seed=100000",
        "progress=false",
        "threads=1",
    ]
    settings = {"model": args.model, "overrides": common, "sampler": f"DDIM {args.steps}"}
    result = json.loads(out_json.read_text()) if out_json.exists() else {}
    if result.get("settings") != settings:
        result = {"settings": settings, "rows": {}, "unavailable": {}}
    result["env"] = env_info()
    result["env"]["packages"] = _packages()
    for name in [r for r in args.rows.split(",") if r]:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {list(ROWS)}")
        if name in result["rows"]:
            print(f"{name}: done (resume)")
            continue
        quantizer, overrides, bits = ROWS[name]
        t0 = time.perf_counter()
        print(f"{name}: quantizer={quantizer} {overrides}", flush=True)
        try:
            report = tdq.evaluate(
                quantizer, overrides=[*common, *overrides], run_dir=Path(args.runs) / stem / name
            )
        except QuantizerUnavailableError as e:
            result["unavailable"][name] = {"quantizer": quantizer, "bits": bits, "error": str(e)}
            print(f"{name}: unavailable: {e}", flush=True)
            _save(result, out_json)
            continue
        except Exception as e:  # a baseline that breaks: recorded, the other rows still run
            result["unavailable"][name] = {
                "quantizer": quantizer,
                "bits": bits,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6),
            }
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            _save(result, out_json)
            continue
        row = {"quantizer": quantizer, "overrides": overrides, "bits": bits, **summarize(report)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["unavailable"].pop(name, None)
        result["rows"][name] = row
        nf = report.get("noise_floor", {}).get("inception", {}).get("fp_vs_fp_other_seeds", {})
        result["noise_floor"] = {
            "fid_fp_vs_fp_other_seeds": nf.get("fid"),
            "seeds": report["noise_floor"]["seeds"],
        }
        result["eval_seeds"], result["calibration_seeds"] = (
            report["eval"]["seeds"],
            [
                100000,
                100000 + args.calib_seeds - 1,
            ],
        )
        _save(result, out_json)
        print(
            f"{name}: PSNR {row['psnr']:.2f} dB, LPIPS {row['lpips_alex']:.4f}, FID-to-FP {row['fid_to_fp']:.2f}, "
            f"MACs quantized {100 * row['mac_share_quantized']:.1f} % ({row['seconds']} s)",
            flush=True,
        )
    write_markdown(result, out_json.with_suffix(".md"))


def _packages() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("optimum-quanto", "torchao", "torch", "diffusers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _save(result: dict, path: Path) -> None:
    from tdq.utils.io import atomic_write, json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(result), indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _fmt(v, digits=2) -> str:
    return "n/a" if v is None or isinstance(v, str) else f"{v:.{digits}f}"


def write_markdown(result: dict, path: Path) -> None:
    """The table of `baselines.md` from the JSON."""
    s, env = result["settings"], result["env"]
    nf = result.get("noise_floor", {})
    rows = result["rows"]
    lines = [
        f"# tdq vs baseline quantizers on {s['model']}",
        "",
        f"{s['sampler']}, evaluation seeds {result.get('eval_seeds')}, calibration seeds "
        f"{result.get('calibration_seeds')} (same for every row that calibrates); every row measured by "
        "`tdq.evaluate` (the stages of `tdq run`), bits from the row's `quant` preset (`schedule=none`).",
        "",
        "Paired metrics: quantized vs FP sample of the same seed (mean, 95 % bootstrap CI over images). An exact "
        "quantizer scores PSNR inf, LPIPS 0, FID-to-FP 0 and drift 0; the noise floor FID "
        f"{_fmt(nf.get('fid_fp_vs_fp_other_seeds'))} is what an *independent* FP draw (seeds {nf.get('seeds')}) "
        "scores against the FP set, i.e. the scale on which FID-to-FP differences are visible. MACs: share of the "
        "denoiser's Conv/Linear multiply-accumulates in layers the quantizer quantized (weights / inputs). "
        "smoothed: layers whose input outliers tdq's outlier handling smoothed after calibration (tdq-based rows; "
        "it applies to `static` as much as to timestep-aware scales, so `static` here is static PTQ *with* "
        "SmoothQuant-style smoothing where a layer needs it).",
        "",
        "| row | quantizer | bits | PSNR to FP [dB] (95% CI) | LPIPS alex (95% CI) | FID to FP | noise floor FID "
        "| final drift | MACs quantized W / A | layers | smoothed | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        pc, lc = r.get("psnr_ci95") or [None, None], r.get("lpips_alex_ci95") or [None, None]
        bad = f" ({r['nonfinite_samples']} NaN samples)" if r.get("nonfinite_samples") else ""
        lines.append(
            f"| {name}{bad} | `{r['quantizer']}` | {r['bits']} | {_fmt(r['psnr'])} ({_fmt(pc[0])}–{_fmt(pc[1])}) "
            f"| {_fmt(r['lpips_alex'], 4)} ({_fmt(lc[0], 4)}–{_fmt(lc[1], 4)}) | {_fmt(r['fid_to_fp'], 1)} "
            f"| {_fmt(r['noise_floor_fid_fp_vs_fp'], 1)} | {_fmt(r['drift_final'], 4)} "
            f"| {100 * r['mac_share_weights']:.1f} % / {100 * r['mac_share_activations']:.1f} % "
            f"| {r['layers_quantized']}/{r['layers_total']} | {_fmt(r.get('outlier_layers_smoothed'), 0)} "
            f"| {r['seconds']} |"
        )
    if result.get("unavailable"):
        lines += ["", "Rows that did not run here:", ""]
        for name, u in result["unavailable"].items():
            lines.append(f"- {name} (`{u['quantizer']}`): {u['error']}")
    pk = env.get("packages", {})
    lines += [
        "",
        f"CPU: {env['cpu']} ({env['cpu_capability']}), torch {env['torch']}, diffusers {env['diffusers']}, "
        f"optimum-quanto {pk.get('optimum-quanto')}, torchao {pk.get('torchao')}, {env['threads']} thread(s); "
        f"machine shared with other jobs (load average {[round(x, 1) for x in env['load_average_at_start']]}), "
        "so times are indicative only.",
        "",
        "Regenerate: `python experiments/baselines.py` (needs `make baselines`; rows resume from the JSON).",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
