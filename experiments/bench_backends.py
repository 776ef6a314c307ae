"""Per-denoiser-call latency, resident weight bytes and peak RSS of tdq's backends against FP32 eager.

Models (batch 16, 1 thread): `mnist-ddpm` (tdq.zoo, 1x28x28), `big-unet` (random-weight
`UNet2DModel(block_out_channels=(128, 256, 256, 256))`, 3x32x32, 38 M params) and `sd-half` (random-weight
half-width SD-1.5-shaped `UNet2DConditionModel(block_out_channels=(160, 320, 640, 640))`, 4x32x32 latents (a
256-pixel image), 77x768 text states, 220 M params). Quantized variants are W8A8 (tdq defaults: per-channel
symmetric int8 weights, affine uint8 activations, 10 timestep buckets) calibrated on 10 denoiser calls
(t = 0, 100, ..., 900, batch 2, random inputs: enough for timing, not for quality); `weight_only_int4` uses W4A8.

Variants: `fp32` (eager, the reference), `fp32_compile` (`torch.compile`, optional), `simulate` (tdq's fake
quantization), `x86` (oneDNN int8 kernels), `x86_attention` (x86 with `TDQConfig(attention=True)`: int8 attention
matmuls), `weight_only_int8`, `weight_only_int4`, `torchao_int8_dyn` (if
torchao is importable). Each variant is timed in interleaved pairs with FP32 (order alternating), and the ratio
per pair is reported as median and min: the machine is shared, so single timings are noisy.

Peak RSS: one fresh subprocess per (model, variant, repeat) builds the model, frees what it no longer holds, resets
the peak (`/proc/self/clear_refs`), runs a short DDIM sampler (3 steps, batch 16) and reads `VmHWM`; each variant runs
`--rss-repeats` times (interleaved with the others) and the median is reported. `--rss-method saved` (default) is
deployment: the float model is built as for FP32 and a saved quantization (written once per config by a separate
process) is loaded straight into the backend (`load_quantization(model, dir, backend=...)`, no calibration in the
process); `--rss-method calibrate` quantizes, calibrates and converts in the measured process.

    python experiments/bench_backends.py                       # all models, writes results/backends.{json,md}
    python experiments/bench_backends.py --models big-unet --pairs 5
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python experiments/bench_backends.py ...   # AVX2 emulated
    python experiments/bench_backends.py --models mnist-ddpm --variants none --rss-variants fp32,x86 \
        --rss-method calibrate --rss-repeats 7 --row-set "..."  # peak RSS only; its own row set (one per method)

Results keep one row set per machine (label: CPU model, best int8 ISA, ISA-limiting environment; `--row-set` names
it), so runs on different CPUs add to the same files instead of replacing each other. A row set keeps one peak-RSS
record per (model, variant): runs with the other `--rss-method` go into a row set of their own.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tdq
from tdq.quant.backends import backend_info, get_cpu_capability, resident_bytes, to_backend

RESULTS = Path(__file__).parent / "results"
MODELS = ("mnist-ddpm", "big-unet", "sd-half")
VARIANTS = (
    "fp32_compile",
    "simulate",
    "x86",
    "x86_attention",
    "weight_only_int8",
    "weight_only_int4",
    "torchao_int8_dyn",
)


def build_model(name: str):
    """`(fp32 model, sample shape, extra call kwargs for batch b)`, deterministic."""
    torch.manual_seed(0)
    if name == "mnist-ddpm":
        import tdq.zoo

        unet = tdq.zoo.load("mnist-ddpm").unet
        return unet.eval(), (1, 28, 28), lambda b: {}
    if name == "big-unet":
        from diffusers import UNet2DModel

        unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256)
        )
        return unet.eval(), (3, 32, 32), lambda b: {}
    if name == "sd-half":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(
            sample_size=32, block_out_channels=(160, 320, 640, 640), cross_attention_dim=768
        )
        g = torch.Generator().manual_seed(1)
        ehs = torch.randn(1, 77, 768, generator=g)
        return (
            unet.eval(),
            (4, 32, 32),
            lambda b: {"encoder_hidden_states": ehs.expand(b, -1, -1).contiguous()},
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def quantized(model, extra, shape, weight_bits: int = 8, attention: bool = False):
    """Quantize `model` in place with tdq defaults (W`weight_bits`A8) and calibrate on 10 random calls."""
    cfg = tdq.TDQConfig(attention=attention)
    cfg.weight.bits = weight_bits
    tdq.quantize_(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad(), tdq.calibration(model):
        for t in range(0, 1000, 100):
            model(torch.randn(2, *shape, generator=g), torch.tensor(t), **extra(2))
    return model


def make_variant(variant: str, fp, shape, extra):
    """The model for `variant` (built from `fp` in place) and a note."""
    if variant == "fp32":
        return fp, ""
    if variant == "fp32_compile":
        t0 = time.perf_counter()
        cm = torch.compile(fp)
        with torch.no_grad():
            cm(torch.randn(16, *shape), torch.tensor(500), **extra(16))
        return cm, f"compiled in {time.perf_counter() - t0:.0f} s (inductor, 1 thread)"
    if variant == "torchao_int8_dyn":
        if importlib.util.find_spec("torchao") is None:
            raise RuntimeError("torchao not installed (optional [baselines] extra)")
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(fp, Int8DynamicActivationInt8WeightConfig())
        return fp, f"torchao {torchao.__version__}, eager, Linear layers only (convs stay FP32)"
    bits = 4 if variant == "weight_only_int4" else 8
    q = quantized(fp, extra, shape, weight_bits=bits, attention=variant == "x86_attention")
    if variant != "simulate":
        to_backend(q, variant.removesuffix("_attention"))
    return q, "TDQConfig(attention=True): int8 QK^T and softmax-V" if variant == "x86_attention" else ""


def _call(model, x, t, kw):
    with torch.no_grad():
        return model(x, t, **kw)


def time_pairs(fp, var, x, t, kw, pairs: int) -> dict:
    """Interleaved pairs (order alternating); per-pair ratio var/fp."""
    _call(fp, x, t, kw)
    _call(var, x, t, kw)
    fps, vs, ratios = [], [], []
    for i in range(pairs):
        order = (fp, var) if i % 2 == 0 else (var, fp)
        times = {}
        for m in order:
            t0 = time.perf_counter()
            _call(m, x, t, kw)
            times[id(m)] = time.perf_counter() - t0
        fps.append(times[id(fp)])
        vs.append(times[id(var)])
        ratios.append(times[id(var)] / times[id(fp)])
    return {
        "pairs": pairs,
        "fp32_s_median": statistics.median(fps),
        "variant_s_median": statistics.median(vs),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratios": ratios,
    }


# ---------------------------------------------------------------------------------------------------- RSS child
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


RSS_METHODS = ("saved", "calibrate")


def _variant_config(variant: str) -> tuple[int, bool]:
    """`(weight bits, attention)` of a quantized variant."""
    return (4 if variant == "weight_only_int4" else 8), variant == "x86_attention"


def save_child(model_name: str, variant: str, directory: str) -> dict:
    """Quantize and calibrate `model_name` as `make_variant` does for `variant`, and save the state."""
    from tdq.serialization import save_quantization

    fp, shape, extra = build_model(model_name)
    bits, attention = _variant_config(variant)
    save_quantization(quantized(fp, extra, shape, weight_bits=bits, attention=attention), directory)
    return {"saved": directory}


def load_variant(variant: str, fp, directory: str):
    """`fp` with the saved quantization in `directory` loaded onto `variant`'s backend (the simulator for
    `simulate`): what a deployment does, no calibration."""
    from tdq.serialization import load_quantization

    backend = None if variant == "simulate" else variant.removesuffix("_attention")
    return load_quantization(fp, directory, backend=backend)


def rss_child(
    model_name: str, variant: str, batch: int, steps: int, method: str = "calibrate", saved: str = ""
) -> dict:
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler

    fp, shape, extra = build_model(model_name)
    if method == "saved" and variant != "fp32":
        m = load_variant(variant, fp, saved)
    else:
        m, _ = make_variant(variant, fp, shape, extra)
    del fp
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, *shape, generator=g)
    kw = extra(batch)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = m(x, t, **kw).sample
            x = sched.step(eps, t, x).prev_sample
    out = {
        "rss_before_run_kb": before,
        "peak_rss_run_kb": _status_kb("VmHWM"),
        "resident_bytes": resident_bytes(m),
        "finite": bool(torch.isfinite(x).all()),
    }
    if variant != "fp32":
        info = backend_info(m)
        out.update(backend=info["backend"], kernels=info["kernels"], choices=info.get("choices", {}))
    return out


def compile_child(model_name: str, batch: int, pairs: int) -> dict:
    """fp32_compile in its own process (so a compile that takes too long can be stopped)."""
    torch.set_num_threads(1)
    fp, shape, extra = build_model(model_name)
    cm, note = make_variant("fp32_compile", build_model(model_name)[0], shape, extra)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, *shape, generator=g)
    return {"note": note, "timing": time_pairs(fp, cm, x, torch.tensor(500), extra(batch), pairs)}


def compile_of(model_name: str, batch: int, pairs: int, timeout_s: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--compile-child",
        model_name,
        "--batch",
        str(batch),
        "--pairs",
        str(pairs),
    ]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {
            "skipped": f"compile + {pairs} timed pairs did not finish within {timeout_s:.0f} s on the shared "
            "machine (1 thread); stopped"
        }
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc={p.returncode}"
        return {"skipped": f"compile failed after {time.perf_counter() - t0:.0f} s: {tail}"[:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(args: list[str]) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc={p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def rss_of(
    model_name: str, variants: list[str], batch: int, steps: int, method: str, repeats: int, workdir: str
) -> dict:
    """Peak RSS of a sampler run per variant: `repeats` fresh processes each, interleaved, median reported."""
    saved = {}
    if method == "saved":
        for v in variants:
            key = _variant_config(v)
            if v != "fp32" and key not in saved:
                saved[key] = str(Path(workdir) / f"{model_name}_w{key[0]}{'_attn' if key[1] else ''}")
                r = _child(["--save-child", model_name, v, saved[key]])
                if "error" in r:
                    return {v: {"error": "save: " + r["error"]} for v in variants}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(repeats):
        # alternate the order so slow drifts of the shared machine hit every variant alike
        for v in variants if i % 2 == 0 else variants[::-1]:
            args = ["--rss-child", model_name, v, "--batch", str(batch), "--steps", str(steps)]
            args += ["--rss-method", method, "--saved", saved.get(_variant_config(v), "")]
            runs[v].append(_child(args))
    out = {}
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[v] = rs[0]
            continue
        peaks = [r["peak_rss_run_kb"] for r in ok]
        med = sorted(ok, key=lambda r: r["peak_rss_run_kb"])[len(ok) // 2]
        out[v] = dict(med, peak_rss_run_kb=statistics.median(peaks), peak_rss_runs_kb=peaks, method=method)
    return out


# ---------------------------------------------------------------------------------------------------- kernels
def kernel_microbench() -> dict:
    """Single GEMMs at diffusion sizes (M = 16 x 64 tokens): why weight-only packed kernels are not used here."""
    out = {}
    m, k, n = 1024, 640, 640
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    s = w.abs().amax(1) / 127
    q = torch.round(w / s[:, None]).to(torch.int8)

    def best(f, r=5):
        f()
        ts = []
        for _ in range(r):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    fp = best(lambda: torch.nn.functional.linear(x, w))
    out["shape_MKN"] = [m, k, n]
    out["fp32_ms"] = fp * 1e3
    out["dequant_then_fp32_ratio"] = best(lambda: torch.nn.functional.linear(x, q.float() * s[:, None])) / fp
    try:
        out["aten._weight_int8pack_mm_ratio"] = (
            best(lambda: torch.ops.aten._weight_int8pack_mm(x, q, s), 2) / fp
        )
    except Exception as e:  # noqa: BLE001 - record whatever this build says
        out["aten._weight_int8pack_mm_ratio"] = f"failed: {e}"[:200]
    xs, zp = float(x.abs().max() / 127), 128
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    zeros = torch.zeros(n, dtype=torch.long)

    def onednn():
        xq = x.mul(1 / xs).round_().add_(zp).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            xq, xs, zp, packed, s, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )

    out["onednn.qlinear_pointwise_with_quantize_ratio"] = best(onednn) / fp
    qt = q.t().contiguous()

    def intmm():
        xq = x.mul(1 / xs).round_().clamp_(-127, 127).to(torch.int8)
        return torch._int_mm(xq, qt).float() * (s * xs)

    out["aten._int_mm_with_quantize_ratio"] = best(intmm) / fp
    return out


def row_set_label(cap: dict) -> str:
    """The label of a machine's rows: CPU model, best int8 ISA, and the ISA-limiting environment if set."""
    isa = cap.get("isa") or ("amx" if cap["amx_int8"] else "avx512_vnni" if cap["avx512_vnni"] else "avx2")
    label = f"{cap['cpu_model']} ({isa}{'' if cap['amx_int8'] else ', no AMX'})"
    env = [
        f"{k}={cap[v]}"
        for k, v in (
            ("ATEN_CPU_CAPABILITY", "aten_cpu_capability"),
            ("ONEDNN_MAX_CPU_ISA", "onednn_max_cpu_isa"),
        )
        if cap.get(v)
    ]
    return label + (f", emulated with {' '.join(env)}" if env else "")


