"""`tdq run` configurations shared by tests and experiments, so that copies cannot drift: the mnist-ddpm run test's
(`tests/test_run_mnist.py` and `experiments/run_test_bounds.py`, which measures where that test's bounds come from),
the tiny command-line runs of the latent and prompt tests, and the tiny random-UNet run as a config dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "MNIST_TEST_RUN", "TINY_RANDOM_RUN", "TINY_RUN", "compose_run", "tiny_random_run"]

#: The packaged Hydra configs of `tdq run`.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: The run test's size: mnist-ddpm, 8 evaluation seeds, 10 DDIM steps, 4 calibration samples, no mixed precision.
MNIST_TEST_RUN: tuple[str, ...] = (
    "model=mnist-ddpm",
    "schedule=none",
    "eval.num_samples=8",
    "eval.num_inference_steps=10",
    "eval.batch_size=8",
    "eval.feature=none",
    "eval.noise_floor=false",
    "calibration.num_samples=4",
    "calibration.num_inference_steps=10",
    "calibration.batch_size=4",
    "progress=false",
    "threads=1",
)

#: A run of a few seconds on any bundled model, as Hydra overrides (add `model=...` and a schedule choice): 4 seeds
#: and 4 steps, no feature networks or caches, 3 timestep buckets, one thread (two-thread OpenMP is many times slower
#: on a build machine shared with other jobs).
TINY_RUN: tuple[str, ...] = (
    "eval.num_samples=4",
    "eval.num_inference_steps=4",
    "eval.batch_size=4",
    "eval.feature=none",
    "eval.lpips_nets=[]",
    "eval.noise_floor=false",
    "eval.cache=false",
    "calibration.num_samples=2",
    "calibration.num_inference_steps=4",
    "calibration.batch_size=2",
    "quant.grid.num_buckets=3",
    "progress=false",
    "threads=1",
)

#: A run of about a second on a tiny random UNet, as a `run_experiment` config dict (see `tiny_random_run`).
TINY_RANDOM_RUN: dict[str, Any] = {
    "model": {"name": "tiny-random", "source": "random", "sample_size": 16},
    "quant": {"grid": {"num_buckets": 3}},
    "schedule": {"planner": "none"},
    "calibration": {"num_samples": 2, "num_inference_steps": 4, "batch_size": 2},
    "eval": {
        "num_samples": 4,
        "num_inference_steps": 4,
        "batch_size": 4,
        "feature": "none",
        "lpips_nets": [],
        "noise_floor": False,
        "cache": False,
        "dataset": "none",
    },
    "progress": False,
    "threads": 1,
}


def tiny_random_run(**sections: dict[str, Any]) -> dict[str, Any]:
    """
    A copy of `TINY_RANDOM_RUN` with some sections' fields replaced.

    Args:
        **sections (`dict`): per section (`schedule`, `calibration`, `eval`, ...), the fields to set.

    Returns:
        `dict`: the config, safe to modify.
    """
    import copy

    cfg = copy.deepcopy(TINY_RANDOM_RUN)
    for section, fields in sections.items():
        if isinstance(fields, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(copy.deepcopy(fields))
        else:
            cfg[section] = copy.deepcopy(fields)
    return cfg


def compose_run(overrides: list[str] | tuple[str, ...]) -> Any:
    """
    The `tdq run` config for these Hydra overrides, as the command line would build it.

    Args:
        overrides (`list[str]`): e.g. `[*MNIST_TEST_RUN, "quant=w8a8"]`.

    Returns:
        `omegaconf.DictConfig` to pass to `tdq.run.job.run_experiment`.
    """
    from hydra import compose, initialize_config_dir

    from tdq.run.cli import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
