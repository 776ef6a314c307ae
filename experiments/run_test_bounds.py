"""Where the bounds of `tests/test_run_mnist.py` come from: `tdq run` on mnist-ddpm at the test's size, repeated.

The test runs mnist-ddpm with 8 evaluation seeds, 10 DDIM steps and 4 calibration samples, and bounds PSNR, LPIPS
and the final drift of W8A8 (timestep-aware), and checks that static (one bucket) scores worse than timestep-aware
at 6-bit activations. This script runs the same three configurations on several disjoint evaluation and
calibration seed sets (`--repeats`), so the test's bounds can be set at about twice the measured error and the
static-vs-timestep-aware sign checked for robustness at that size.

Usage::

    python experiments/run_test_bounds.py            # 4 repeats -> experiments/results/run_test_bounds.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tdq, not another install's
from _common import env_info  # noqa: E402

from tdq.testing.runs import MNIST_TEST_RUN, compose_run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The test's size (shared with tests/test_run_mnist.py).
SMALL = list(MNIST_TEST_RUN)
ROWS = {
    "tdq-w8a8": ["quant=w8a8"],
    "tdq-w8a6": ["quant=w8a8", "quant.activation.bits=6"],
    "static-w8a8": ["quant=w8a8-static"],
    "static-w8a6": ["quant=w8a8-static", "quant.activation.bits=6"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every row")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tdq.run.job import run_experiment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            seeds = [f"eval.seed={1000 * r}", f"calibration.seed={100000 + 1000 * r}"]
            for name, extra in ROWS.items():
                cfg = compose_run([*SMALL, *seeds, *extra, *args.extra, f"eval.cache_dir={tmp}/cache"])
                rep = run_experiment(cfg, Path(tmp) / f"{name}-{r}")
                rows.append(
                    {
                        "row": name,
                        "repeat": r,
                        "eval_seed": 1000 * r,
                        "psnr": rep["psnr"],
                        "lpips_alex": rep["lpips_alex"],
                        "drift_final": rep["drift"][-1],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for name in ROWS:
        sel = [x for x in rows if x["row"] == name]
        summary[name] = {
            k: {"min": min(x[k] for x in sel), "max": max(x[k] for x in sel)}
            for k in ("psnr", "lpips_alex", "drift_final")
        }
    margins = [
        next(x for x in rows if x["row"] == "tdq-w8a6" and x["repeat"] == r)["psnr"]
        - next(x for x in rows if x["row"] == "static-w8a6" and x["repeat"] == r)["psnr"]
        for r in range(args.repeats)
    ]
    out = {
        "settings": [*SMALL, *args.extra],
        "rows": rows,
        "summary": summary,
        "psnr_tdq_minus_static_a6": margins,
    }
    out["env"] = env_info()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"run_test_bounds{args.tag}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# `tdq run` on mnist-ddpm at the test size (8 seeds, 10 DDIM steps), repeated",
        "",
        f"{args.repeats} repeats on disjoint eval/calibration seeds. Regenerate: "
        "`python experiments/run_test_bounds.py`.",
        "",
        "Extra overrides: " + (" ".join(f"`{e}`" for e in args.extra) or "none") + ".",
        "",
        "| row | PSNR min..max (dB) | LPIPS alex min..max | final drift min..max |",
        "|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['psnr']['min']:.2f}..{s['psnr']['max']:.2f} | "
            f"{s['lpips_alex']['min']:.4f}..{s['lpips_alex']['max']:.4f} | "
            f"{s['drift_final']['min']:.4f}..{s['drift_final']['max']:.4f} |"
        )
    lines += [
        "",
        "PSNR(timestep-aware A6) − PSNR(static A6) per repeat: " + ", ".join(f"{m:+.2f}" for m in margins),
    ]
    (RESULTS / f"run_test_bounds{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