def _md(result: dict) -> str:
    lines = [
        "# Backends: per-call latency and memory vs FP32 eager",
        "",
        "One table per machine (row set); each names its CPU, ISA and the command that produced it. Ratios are per "
        "interleaved pair with FP32 on the same machine (median, min); the machines were shared with other jobs.",
        "",
    ]
    for label, rs in result["row_sets"].items():
        lines += _md_row_set(label, rs)
    return "\n".join(lines)


def _md_row_set(label: str, result: dict) -> list[str]:
    cap = result["capability"]
    lines = [
        f"## {label}",
        "",
        f"CPU: {cap['cpu_model']} (torch capability {cap['torch_cpu_capability']}, avx512_vnni={cap['avx512_vnni']}, "
        f"amx_int8={cap['amx_int8']}), torch {cap['torch_version']}, {result['threads']} thread, batch "
        f"{result['batch']}.",
        f"Command: `{result['command']}`",
        "",
    ]
    if result.get("notes"):
        lines += [f"Notes: {result['notes']}", ""]
    lines += [
        "| model | variant | time ratio median | min | pairs | resident bytes ratio | peak RSS of run ratio | kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mname, mres in result["models"].items():
        rss_fp = (mres.get("rss", {}).get("fp32") or {}).get("peak_rss_run_kb")
        # variants with a peak-RSS row only (`--variants none`): no timing, kernels from the RSS run
        rss_only = {v: r for v, r in mres.get("rss", {}).items() if v not in mres["variants"] and v != "fp32"}
        for v, r in {**mres["variants"], **rss_only}.items():
            if "skipped" in r:
                lines.append(f"| {mname} | {v} | skipped: {r['skipped']} | | | | | |")
                continue
            t = r.get("timing", {})
            rss_rec = mres.get("rss", {}).get(v) or {}
            rss = rss_rec.get("peak_rss_run_kb")
            rss_ratio = ""
            if rss and rss_fp and rss > 0:
                n = len(rss_rec.get("peak_rss_runs_kb", [rss]))
                how = f", {rss_rec['method']}, median of {n}" if "method" in rss_rec else ""
                rss_ratio = f"{rss / rss_fp:.3f} ({rss / 1024:.0f}/{rss_fp / 1024:.0f} MB{how})"
            kern = ", ".join(f"{k}: {n}" for k, n in (r.get("kernels") or rss_rec.get("kernels", {})).items())
            kern = kern or r.get("note", "")
            if r.get("choices", {}).get("conv_output"):
                kern += "; conv output " + r["choices"]["conv_output"].split(":")[0]
            bytes_ratio = f"{r['resident_bytes_ratio']:.3f}" if "resident_bytes_ratio" in r else ""
            lines.append(
                f"| {mname} | {v} | {t.get('ratio_median', 1.0):.2f} | {t.get('ratio_min', 1.0):.2f} | "
                f"{t.get('pairs', '')} | {bytes_ratio} | {rss_ratio} | {kern} |"
                if v not in rss_only
                else f"| {mname} | {v} | (not timed) | | | | {rss_ratio} | {kern} |"
            )
    lines += [
        "",
        "Kernel micro-benchmark (one GEMM, ratio to FP32):",
        "",
        "```",
        json.dumps(result["kernel_microbench"], indent=1),
        "```",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="DDIM steps of the RSS sampler run")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--compile-models", default="mnist-ddpm,big-unet", help="models that get fp32_compile")
    ap.add_argument(
        "--compile-timeout", type=float, default=900.0, help="seconds for compile + its timed pairs"
    )
    ap.add_argument("--rss-variants", default="fp32,simulate,x86,weight_only_int8,weight_only_int4")
    ap.add_argument(
        "--rss-method",
        choices=RSS_METHODS,
        default="saved",
        help="saved: load a saved quantization into the backend (deployment); calibrate: calibrate in-process",
    )
    ap.add_argument(
        "--rss-repeats", type=int, default=3, help="fresh processes per variant (median reported)"
    )
    ap.add_argument("--rss-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--save-child", nargs=3, metavar=("MODEL", "VARIANT", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--saved", default="", help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "backends.json"))
    ap.add_argument(
        "--row-set",
        default="",
        help="label of this machine's rows (default: CPU model, ISA, ISA-limiting env)",
    )
    ap.add_argument("--notes", default="", help="notes stored with this row set (e.g. machine load)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        print(json.dumps(rss_child(*args.rss_child, args.batch, args.steps, args.rss_method, args.saved)))
        return
    if args.save_child:
        print(json.dumps(save_child(*args.save_child)))
        return
    if args.compile_child:
        print(json.dumps(compile_child(args.compile_child, args.batch, args.pairs)))
        return

    out_path = Path(args.out)
    whole = json.loads(out_path.read_text()) if out_path.exists() else {}
    if "models" in whole:  # a file from before row sets: one machine's rows at the top level
        whole = {"row_sets": {row_set_label(whole["capability"]): whole}}
    whole.setdefault("row_sets", {})
    cap = get_cpu_capability()
    label = args.row_set or row_set_label(cap)
    result = whole["row_sets"].setdefault(label, {})
    env = " ".join(
        f"{k}={cap[v]}"
        for k, v in (
            ("ATEN_CPU_CAPABILITY", "aten_cpu_capability"),
            ("ONEDNN_MAX_CPU_ISA", "onednn_max_cpu_isa"),
        )
        if cap.get(v)
    )
    command = (env + " " if env else "") + "python experiments/bench_backends.py " + shlex.join(sys.argv[1:])
    result["commands"] = [c for c in result.get("commands", [result.get("command")]) if c] + [command]
    if args.notes:
        result["notes"] = args.notes
    result.update(
        command=" && ".join(result["commands"]),
        capability=cap,
        threads=1,
        batch=args.batch,
        kernel_microbench=kernel_microbench(),
    )
    result.setdefault("models", {})
    for mname in args.models.split(","):
        fp, shape, extra = build_model(mname)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(args.batch, *shape, generator=g)
        t = torch.tensor(500)
        kw = extra(args.batch)
        fp_bytes = resident_bytes(fp)
        # variants measured before (another invocation) are kept; the ones run now replace theirs
        mres = result["models"].get(mname, {})
        mres.update(params=sum(p.numel() for p in fp.parameters()), sample_shape=list(shape))
        mres.setdefault("variants", {})
        print(f"== {mname}: {mres['params'] / 1e6:.1f} M params", flush=True)
        for v in [v for v in args.variants.split(",") if v not in ("", "none")]:
            if v == "fp32_compile":
                if mname not in args.compile_models.split(","):
                    mres["variants"][v] = {"skipped": "not requested (--compile-models)"}
                else:
                    mres["variants"][v] = compile_of(mname, args.batch, args.pairs, args.compile_timeout)
                print(f"  {v}: {mres['variants'][v]}", flush=True)
                continue
            fresh, _, _ = build_model(mname)
            try:
                var, note = make_variant(v, fresh, shape, extra)
            except Exception as e:  # noqa: BLE001 - optional variants record why they did not run
                mres["variants"][v] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
                print(f"  {v}: skipped ({e})", flush=True)
                continue
            r = {"note": note, "timing": time_pairs(fp, var, x, t, kw, args.pairs)}
            if v not in ("fp32_compile", "torchao_int8_dyn"):
                info = backend_info(var)
                r["backend"] = info["backend"]
                r["kernels"] = info["kernels"]
                r["choices"] = info.get("choices", {})
                r["fallback_layers"] = {n: rec for n, rec in info["layers"].items() if rec["reason"]}
                with torch.no_grad():
                    ref = fp(x, t, **kw).sample
                    got = var(x, t, **kw).sample
                r["rel_l2_vs_fp32"] = float((got - ref).norm() / ref.norm())
            r["resident_bytes"] = resident_bytes(var)
            r["resident_bytes_ratio"] = r["resident_bytes"] / fp_bytes
            mres["variants"][v] = r
            print(
                f"  {v}: ratio median {r['timing']['ratio_median']:.3f} min {r['timing']['ratio_min']:.3f} "
                f"bytes {r['resident_bytes_ratio']:.3f} {r.get('kernels', '')}",
                flush=True,
            )
            del var, fresh
            gc.collect()
        if not args.no_rss:
            mres.setdefault("rss", {})
            with tempfile.TemporaryDirectory(prefix="tdq_bench_rss_") as work:
                rss = rss_of(
                    mname,
                    args.rss_variants.split(","),
                    args.batch,
                    args.steps,
                    args.rss_method,
                    args.rss_repeats,
                    work,
                )
            for v, r in rss.items():
                mres["rss"][v] = r
                print(f"  rss {v}: {r}", flush=True)
        mres["fp32_resident_bytes"] = fp_bytes
        result["models"][mname] = mres
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(whole, indent=1) + "\n")
        out_path.with_suffix(".md").write_text(_md(whole))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
