"""Low-bit weights on a bundled model: round-to-nearest vs clipping search vs GPTQ (tdq.rounding), per bit-width.

Every row quantizes every Conv/Linear of the denoiser, rounds its weights by the row's method, calibrates the
timestep-aware activation scales on the same calibration seeds, samples the same evaluation seeds (DDIM), and
compares with the FP model's samples of those seeds: PSNR (mean, 95% bootstrap CI over images), LPIPS (alex), and
FID-to-FP (Inception pool3) beside the noise floor (FID between FP samples of the eval seeds and of other seeds).
The layer input statistics (GPTQ Hessians, from the FP model through the real sampler on the calibration seeds)
are collected once and shared by every row; their collection time is reported separately.

Rows are merged into the JSON by row name as they finish (the file is re-read before each write, so concurrent or
partial runs keep each other's rows); a rerun with the same settings skips finished rows (resume). Each row records
the CPU and library versions it was measured with (`env`).

Conditional latent models (`--model mnist-t2i`, `mnist-dit`) load with their `tdq/configs/model/<model>.yaml`
(class names, prompt template, guidance scale, crop): seed s is conditioned on class s % 10 (prompt
"a handwritten digit <name>" / DiT class label), with classifier-free guidance, identically for the FP and every
quantized model (calibration runs the same conditioned sampler on the calibration seeds). PSNR and LPIPS compare the
decoded 32x32 images; FID and the MNIST judge see the 28x28 crop (as `tdq run`). Where the judge applies, every row
adds the judge accuracy of the conditioned digit, FP vs quantized on the same seeds, and their difference with a
paired bootstrap CI over seeds. Rows named after a `tdq/configs/quant` preset (`w4a8`, `w4a8-int`, `w4a16`, `w4a6`,
`w3a8`, `w4a8-rtn`) take their settings from that preset file; `<row>-x86` (e.g. `w4a8-int-x86`) is `<row>` lowered
onto the x86 int8 backend after calibration (`tdq.quant.backends.to_backend`; its kernels are recorded per row).

Usage::

    python experiments/lowbit.py                         # mnist-ddpm, 64 seeds, all rows
    python experiments/lowbit.py --rows w4a8-nearest,w4a8-gptq --seeds 64
    python experiments/lowbit.py --model mnist-t2i       # -> results/lowbit_mnist-t2i.{json,md}, PRESET_ORDER rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tdq, not another install's
from _common import bootstrap_ci, env_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "tdq" / "configs"

QAT = {"steps": 200, "batch_size": 8, "num_samples": 64, "lr": 1e-3, "weight_lr": 5e-3}

# name -> (weight bits, act bits, weight observer, rounding method, clip, act_order, corrections[, extra
# WeightRounding fields; "levels" there is the weight QuantSpec's non-uniform levels])
ROWS = {
    "w8a8-nearest": (8, 8, "minmax", "nearest", "observer", False, []),
    "w4a8-nearest-minmax": (4, 8, "minmax", "nearest", "observer", False, []),
    "w4a8-nearest": (4, 8, "mse", "nearest", "observer", False, []),
    "w4a8-nearest-bias": (4, 8, "mse", "nearest", "observer", False, ["bias"]),
    "w4a8-nearest-ptqd": (4, 8, "mse", "nearest", "observer", False, ["ptqd"]),
    "w4a8-mse": (4, 8, "minmax", "mse", "observer", False, []),
    "w4a8-gptq": (4, 8, "mse", "gptq", "observer", False, []),
    "w4a8-gptq-bias": (4, 8, "mse", "gptq", "observer", False, ["bias"]),
    "w4a8-gptq-ptqd": (4, 8, "mse", "gptq", "observer", False, ["ptqd"]),
    "w4a8-gptq-actorder": (4, 8, "mse", "gptq", "observer", True, []),
    "w4a8-gptq-actorder-bias": (4, 8, "mse", "gptq", "observer", True, ["bias"]),
    "w4a8-gptq-actorder-ptqd": (4, 8, "mse", "gptq", "observer", True, ["ptqd"]),
    "w4a8-gptq-minmax": (4, 8, "minmax", "gptq", "observer", False, []),
    "w4a8-gptq-outmse": (4, 8, "minmax", "gptq", "output_mse", False, []),
    "w4a16-nearest": (4, 16, "mse", "nearest", "observer", False, []),
    "w4a16-gptq": (4, 16, "mse", "gptq", "observer", False, []),
    "w4a16-gptq-actorder": (4, 16, "mse", "gptq", "observer", True, []),
    "w3a8-nearest": (3, 8, "mse", "nearest", "observer", False, []),
    "w3a8-gptq": (3, 8, "mse", "gptq", "observer", False, []),
    "w4a6-nearest": (4, 6, "mse", "nearest", "observer", False, []),
    "w4a6-gptq": (4, 6, "mse", "gptq", "observer", False, []),
    "w3a8-gptq-actorder": (3, 8, "mse", "gptq", "observer", True, []),
    "w4a6-gptq-actorder": (4, 6, "mse", "gptq", "observer", True, []),
    "w4a8-adaround": (4, 8, "mse", "adaround", "observer", False, []),
    "w4a8-adaround-gptqinit": (4, 8, "mse", "adaround", "observer", True, [], {"adaround_init": "gptq"}),
    "w4a16-adaround": (4, 16, "mse", "adaround", "observer", False, []),
    "w4a8-gptq-actorder-smooth": (4, 8, "mse", "gptq", "observer", True, [], {"smooth_first": True}),
    "w4a8-adaround-smooth": (4, 8, "mse", "adaround", "observer", False, [], {"smooth_first": True}),
    "w4a16-gptq-actorder-smooth": (4, 16, "mse", "gptq", "observer", True, [], {"smooth_first": True}),
    # 9th element: QATConfig fields (experiments/lowbit_qat.py), the fine-tuning after calibration
    "w4a8-gptq-actorder-smooth-qat": (4, 8, "mse", "gptq", "observer", True, [], {"smooth_first": True}, QAT),
    "w4a8-brecq": (4, 8, "mse", "brecq", "observer", False, []),
    "w4a8-gptq-brecq": (
        4, 8, "mse", "brecq", "observer", True, [], {"adaround_init": "gptq", "smooth_first": True}
    ),
    "w4a6-gptq-brecq": (
        4, 6, "mse", "brecq", "observer", True, [], {"adaround_init": "gptq", "smooth_first": True}
    ),
    "w3a8-gptq-brecq": (
        3, 8, "mse", "brecq", "observer", True, [], {"adaround_init": "gptq", "smooth_first": True}
    ),
    "w4a8-kmeans": (4, 8, "mse", "nearest", "observer", False, [], {"levels": "kmeans"}),
    "w4a8-log2": (4, 8, "mse", "nearest", "observer", False, [], {"levels": "log2"}),
    "w4a8-kmeans-gptq-actorder-smooth": (
        4,
        8,
        "mse",
        "gptq",
        "observer",
        True,
        [],
        {"levels": "kmeans", "smooth_first": True},
    ),
    "w4a16-kmeans": (4, 16, "mse", "nearest", "observer", False, [], {"levels": "kmeans"}),
}  # fmt: skip
DEFAULT_ORDER = [
    "w4a8-nearest",
    "w4a8-gptq",
    "w4a16-gptq",
    "w8a8-nearest",
    "w4a16-nearest",
    "w4a8-mse",
    "w4a8-gptq-actorder",
    "w4a8-gptq-minmax",
    "w4a8-nearest-minmax",
    "w3a8-nearest",
    "w3a8-gptq",
    "w4a6-nearest",
    "w4a6-gptq",
    "w4a16-gptq-actorder",
    "w4a8-gptq-actorder-ptqd",
    "w4a8-gptq-actorder-bias",
    "w4a8-nearest-bias",
    "w4a8-nearest-ptqd",
    "w3a8-gptq-actorder",
    "w4a6-gptq-actorder",
    "w4a8-gptq-outmse",
    "w4a8-gptq-bias",
    "w4a8-gptq-ptqd",
    "w4a8-adaround",
    "w4a8-adaround-gptqinit",
    "w4a16-adaround",
    "w4a8-gptq-actorder-smooth",
    "w4a8-adaround-smooth",
    "w4a16-gptq-actorder-smooth",
    "w4a8-gptq-actorder-smooth-qat",
    "w4a8-brecq",
    "w4a8-gptq-brecq",
    "w4a6-gptq-brecq",
    "w3a8-gptq-brecq",
    "w4a8-kmeans",
    "w4a8-log2",
    "w4a8-kmeans-gptq-actorder-smooth",
    "w4a16-kmeans",
]


PRESETS = ("w4a8", "w4a8-int", "w4a16", "w4a6", "w3a8", "w4a8-rtn")
# the rows of the conditional (latent) models: round-to-nearest W4A8, then the presets
PRESET_ORDER = ["w4a8-nearest", "w4a8", "w4a8-int", "w4a16", "w4a6", "w3a8"]


def preset_row(name: str) -> tuple:
    """The ROWS tuple of the `tdq/configs/quant/<name>.yaml` preset (what `tdq run quant=<name>` quantizes with)."""
    import yaml

    q = yaml.safe_load((CONFIGS / "quant" / f"{name}.yaml").read_text())
    w, a, r = q["weight"], q["activation"], q.get("weight_rounding", {})
    extra = {"levels": w.get("levels", "uniform")}
    if r.get("smooth_first"):
        extra["smooth_first"] = True
    return (
        w["bits"],
        a["bits"],
        w.get("observer", "minmax"),
        r.get("method", "nearest"),
        r.get("clip", "observer"),
        bool(r.get("act_order", False)),
        list(r.get("corrections", [])),
        extra,
    )


def row_spec(name: str) -> tuple:
    """A row's settings; `<row>-x86` is `<row>` lowered onto the x86 int8 backend after calibration."""
    base = name.removesuffix("-x86")
    return preset_row(base) if base in PRESETS else ROWS[base]


