"""Activation outliers: raw per-tensor W8A8 vs the default (with outlier handling) on outlier fixtures and mnist-ddpm.

Rows (final-sample PSNR to the same model's FP samples, same seeds; bootstrap 95 % CI over images):

- EDM fixture (``tdq.testing.outliers``; Karras-Heun 6 steps, labels = seed % 10): ``tame`` (no injected outliers),
  ``stream`` (residual stream at 1e3–1e6), ``concat`` (one concat input at 1e4); each raw (``outliers.handle=False``)
  vs default, timestep-aware (10 log-σ buckets) vs static (1 bucket), and the per-token dynamic baseline;
- mnist-ddpm (DDIM 20, eta 0): tame and with outlier channels (``inject_ddpm_outlier_channels``), W8A8 and W8A6.

Also records whether the outlier warning fired on the raw config and which layers it named, the smoothed layers
and the 16-bit fallback cells; for mnist-ddpm the judge-feature FID of quantized vs FP samples and the FP-vs-FP
noise floor (FP samples of other seeds). Rows are cached in the JSON (per-row resume): rerun to continue.

Usage::

    python experiments/outliers.py [--edm-seeds 64] [--ddpm-seeds 64] [--only edm|ddpm]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from _common import bootstrap_ci, env_info

RESULTS = Path(__file__).resolve().parent / "results"
OUT_JSON = RESULTS / "outliers.json"
OUT_MD = RESULTS / "outliers.md"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        if record.name == "tdq.outliers":
            self.messages.append(record.getMessage())


def _quantize(model, config_kwargs: dict, calibrate):
    import tdq
    from tdq.config import TDQConfig

    q = copy.deepcopy(model)
    tdq.quantize_(q, TDQConfig(**config_kwargs))
    cap = _Capture()
    logging.getLogger("tdq.outliers").addHandler(cap)
    try:
        with tdq.calibration(q):
            calibrate(q)
    finally:
        logging.getLogger("tdq.outliers").removeHandler(cap)
    return q, cap.messages


def _row(name, q, out, ref, warnings, extra=None) -> dict:
    import tdq
    from tdq.eval.metrics import psnr_per_image
    from tdq.outliers import runtime_counters

    p = psnr_per_image(out, ref)
    d = tdq.get_quantization(q).outliers
    row = {
        "row": name,
        "n": len(p),
        "psnr": float(p.mean()),
        "psnr_ci95": bootstrap_ci(p, n=1000),
        "warning_fired": bool(warnings),
        "warning": warnings[0] if warnings else None,
        "flagged_raw": d.flagged_raw if d else None,
        "still_large": d.still_large if d else None,
        "smoothed": d.smoothed if d else None,
        "fallback": d.fallback if d else None,
        "runtime": {k: v for k, v in runtime_counters(q).items() if k != "clipped"},
        "cpu": env_info()["cpu"],
    }
    row.update(extra or {})
    return row


def edm_rows(n: int, results: dict, save) -> None:
    from tdq.testing.outliers import (
        edm_sample,
        inject_concat_outliers,
        inject_stream_outliers,
        load_edm_fixture,
    )

    seeds, cal = list(range(n)), list(range(10_000, 10_032))

    def to01(x):
        return (x + 1) / 2

    tame = load_edm_fixture()
    fixtures = {
        "tame": tame,
        "stream": inject_stream_outliers(load_edm_fixture()),
        "concat": inject_concat_outliers(load_edm_fixture()),
    }
    tame_fp = to01(edm_sample(tame, seeds))
    variants = {
        "raw W8A8": dict(outliers={"handle": False}),
        "default W8A8": {},
        "raw W8A8 static": dict(outliers={"handle": False}, grid={"num_buckets": 1}),
        "default W8A8 static": dict(grid={"num_buckets": 1}),
        "per-token dynamic W8A8 (baseline)": dict(
            activation={"bits": 8, "symmetric": False, "granularity": "per_token"}, outliers={"handle": False}
        ),
    }
    for fname, model in fixtures.items():
        ref = to01(edm_sample(model, seeds))
        fp_psnr = (
            None
            if fname == "tame"
            else float(
                __import__("tdq.eval.metrics", fromlist=["x"])
                .psnr_per_image(ref, tame_fp)
                .clamp(max=200)
                .mean()
            )
        )
        for vname, kw in variants.items():
            key = f"edm/{fname}/{vname}"
            if key in results:
                continue
            t0 = time.time()
            q, warns = _quantize(model, kw, lambda q: edm_sample(q, cal))
            out = to01(edm_sample(q, seeds))
            results[key] = _row(
                key,
                q,
                out,
                ref,
                warns,
                {"fixture": f"edm-{fname}", "fp_psnr_to_tame_fp": fp_psnr, "wall_s": time.time() - t0},
            )
            print(f"{key}: {results[key]['psnr']:.2f} dB", flush=True)
            save()


def ddpm_rows(n: int, results: dict, save) -> None:
    from diffusers import DDIMPipeline

    import tdq.zoo
    from tdq.eval.metrics import extract_features, fid_from_features
    from tdq.testing.outliers import inject_ddpm_outlier_channels
    from tdq.zoo.judge import load_judge

    pipe = DDIMPipeline.from_pretrained(tdq.zoo.path("mnist-ddpm"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seeds, cal = list(range(n)), list(range(10_000, 10_032))

    def sample(unet, s):
        pipe.unet = unet
        out = []
        for i in range(0, len(s), 32):
            g = [torch.Generator().manual_seed(x) for x in s[i : i + 32]]
            with torch.no_grad():
                im = pipe(
                    batch_size=len(g), generator=g, num_inference_steps=20, eta=0.0, output_type="np"
                ).images
            out.append(torch.from_numpy(im).permute(0, 3, 1, 2).float())
        return torch.cat(out)

    feat = load_judge().feature_extractor()
    base = pipe.unet
    outl = copy.deepcopy(base)
    touched = inject_ddpm_outlier_channels(outl)
    refs = {"mnist-ddpm": sample(base, seeds)}
    if "ddpm/fp_noise_floor" not in results:
        other = sample(base, list(range(20_000, 20_000 + n)))
        results["ddpm/fp_noise_floor"] = {
            "row": "ddpm/fp_noise_floor",
            "n": n,
            "fid_judge128_fp_vs_fp_other_seeds": fid_from_features(
                extract_features(refs["mnist-ddpm"], feat), extract_features(other, feat)
            ),
        }
        save()
    rows = [
        ("mnist-ddpm", base, "raw W8A8", dict(outliers={"handle": False})),
        ("mnist-ddpm", base, "default W8A8", {}),
        ("mnist-ddpm", base, "default W8A8 static", dict(grid={"num_buckets": 1})),
        (
            "mnist-ddpm",
            base,
            "raw W8A6",
            dict(
                activation={"bits": 6, "symmetric": False}, outliers={"handle": False}, boundary_act_bits=None
            ),
        ),
        (
            "mnist-ddpm",
            base,
            "default W8A6 without boundary A8",
            dict(activation={"bits": 6, "symmetric": False}, boundary_act_bits=None),
        ),
        (
            "mnist-ddpm",
            base,
            "default W8A6 + clip search without boundary A8",
            dict(
                activation={"bits": 6, "symmetric": False},
                outliers={"clip_search": True},
                boundary_act_bits=None,
            ),
        ),
        ("mnist-ddpm", base, "default W8A6", dict(activation={"bits": 6, "symmetric": False})),
        (
            "mnist-ddpm",
            base,
            "default W8A6 static",
            dict(activation={"bits": 6, "symmetric": False}, grid={"num_buckets": 1}),
        ),
        ("mnist-ddpm-outlier-channels", outl, "raw W8A8", dict(outliers={"handle": False})),
        ("mnist-ddpm-outlier-channels", outl, "default W8A8", {}),
        ("mnist-ddpm-outlier-channels", outl, "default W8A8 static", dict(grid={"num_buckets": 1})),
    ]
    for fname, model, vname, kw in rows:
        key = f"ddpm/{fname}/{vname}"
        if key in results:
            continue
        if fname not in refs:
            refs[fname] = sample(model, seeds)
        ref = refs[fname]
        t0 = time.time()
        q, warns = _quantize(model, kw, lambda q: sample(q, cal))
        out = sample(q, seeds)
        fid = fid_from_features(extract_features(ref, feat), extract_features(out, feat))
        results[key] = _row(
            key,
            q,
            out,
            ref,
            warns,
            {
                "fixture": fname,
                "fid_judge128_to_fp": fid,
                "outlier_layers_injected": touched if fname != "mnist-ddpm" else None,
                "wall_s": time.time() - t0,
            },
        )
        print(f"{key}: {results[key]['psnr']:.2f} dB, FID-to-FP {fid:.3g}", flush=True)
        save()


def markdown(data: dict) -> str:
    res = data["rows"]
    lines = [
        "# Activation outliers: raw per-tensor vs default (outlier handling)",
        "",
        f"Command: `{data['command']}`. CPU of the latest run: {data['env']['cpu']} ({data['env']['cpu_capability']}), "
        f"torch {data['env']['torch']}, diffusers {data['env']['diffusers']}, {data['env']['threads']} thread; "
        "each row's own CPU is in the `cpu` column. "
        "PSNR: final samples vs the same model's FP samples (same seeds), mean and bootstrap 95 % CI over images. "
        "Calibration: 32 other seeds. 'static' = 1 bucket; others 10 buckets.",
        "",
        "| row | n | PSNR dB | CI95 | warning fired | layers flagged before handling | smoothed | A16 fallback cells "
        "| FID-to-FP | cpu |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    floor = res.get("ddpm/fp_noise_floor", {}).get("fid_judge128_fp_vs_fp_other_seeds")
    for key, r in res.items():
        if "psnr" not in r:
            continue
        named = ", ".join(r["flagged_raw"][:4]) + (" …" if len(r["flagged_raw"] or []) > 4 else "")
        fb = sum(len(v) for v in (r["fallback"] or {}).values())
        fid = r.get("fid_judge128_to_fp")
        lines.append(
            f"| {key} | {r['n']} | {r['psnr']:.2f} | [{r['psnr_ci95'][0]:.2f}, {r['psnr_ci95'][1]:.2f}] | "
            f"{'yes' if r['warning_fired'] else 'no'} | {named or '-'} | {len(r['smoothed'] or [])} | {fb} | "
            f"{'-' if fid is None else f'{fid:.3g}'} | {r.get('cpu', '')} |"
        )
    if floor is not None:
        lines += ["", f"FP-vs-FP noise floor (judge-feature FID, FP samples of other seeds): {floor:.3g}."]
    checks = []
    for f in ("stream", "concat"):
        a, b = res.get(f"edm/{f}/default W8A8"), res.get("edm/tame/default W8A8")
        if a and b:
            checks.append(
                f"- edm {f}: default W8A8 {a['psnr']:.2f} dB vs the fixture without outliers {b['psnr']:.2f} dB "
                f"(gap {b['psnr'] - a['psnr']:.2f} dB, must be ≤ 3); raw W8A8 "
                f"{res[f'edm/{f}/raw W8A8']['psnr']:.2f} dB, warning fired: "
                f"{res[f'edm/{f}/raw W8A8']['warning_fired']}"
            )
    a = res.get("ddpm/mnist-ddpm-outlier-channels/default W8A8")
    b = res.get("ddpm/mnist-ddpm/default W8A8")
    if a and b:
        checks.append(
            f"- mnist-ddpm outlier channels: default W8A8 {a['psnr']:.2f} dB vs without {b['psnr']:.2f} dB "
            f"(gap {b['psnr'] - a['psnr']:.2f} dB); raw {res['ddpm/mnist-ddpm-outlier-channels/raw W8A8']['psnr']:.2f} "
            f"dB, warning fired: {res['ddpm/mnist-ddpm-outlier-channels/raw W8A8']['warning_fired']}"
        )
    if checks:
        lines += ["", "Checks:", "", *checks]
    lines += [
        "",
        "Notes: the FID noise floor uses FP samples of *other* seeds while FID-to-FP pairs the same seeds, so "
        "FID-to-FP below the floor is expected for any decent quantizer; read PSNR first. Clipping search "
        "(`outliers.clip_search`, candidates: range ratios, percentiles and KL, chosen per bucket on reconstruction "
        "error) is off by default: it lowers each layer's own error, but on mnist-ddpm W8A6 (64 seeds) the "
        "final-sample PSNR fell from 21.1 to 20.3 dB, and at A8 on the EDM fixture from 40.4 to 34.5 dB (16 seeds, "
        "probe during development): errors propagate through the sampler. Boundary layers (`boundary_act_bits=8`, "
        "the default since session 5: the layers reading x_t, writing the output, or on the timestep path keep 8-bit "
        "activations, `tdq.boundary`) are what moves mnist-ddpm W8A6: compare the rows with and without them.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm-seeds", type=int, default=64)
    p.add_argument("--ddpm-seeds", type=int, default=64)
    p.add_argument("--only", choices=["edm", "ddpm"], default=None)
    p.add_argument("--fresh", action="store_true", help="ignore cached rows")
    a = p.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"rows": {}}
    if OUT_JSON.is_file() and not a.fresh:
        data = json.loads(OUT_JSON.read_text())
    for r in data["rows"].values():  # rows measured before rows recorded their CPU: the run's CPU then
        r.setdefault("cpu", data.get("env", {}).get("cpu", ""))
    data["env"] = env_info()
    data["command"] = "python experiments/outliers.py"
    data["seeds"] = {"edm": a.edm_seeds, "ddpm": a.ddpm_seeds, "calibration": "10000..10031"}

    def save():
        OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")
        OUT_MD.write_text(markdown(data))

    if a.only in (None, "edm"):
        edm_rows(a.edm_seeds, data["rows"], save)
    if a.only in (None, "ddpm"):
        ddpm_rows(a.ddpm_seeds, data["rows"], save)
    save()


if __name__ == "__main__":
    main()
