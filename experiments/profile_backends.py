"""Where the time of one denoiser call goes, FP32 eager vs tdq's x86 int8 backend (torch.profiler, self CPU time).

The bench (`bench_backends.py`) gives the ratio; this gives its parts, grouped by operator, for the same models
(random-weight big UNet by default; batch 16, 1 thread, tdq W8A8 defaults calibrated on 10 random calls), so a
latency target can be checked against what the kernels themselves allow: the int8 GEMM kernels' share, the float
operators both models run (softmax, GroupNorm, SiLU, adds, ...) and the int8 model's own overhead (quantize passes,
layout copies, per-call Python). Median of `--repeats` profiled calls per model, after one warm-up call.

    python experiments/profile_backends.py --model big-unet --variant x86_attention
    # -> results/profile_<model>_<variant>.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from _common import env_info  # noqa: E402
from bench_backends import build_model, quantized  # noqa: E402

from tdq.quant.backends import backend_info, get_cpu_capability, to_backend  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# operator name -> group; anything else is "other"
GROUPS = {
    "int8 GEMM kernels": (
        "onednn::qconv2d_pointwise",
        "onednn::qlinear_pointwise",
        "aten::_int_mm",
    ),
    "FP32 GEMMs (conv, linear)": ("aten::mkldnn_convolution", "aten::mm", "aten::addmm", "aten::bmm"),
    "FP32 fused attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "softmax": ("aten::_softmax",),
    "float elementwise (GroupNorm, SiLU, add, mul, div, cat, upsample; int8 attention epilogues)": (
        "aten::native_group_norm",
        "aten::silu",
        "aten::add",
        "aten::add_",
        "aten::cat",
        "aten::upsample_nearest2d",
        "aten::div",
        "aten::mul",
        "aten::sum",
    ),
    "quantize + range guard": ("aten::quantize_per_tensor", "aten::aminmax", "aten::clamp_"),
    "copies (layout, dtype)": ("aten::copy_",),
}


def _group(name: str) -> str:
    for g, names in GROUPS.items():
        if name in names:
            return g
    return "other (dispatch, views, allocation)"


def profile_call(model, x, t, kw, repeats: int) -> dict:
    """Per operator group: median self-CPU ms over `repeats` profiled calls, and the median wall time."""
    with torch.no_grad():
        model(x, t, **kw)
    per_group: dict[str, list[float]] = {}
    walls = []
    for _ in range(repeats):
        with torch.no_grad(), profile() as prof:
            model(x, t, **kw)
        sums: dict[str, float] = {}
        for e in prof.key_averages():
            g = _group(e.key)
            sums[g] = sums.get(g, 0.0) + e.self_cpu_time_total / 1e3
        for g, v in sums.items():
            per_group.setdefault(g, []).append(v)
        walls.append(sum(sums.values()))
    return {
        "total_ms": statistics.median(walls),
        "groups_ms": {g: statistics.median(v) for g, v in sorted(per_group.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="big-unet")
    ap.add_argument("--variant", default="x86", choices=("x86", "x86_attention"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp, shape, extra = build_model(args.model)
    q = quantized(copy.deepcopy(fp), extra, shape, attention=args.variant == "x86_attention")
    to_backend(q, "x86")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(args.batch, *shape, generator=g)
    t = torch.tensor(500)
    kw = extra(args.batch)
    result = {
        "command": "python experiments/profile_backends.py " + " ".join(sys.argv[1:]),
        "env": env_info(),
        "capability": get_cpu_capability(),
        "model": args.model,
        "variant": args.variant,
        "batch": args.batch,
        "threads": 1,
        "choices": backend_info(q)["choices"],
        "fp32": profile_call(fp, x, t, kw, args.repeats),
        args.variant: profile_call(q, x, t, kw, args.repeats),
    }
    fp_total = result["fp32"]["total_ms"]
    groups = sorted(set(result["fp32"]["groups_ms"]) | set(result[args.variant]["groups_ms"]))
    rows = []
    for grp in groups:
        a = result["fp32"]["groups_ms"].get(grp, 0.0)
        b = result[args.variant]["groups_ms"].get(grp, 0.0)
        rows.append({"group": grp, "fp32_ms": a, "int8_ms": b, "int8_share_of_fp32_call": b / fp_total})
    result["rows"] = rows
    result["ratio_profiled"] = result[args.variant]["total_ms"] / fp_total
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{args.model}_{args.variant}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    cap = result["capability"]
    lines = [
        f"# Where the time goes: {args.model}, FP32 eager vs {args.variant}",
        "",
        f"CPU {cap.get('cpu_model', '')} (torch capability {cap.get('torch_cpu_capability', '')}, "
        f"avx512_vnni={cap.get('avx512_vnni')}, amx_int8={cap.get('amx_int8')}), torch {torch.__version__}, "
        f"1 thread, batch {args.batch}; median of {args.repeats} profiled calls (self CPU time per operator).",
        f"Command: `{result['command']}`. Choices: {result['choices']}.",
        "",
        "| operator group | FP32 ms | int8 model ms | int8 model, share of the FP32 call |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['fp32_ms']:.1f} | {r['int8_ms']:.1f} | {r['int8_share_of_fp32_call']:.3f} |"
        )
    lines += [
        f"| **total** | {fp_total:.1f} | {result[args.variant]['total_ms']:.1f} | "
        f"**{result['ratio_profiled']:.3f}** |",
        "",
        "The profiler adds a little per operator; `bench_backends.py` gives the unprofiled ratio.",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
