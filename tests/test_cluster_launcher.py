"""The Slurm launcher config of README "Running sweeps on a cluster" composes (no cluster needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra tdq[cluster]")


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_module

    from tdq.run.cli import register_schemas

    register_schemas()
    with initialize_config_module(config_module="tdq.configs", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "quant=w4a8"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher"), launcher._target_
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.gpus_per_node == 1
    assert cfg.quant.weight.bits == 4
