"""Whole-sampler agreement of the x86 int8 backend with the simulator, against the float-rounding noise floor.

mnist-ddpm (tdq.zoo), tdq W8A8 defaults, calibrated on 8 seeds (DDIM 20), then DDIM 20 from the same initial noise
for every seed in each variant. PSNR (samples clamped to [-1, 1], peak-to-peak 2) of each row's pair, pooled over
the seeds and per seed (min, median, bootstrap CI of the mean).

Rows:
- `simulate vs fp32`, `x86 vs fp32`: quality of the quantized model, simulated and on int8 kernels.
- `simulate vs simulate, x_T nudged by 1 ulp`: the simulator against itself with every initial-noise value moved
  by one float32 ulp: how far last-bit differences carry through a quantized sampler (a rounding boundary crossed
  once flips one activation code, which flips more codes in the next layers).
- `simulate vs simulate, every layer output nudged by 1 ulp`: the same with each quantized layer's output moved by
  one ulp on every call: last-bit differences at every layer and step, as a real kernel's different summation
  order makes them (the floor no backend without the simulator's exact float sums can beat).
- `x86 vs simulate`: the int8 backend (exact int32 sums) against the simulator (float sums), with the model run
  channels-last (the default on AVX-512 VNNI/AMX CPUs) and with int8 convolution outputs converted back to NCHW
  (the default elsewhere).
- `... attention`: the same with `TDQConfig.attention` on (quantized QK^T and softmax-V inputs).

    python experiments/backend_psnr.py --seeds 32     # writes results/backend_psnr.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bootstrap_ci, env_info  # noqa: E402

import tdq  # noqa: E402
from tdq.quant.backends import to_backend  # noqa: E402
from tdq.quant.backends import x86 as x86_mod  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def sample(unet, seeds, steps: int = 20, nudge: bool = False) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in seeds])
    if nudge:
        x = torch.nextafter(x, torch.full_like(x, float("inf")))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x.contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()


def row(name: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    per = torch.tensor([psnr(x, y) for x, y in zip(a, b, strict=True)])
    return {
        "row": name,
        "psnr_pooled_db": psnr(a, b),
        "psnr_per_seed_min_db": float(per.min()),
        "psnr_per_seed_median_db": float(per.median()),
        "psnr_per_seed_mean_ci95": bootstrap_ci(per.clamp(max=100.0)),
        "psnr_per_seed": per.tolist(),
    }


def quantized(fp, attention: bool, calib_seeds):
    cfg = tdq.TDQConfig()
    if attention:
        cfg.attention = True
    model = tdq.quantize_(copy.deepcopy(fp), cfg)  # a copy of the float model (not of a quantized one)
    with tdq.calibration(model):
        sample(model, calib_seeds)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--layer-nudge", action="store_true", help="add the every-layer 1-ulp row")
    ap.add_argument("--out", default=str(RESULTS / "backend_psnr.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import tdq.zoo

    fp = tdq.zoo.load("mnist-ddpm").unet.eval()
    seeds = list(range(args.seeds))
    calib = list(range(1000, 1008))
    rows = []
    ref = sample(fp, seeds, args.steps)
    rows.append(row("fp32 vs fp32, x_T nudged by 1 ulp", sample(fp, seeds, args.steps, True), ref))
    for attention in [False] + ([] if args.no_attention else [True]):
        tag = " attention" if attention else ""
        # every variant is quantized and calibrated afresh (deterministic: the same scales); a deep copy of a
        # quantized diffusers model would still run the original through its copied timestep hook
        q = quantized(fp, attention, calib)
        sim = sample(q, seeds, args.steps)
        rows.append(row("simulate vs fp32" + tag, sim, ref))
        rows.append(
            row("simulate vs simulate, x_T nudged by 1 ulp" + tag, sample(q, seeds, args.steps, True), sim)
        )
        if args.layer_nudge:
            hooks = [
                m.register_forward_hook(
                    lambda mod, a, out: torch.nextafter(out, torch.full_like(out, float("inf")))
                )
                for _, m in tdq.iter_quant_layers(q)
            ]
            nudged = sample(q, seeds, args.steps)
            for h in hooks:
                h.remove()
            rows.append(row("simulate vs simulate, every layer output nudged by 1 ulp" + tag, nudged, sim))
        for keep in (True, False):
            x86_mod.KEEP_CHANNELS_LAST = keep
            real = to_backend(quantized(fp, attention, calib), "x86")
            what = "channels-last kept" if keep else "NCHW restored"
            out = sample(real, seeds, args.steps)
            rows.append(row(f"x86 ({what}) vs simulate" + tag, out, sim))
            rows.append(row(f"x86 ({what}) vs fp32" + tag, out, ref))
        x86_mod.KEEP_CHANNELS_LAST = False
        for r in rows[-7:]:
            print(
                f"{r['row']}: pooled {r['psnr_pooled_db']:.1f} dB, per-seed min {r['psnr_per_seed_min_db']:.1f}"
            )
    result = {
        "command": "python experiments/backend_psnr.py " + " ".join(sys.argv[1:]),
        "env": env_info(),
        "model": "mnist-ddpm",
        "sampler": f"DDIM {args.steps}",
        "seeds": seeds,
        "calibration_seeds": calib,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# x86 int8 backend vs simulator: whole-sampler PSNR",
        "",
        f"mnist-ddpm, W8A8 defaults, {result['sampler']}, {len(seeds)} seeds; CPU {result['env']['cpu']} "
        f"({result['env']['cpu_capability']}), torch {result['env']['torch']}, 1 thread.",
        f"Command: `{result['command']}`",
        "",
        "| pair | PSNR pooled dB | per-seed min | per-seed median | per-seed mean 95 % CI |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["psnr_per_seed_mean_ci95"]
        lines.append(
            f"| {r['row']} | {r['psnr_pooled_db']:.1f} | {r['psnr_per_seed_min_db']:.1f} | "
            f"{r['psnr_per_seed_median_db']:.1f} | [{lo:.1f}, {hi:.1f}] |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