def model_config(name: str):
    """The model's `tdq/configs/model/<name>.yaml` (class names, prompts, guidance, crop), else the bare name."""
    from tdq.run.models import ModelConfig

    path = CONFIGS / "model" / f"{name}.yaml"
    if not path.is_file():
        return ModelConfig(name=name)
    import yaml

    from tdq.run.config import to_run_config

    return to_run_config({"model": yaml.safe_load(path.read_text())}).model


def judge_row(fp_correct: torch.Tensor, q_correct: torch.Tensor, fp_pred, q_pred) -> dict:
    """Judge accuracy of the conditioned class, quantized vs FP on the same seeds (paired bootstrap over seeds)."""
    diff = q_correct.double() - fp_correct.double()
    return {
        "fp_accuracy": float(fp_correct.double().mean()),
        "accuracy": float(q_correct.double().mean()),
        "delta": float(diff.mean()),
        "delta_ci95": bootstrap_ci(diff),
        "agreement_with_fp": float((torch.as_tensor(fp_pred) == torch.as_tensor(q_pred)).double().mean()),
    }


def judge_correct(images: torch.Tensor, judge, labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per-image correctness of the judge w.r.t. `labels`, and its predictions."""
    from tdq.eval.data import class_metrics

    pred = class_metrics(images, judge, labels)["predictions"]
    return torch.as_tensor(pred) == labels, list(pred)


def save_stats(stats, path: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, st in stats.items():
        tensors[f"{name}.hessian"] = st.hessian
        tensors[f"{name}.bucket_sum"] = st.bucket_sum
        tensors[f"{name}.bucket_count"] = st.bucket_count
        meta[name] = {"count": st.count, "calls_per_bucket": st.calls_per_bucket}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_stats(path: Path):
    from safetensors.torch import load_file

    from tdq.rounding import LayerStats

    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    return {
        name: LayerStats(
            hessian=tensors[f"{name}.hessian"],
            count=m["count"],
            bucket_sum=tensors[f"{name}.bucket_sum"],
            bucket_count=tensors[f"{name}.bucket_count"],
            calls_per_bucket=m["calls_per_bucket"],
        )
        for name, m in meta.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--seeds", type=int, default=64, help="evaluation seeds 0..N-1")
    ap.add_argument("--calib-seeds", type=int, default=32, help="calibration seeds 100000..")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows (default: all for mnist-ddpm, PRESET_ORDER otherwise)",
    )
    ap.add_argument("--out", default=None, help="result stem (default lowbit / lowbit_<model>)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tdq" / "lowbit"))
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--rerun", default="", help="comma-separated rows to run again even if finished")
    ap.add_argument(
        "--note", default=None, help="a sentence printed under the markdown table (e.g. a reduced size)"
    )
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON and exit")
    args = ap.parse_args()
    if args.markdown_only:
        stem = args.out or ("lowbit" if args.model == "mnist-ddpm" else f"lowbit_{args.model}")
        result = load_result(RESULTS / f"{stem}.json")
        if args.note is not None:
            result = merge_write(RESULTS / f"{stem}.json", {**result, "note": args.note}, {})
        write_markdown(result, RESULTS / f"{stem}.md")
        return
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rows is None:
        args.rows = ",".join(DEFAULT_ORDER if args.model == "mnist-ddpm" else PRESET_ORDER)

    import tdq
    from tdq.config import QuantSpec, TDQConfig, TimestepGrid, WeightRounding
    from tdq.eval.metrics import (
        build_lpips,
        extract_features,
        fid_from_features,
        lpips_distance,
        psnr_per_image,
    )
    from tdq.rounding import calibrate_with_rounding, collect_layer_stats
    from tdq.run.models import load_model
    from tdq.sampling import make_sampler, make_scheduler

    stem = args.out or ("lowbit" if args.model == "mnist-ddpm" else f"lowbit_{args.model}")
    out_json = RESULTS / f"{stem}.json"
    eval_seeds = list(range(args.seeds))
    nf_seeds = list(range(1_000_000, 1_000_000 + args.seeds))
    calib_seeds = list(range(100_000, 100_000 + args.calib_seeds))
    settings = {
        "model": args.model,
        "scheduler": "ddim",
        "steps": args.steps,
        "eval_seeds": [eval_seeds[0], eval_seeds[-1]],
        "noise_floor_seeds": [nf_seeds[0], nf_seeds[-1]],
        "calibration_seeds": [calib_seeds[0], calib_seeds[-1]],
        "num_buckets": args.buckets,
        "batch_size": args.batch,
        "layers": "every Conv2d/Linear of the denoiser",
        "weight": "symmetric per-channel; observer per row",
        "activation": "affine per-tensor, one scale per timestep bucket, min-max",
    }
    mcfg = model_config(args.model)
    m = load_model(mcfg)
    cond = None
    if m.conditional:
        from tdq.sampling.conditioning import model_conditioning

        cond = model_conditioning(m)
        settings["conditioning"] = {
            **cond.describe(),
            "guidance_scale": m.guidance_scale,
            "label_rule": "class = seed % num_classes, same for FP and every row",
        }
        settings["crop"] = m.crop
        settings["metrics"] = "PSNR/LPIPS on the decoded images; FID and judge on the crop"
    result = load_result(out_json)
    if result.get("settings") != settings:
        if result.get("rows"):
            raise SystemExit(
                f"{out_json} holds rows measured with other settings; pass --out to write elsewhere"
            )
        result = {"settings": settings, "rows": {}}
    if args.note is not None:
        result["note"] = args.note
    env = env_info()

    def fresh():
        return load_model(mcfg)

    def sampler(m, progress=False):
        return make_sampler(
            m,
            make_scheduler(m.scheduler, "ddim"),
            num_inference_steps=args.steps,
            batch_size=args.batch,
            record_trajectory=False,
            progress=progress,
        )

    cache = Path(args.cache) / f"{args.model}_s{args.steps}_n{args.seeds}_c{args.calib_seeds}_k{args.buckets}"
    cache.mkdir(parents=True, exist_ok=True)
    fp_file = cache / "fp.safetensors"
    if fp_file.exists():
        from safetensors.torch import load_file

        t = load_file(str(fp_file))
        fp, nf = t["fp"], t["nf"]
    else:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        fp = sampler(m)(eval_seeds).images
        nf = sampler(m)(nf_seeds).images
        save_file({"fp": fp.contiguous(), "nf": nf.contiguous()}, str(fp_file))
        result["fp_sampling_s"] = round(time.perf_counter() - t0, 2)

    def crop(x):
        return x[..., m.crop : x.shape[-2] - m.crop, m.crop : x.shape[-1] - m.crop] if m.crop else x

    lp = build_lpips("alex")
    judge = None
    if cond is not None and cond.has_labels:
        from tdq.eval.data import judge_applies, load_domain_judge

        if judge_applies("mnist-test", m.eval_shape):
            judge = load_domain_judge("mnist-test")[0]
            labels = torch.tensor(cond.labels(eval_seeds))
            fp_correct, fp_pred = judge_correct(crop(fp), judge, labels)
            result["judge_fp_accuracy"] = float(fp_correct.double().mean())
            result["judge_fp_predictions"] = [int(v) for v in fp_pred]
            result["judge"] = "mnist_judge_ccexam (tdq.zoo.judge), accuracy of the conditioned digit"
    inception = None
    fp_feat = None
    if not args.no_fid:
        from tdq.eval.features import InceptionFeatures

        inception = InceptionFeatures()
        fp_feat = extract_features(crop(fp), inception)
        nf_feat = extract_features(crop(nf), inception)
        result["noise_floor_fid_fp_vs_fp"] = fid_from_features(fp_feat, nf_feat)
        result["noise_floor_psnr_fp_vs_fp_other_seeds"] = float(psnr_per_image(nf, fp).mean())

    def grid():
        return TimestepGrid(num_buckets=args.buckets)

    # statistics depend on the calibration run only, not on the evaluation seeds
    stats_file = (
        Path(args.cache) / f"{args.model}_s{args.steps}_c{args.calib_seeds}_k{args.buckets}_stats.safetensors"
    )
    stats = None

    def get_stats():
        nonlocal stats
        if stats is None:
            if stats_file.exists():
                stats = load_stats(stats_file)
            else:
                mm = fresh()
                d = tdq.quantize_(
                    mm.denoiser, TDQConfig(grid=grid()), num_train_timesteps=mm.num_train_timesteps
                )
                t0 = time.perf_counter()
                stats = collect_layer_stats(d, lambda: sampler(mm)(calib_seeds))
                result["statistics_s"] = round(time.perf_counter() - t0, 2)
                save_stats(stats, stats_file)
                merge_write(out_json, result, {})
        return stats

    rerun = {r.strip() for r in args.rerun.split(",") if r.strip()}
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if name in result["rows"] and name not in rerun:
            print(f"{name}: done (resume)", flush=True)
            continue
        spec = row_spec(name)
        wb, ab, obs, method, clip, act_order, corrections = spec[:7]
        extra = dict(spec[7]) if len(spec) > 7 else {}
        levels = extra.pop("levels", "uniform")
        cfg = TDQConfig(
            weight=QuantSpec(bits=wb, granularity="per_channel", symmetric=True, observer=obs, levels=levels),
            activation=QuantSpec(bits=ab, granularity="per_tensor", symmetric=False, observer="minmax"),
            grid=grid(),
            weight_rounding=WeightRounding(
                method=method, clip=clip, act_order=act_order, corrections=list(corrections), **extra
            ),
        )
        mm = fresh()
        d = tdq.quantize_(mm.denoiser, cfg, num_train_timesteps=mm.num_train_timesteps)
        need = method != "nearest" or clip != "observer" or "bias" in corrections
        st = get_stats() if need else None
        # the library path: rounding (and smoothing first, AdaRound, corrections) with the shared FP statistics
        rep = calibrate_with_rounding(d, lambda mm=mm: sampler(mm)(calib_seeds), stats=st)
        t_cal = rep["seconds_calibration"]
        ptqd = rep.get("ptqd")
        ada = rep.get("adaround")
        brq = rep.get("brecq")
        t_round = rep["seconds_total"] - t_cal - (ptqd["seconds"] if ptqd else 0.0)
        if len(spec) > 8:
            from lowbit_qat import run_qat

            qat = run_qat(mm, fresh, spec[8], args.steps, cache / f"qat_{name}")
        backend = None
        if name.endswith("-x86"):  # the same calibrated model, run on the integer kernels
            from tdq.quant.backends import backend_info, to_backend

            to_backend(d, "x86")
            backend = backend_info(d)
        t0 = time.perf_counter()
        q = sampler(mm)(eval_seeds).images
        t_sample = time.perf_counter() - t0
        psnr = psnr_per_image(q, fp)
        lpips = lpips_distance(q, fp, lp)
        row = {
            "weight_bits": wb,
            "act_bits": ab,
            "weight_observer": obs,
            "rounding": method,
            "clip": rep["clip"],
            "act_order": act_order,
            "corrections": list(corrections),
            "smooth_first": bool(rep.get("smooth_first")),
            "levels": levels,
            "psnr": float(psnr.mean()),
            "psnr_ci95": bootstrap_ci(psnr),
            "lpips_alex": float(lpips.mean()),
            "lpips_alex_ci95": bootstrap_ci(lpips),
            "rounding_s": round(t_round, 2),
            "activation_calibration_s": round(t_cal, 2),
            "sampling_s": round(t_sample, 2),
            "methods_count": rep["methods_count"],
            "layer_methods": {k: v["method"] for k, v in rep["layers"].items()},
        }
        if ptqd is not None:
            row["ptqd"] = ptqd
        if len(spec) > 8:
            row["qat"], row["qat_s"] = qat, qat["seconds"]
        if name.removesuffix("-x86") in PRESETS:
            row["preset"] = f"tdq/configs/quant/{name.removesuffix('-x86')}.yaml"
        if backend is not None:
            row["backend"] = {k: backend[k] for k in ("backend", "capability", "kernels")}
        if judge is not None:
            q_correct, q_pred = judge_correct(crop(q), judge, labels)
            row["judge"] = judge_row(fp_correct, q_correct, fp_pred, q_pred)
        if ada is not None:
            row["adaround"] = {k: v for k, v in ada.items() if k not in ("layers", "filled_buckets")}
            row["adaround"]["init"] = cfg.weight_rounding.adaround_init
            row["adaround_layers"] = {
                k: {kk: v[kk] for kk in ("rel_output_error_start", "rel_output_error", "binary_fraction")}
                for k, v in ada["layers"].items()
            }
        if brq is not None:
            row["brecq"] = {k: v for k, v in brq.items() if k not in ("layers", "units", "filled_buckets")}
            row["brecq"]["init"] = cfg.weight_rounding.adaround_init
            row["brecq_units"] = {
                k: {kk: v[kk] for kk in ("method", "error_start", "error", "binary_fraction")}
                for k, v in brq["units"].items()
            }
        row["outliers"] = outlier_note(d)
        if inception is not None:
            row["fid_to_fp"] = fid_from_features(fp_feat, extract_features(crop(q), inception))
        row["env"] = env
        result = merge_write(out_json, result, {name: row})
        print(
            f"{name}: PSNR {row['psnr']:.2f} [{row['psnr_ci95'][0]:.2f}, {row['psnr_ci95'][1]:.2f}] "
            f"LPIPS {row['lpips_alex']:.4f} FID {row.get('fid_to_fp')} round {t_round:.1f}s"
            + (
                f" judge {row['judge']['accuracy']:.3f} (FP {row['judge']['fp_accuracy']:.3f})"
                if judge
                else ""
            ),
            flush=True,
        )
    write_markdown(result, RESULTS / f"{stem}.md")


def load_result(path: Path) -> dict:
    """The results JSON; rows of the older format (one top-level `env`) get that `env` as their own."""
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    old = result.pop("env", None)
    if old is not None:
        for row in result.get("rows", {}).values():
            row.setdefault("env", old)
    return result


def merge_write(path: Path, result: dict, new_rows: dict) -> dict:
    """Re-read `path`, merge `new_rows` (by row name) and this run's top-level fields into it, write atomically."""
    on_disk = load_result(path)
    rows = dict(on_disk.get("rows", {})) if on_disk.get("settings") == result["settings"] else {}
    for k, v in result.get("rows", {}).items():
        rows.setdefault(k, v)  # a row another run wrote since this run started wins over this run's old copy
    rows.update(new_rows)
    merged = {**on_disk, **{k: v for k, v in result.items() if k != "rows"}, "rows": rows}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, path)
    return merged


