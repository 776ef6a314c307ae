"""The `tdq run` configuration of the mnist-ddpm run test, shared by `tests/test_run_mnist.py` and
`experiments/run_test_bounds.py` (which measures where that test's bounds come from), so the two cannot drift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "MNIST_TEST_RUN", "compose_run"]

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
