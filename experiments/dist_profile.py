"""Sharded sensitivity profiling: wall time of one Fisher profile of mnist-ddpm on 1 vs 2 processes, and equality.

The same `profile_sensitivity` call (the bundled mnist-ddpm UNet, clean samples drawn from the MNIST training set,
10 buckets) runs once in a single process and once sharded across 2 gloo CPU processes launched by
`accelerate launch` (one thread each, as `tdq run` under accelerate shards it). Each process times its own
profile call (after a warm-up forward); the 2-process time is the slowest rank's. The sharded profile is checked
bit for bit against the single-process one (every field of every layer), and the wall-time ratio is written to
`experiments/results/dist_profile.{json,md}` with the CPU and versions.

On a shared 2-core machine the two ranks compete with anything else running, so the ratio is only indicative
there; the load average at the start is recorded.

Usage::

    python experiments/dist_profile.py                    # 64 samples per bucket, batch 16
    python experiments/dist_profile.py --samples-per-bucket 16 --out /tmp/dp   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tdq, not another install's
from _common import env_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("act_fisher", "act_range", "weight_fisher", "weight_range", "macs", "num_samples")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One process's profile (sharded when launched under torch.distributed); rank 0 saves it and the timings."""
    import torch.distributed as dist

    import tdq.zoo
    from tdq.mixed_precision.fisher import profile_sensitivity
    from tdq.zoo.data import load_mnist

    torch.set_num_threads(1)
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded:
        dist.init_process_group("gloo")
    pipe = tdq.zoo.load("mnist-ddpm")
    unet = pipe.unet.eval()
    images, _ = load_mnist("train")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(images), generator=g)[: args.num_x0]
    x0 = torch.as_tensor(images[idx.numpy()]).float() * 2 - 1  # [0, 1] -> the model's [-1, 1]
    size = unet.config.sample_size
    if x0.shape[-1] != size:
        x0 = torch.nn.functional.interpolate(x0, size=(size, size), mode="bilinear", align_corners=False)
    grid = {"units": "train_timestep", "num_buckets": args.buckets, "t_min": 0.0, "t_max": 999.0}
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection out of the timing
        unet(x0[:2], torch.tensor([500, 500]))
    if sharded:
        dist.barrier()
    t0 = time.perf_counter()
    prof = profile_sensitivity(
        unet,
        pipe.scheduler,
        x0,
        grid,
        samples_per_bucket=args.samples_per_bucket,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        shard=None,
    )
    seconds = time.perf_counter() - t0
    times = [seconds]
    if sharded:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, seconds)
        times = out
    rank = dist.get_rank() if sharded else 0
    if rank == 0:
        prof.save(Path(args.worker_out) / "profile")
        (Path(args.worker_out) / "times.json").write_text(
            json.dumps({"seconds_per_rank": times, "distribution": prof.meta.get("distribution")})
        )
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def launch(args: argparse.Namespace, procs: int, out: Path) -> dict:
    """Run `worker` in `procs` processes (accelerate launch for 2+), return its timings."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    wargs = [
        "--worker-out", str(out), "--samples-per-bucket", str(args.samples_per_bucket),
        "--batch-size", str(args.batch_size), "--buckets", str(args.buckets), "--seed", str(args.seed),
        "--num-x0", str(args.num_x0),
    ]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, __file__, *wargs]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), __file__, *wargs,
        ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{procs}-process profile failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rec = json.loads((out / "times.json").read_text())
    rec["process_wall_seconds"] = time.perf_counter() - t0
    return rec


def compare(a: Path, b: Path) -> dict:
    """Bit-equality of two saved profiles, field by field and layer by layer."""
    from tdq.mixed_precision.profile import SensitivityProfile

    pa, pb = SensitivityProfile.load(a), SensitivityProfile.load(b)
    if list(pa.layers) != list(pb.layers):
        return {"equal": False, "why": "different layer lists"}
    diffs = []
    for field in FIELDS:
        x, y = getattr(pa, field), getattr(pb, field)
        if x.shape != y.shape:
            diffs.append(f"{field} (shape {tuple(x.shape)} vs {tuple(y.shape)})")
            continue
        if x.dim() and x.shape[0] == len(pa.layers):  # layer-major tensors: name the layers that differ
            diffs += [f"{field}[{n}]" for i, n in enumerate(pa.layers) if not torch.equal(x[i], y[i])]
        elif not torch.equal(x, y):
            diffs.append(field)
    return {"equal": not diffs, "differing": diffs[:20], "layers": len(pa.layers), "fields": list(FIELDS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-per-bucket", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--num-x0", type=int, default=256, help="clean MNIST training images (cycled by the profile)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="interleaved (1-process, 2-process) pairs")
    ap.add_argument("--out", default=None, help="result stem (default experiments/results/dist_profile)")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return 0
    import tempfile

    stem = Path(args.out) if args.out else RESULTS / "dist_profile"
    env = env_info()
    pairs, equal = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            one = launch(args, 1, Path(tmp) / f"p1_{i}")
            two = launch(args, 2, Path(tmp) / f"p2_{i}")
            t1, t2 = max(one["seconds_per_rank"]), max(two["seconds_per_rank"])
            pairs.append(
                {
                    "one_process_s": t1,
                    "two_process_s": t2,
                    "ratio": t2 / t1,
                    "two_ranks_s": two["seconds_per_rank"],
                }
            )
            equal.append(compare(Path(tmp) / f"p1_{i}" / "profile", Path(tmp) / f"p2_{i}" / "profile"))
            print(
                f"pair {i}: 1 proc {t1:.1f} s, 2 procs {t2:.1f} s, ratio {t2 / t1:.3f}, equal {equal[-1]['equal']}"
            )
            dist_meta = two.get("distribution")
    ratios = sorted(p["ratio"] for p in pairs)
    result = {
        "command": "python experiments/dist_profile.py"
        + "".join(
            f" --{k.replace('_', '-')} {getattr(args, k)}"
            for k in ("samples_per_bucket", "batch_size", "buckets", "seed", "num_x0", "repeats", "out")
            if getattr(args, k) != ap.get_default(k)
        ),
        "settings": {
            k: getattr(args, k) for k in ("samples_per_bucket", "batch_size", "buckets", "seed", "num_x0")
        },
        "model": "mnist-ddpm",
        "pairs": pairs,
        "median_ratio": ratios[len(ratios) // 2]
        if len(ratios) % 2
        else sum(ratios[len(ratios) // 2 - 1 :][:2]) / 2,
        "bit_equal": all(e["equal"] for e in equal),
        "equality": equal,
        "distribution_2proc": dist_meta,
        "env": env,
        "cores": os.cpu_count(),
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    rows = "\n".join(
        f"| {i} | {p['one_process_s']:.1f} | {p['two_process_s']:.1f} ({', '.join(f'{s:.1f}' for s in p['two_ranks_s'])}) "
        f"| {p['ratio']:.3f} |"
        for i, p in enumerate(pairs)
    )
    md = f"""# Sharded sensitivity profiling (mnist-ddpm Fisher profile, 1 vs 2 processes)

`{result["command"]}`: {args.buckets} buckets x {args.samples_per_bucket} samples per bucket, batch {args.batch_size},
one thread per process, 2 gloo CPU processes under `accelerate launch`; interleaved pairs.

| pair | 1 process [s] | 2 processes [s] (per rank) | ratio 2 / 1 |
|---|---|---|---|
{rows}

Median ratio: **{result["median_ratio"]:.3f}**. Sharded profile bit-equal to the single-process one (every field of
every layer): **{result["bit_equal"]}**.

CPU: {env["cpu"]} ({env["cpu_capability"]}), {os.cpu_count()} cores, torch {env["torch"]}, diffusers
{env["diffusers"]}; load average at start {tuple(round(x, 2) for x in env["load_average_at_start"])} (a shared
machine: the two ranks compete with other jobs for its cores, so the ratio is indicative only).
"""
    Path(f"{stem}.md").write_text(md)
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