def outlier_note(d) -> str:
    """What the default outlier handling (tdq.outliers) did on this row's model."""
    import tdq

    diag = tdq.get_quantization(d).outliers
    if diag is None:
        return "off"
    smoothed = sum(m._buffers.get("act_smooth") is not None for _, m in tdq.iter_quant_layers(d))
    fb = sum(int((m.act_quantizer.bits >= 16).sum()) for _, m in tdq.iter_quant_layers(d))
    cells = sum(m.act_quantizer.num_buckets for _, m in tdq.iter_quant_layers(d))
    return f"smoothed {smoothed}, A16 cells {fb}/{cells}"


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    n = s["eval_seeds"][1] - s["eval_seeds"][0] + 1
    lines = [
        f"# Low-bit weights on {s['model']} (tdq.rounding)",
        "",
        f"DDIM {s['steps']} steps, {n} eval seeds {s['eval_seeds']}, calibration seeds {s['calibration_seeds']} "
        f"(same for every row), {s['num_buckets']} timestep buckets; {s['layers']}; weights {s['weight']}; "
        f"activations {s['activation']}. GPTQ/output-MSE statistics: FP model through the real sampler on the "
        f"calibration seeds, collected once in {result.get('statistics_s', 'n/a')} s (not included in the "
        "per-row rounding time).",
        "",
        f"Noise floor: FID FP vs FP (other seeds {s['noise_floor_seeds']}) = "
        f"{_f(result.get('noise_floor_fid_fp_vs_fp'))}; PSNR FP vs FP other seeds = "
        f"{_f(result.get('noise_floor_psnr_fp_vs_fp_other_seeds'))} dB.",
        "",
        "Column *outliers*: what the default activation-outlier handling (`tdq.outliers`, SmoothQuant smoothing "
        "only with round-to-nearest weights, 16-bit fallback of the worst (layer, bucket) cells) did; rows marked "
        "*predates* were measured before that default existed (no handling).",
        "",
    ]
    c = s.get("conditioning")
    if c:
        what = (
            f'prompt "{c["prompt_template"]}"' if c.get("prompt_template") else "DiT class label"
        ) + f" with class names {', '.join(c['class_names'])}"
        lines[2:2] = [
            f"Conditioning: seed s gets class s % {len(c['class_names'])} ({what}), classifier-free guidance "
            f"{c['guidance_scale']}, identical for FP and every row (calibration: the same conditioned sampler on "
            f"the calibration seeds). {s['metrics']} ({s['crop']} px cut from each border).",
            "",
        ]
    judged = any("judge" in r for r in result["rows"].values())
    if judged:
        lines += [
            f"Judge ({result.get('judge', 'MNIST judge')}): FP accuracy {100 * result['judge_fp_accuracy']:.1f} % "
            f"on the {n} eval seeds. Δ judge: quantized minus FP accuracy on the same seeds, percentage points, "
            "95% paired bootstrap CI over seeds.",
            "",
        ]
    jh, js = (" judge acc. [%] | Δ judge vs FP [pts] (95% CI) |", "---|---|") if judged else ("", "")
    lines += [
        "| row | W | A | rounding | weight range | PSNR to FP [dB] (95% CI) | LPIPS alex | FID to FP |"
        f"{jh} rounding s | act. calib s | outliers |",
        f"|---|---|---|---|---|---|---|---|{js}---|---|---|",
    ]
    for name, r in result["rows"].items():
        ro = r["rounding"] + ("+act_order" if r["act_order"] else "")
        if r.get("smooth_first"):
            ro += " after smoothing"
        if "adaround" in r:
            ro += f" (from {r['adaround']['init']}, {r['adaround']['iters']} it)"
        if "brecq" in r:
            ro += f" (blocks, from {r['brecq']['init']}, {r['brecq']['iters']} it)"
        ro += "".join(f" + {c}" for c in r.get("corrections", []))
        if "qat" in r:
            ro += f" + LSQ QAT ({r['qat']['steps']} steps, {r['qat_s']} s)"
        if "backend" in r:
            kernels = ", ".join(f"{k} {v}" for k, v in sorted(r["backend"]["kernels"].items()))
            ro += f", run on the {r['backend']['backend']} backend ({kernels})"
        clip = r["clip"] if r["clip"] != "observer" else f"{r['weight_observer']} observer"
        if r.get("levels", "uniform") != "uniform":
            clip += f", {r['levels']} levels"
        jc = ""
        if judged:
            j = r.get("judge")
            jc = (
                f" {100 * j['accuracy']:.1f} | {100 * j['delta']:+.1f} ({100 * j['delta_ci95'][0]:+.1f} to "
                f"{100 * j['delta_ci95'][1]:+.1f}) |"
                if j
                else " n/a | n/a |"
            )
        label = f"{name} (preset)" if "preset" in r else name
        lines.append(
            f"| {label} | {r['weight_bits']} | {r['act_bits']} | {ro} | {clip} | {r['psnr']:.2f} "
            f"({r['psnr_ci95'][0]:.2f}–{r['psnr_ci95'][1]:.2f}) | {r['lpips_alex']:.4f} | {_f(r.get('fid_to_fp'))} "
            f"|{jc} {r['rounding_s']} | {r['activation_calibration_s']} | {r.get('outliers', 'predates')} |"
        )
    groups: dict[str, list[str]] = {}
    for name, r in result["rows"].items():
        e = r.get("env", {})
        key = (
            f"{e.get('cpu', 'unknown CPU')} ({e.get('cpu_capability', '?')}), torch {e.get('torch', '?')}, "
            f"diffusers {e.get('diffusers', '?')}, {e.get('threads', '?')} thread(s)"
        )
        groups.setdefault(key, []).append(name)
    lines += [""]
    for key, names in groups.items():
        lines.append(f"CPU {key}: rows {', '.join(names)}.")
    lines += [
        "",
        "The machines were shared with other jobs (each row's load average is in the JSON), so times are "
        "indicative only.",
        "",
        "Regenerate: `python experiments/lowbit.py"
        + ("" if s["model"] == "mnist-ddpm" else f" --model {s['model']} --rows {','.join(result['rows'])}")
        + (f" --seeds {n}" if n != 64 else "")
        + "` (rows resume from the JSON).",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    path.write_text("\n".join(lines) + "\n")


def _f(v) -> str:
    return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


if __name__ == "__main__":
    main()
