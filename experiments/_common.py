"""Helpers shared by the experiment scripts: bootstrap confidence intervals and the environment record."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def bootstrap_ci(values: torch.Tensor, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap CI of the mean of `values` (`n` resamples, seeded)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (n, values.numel()), generator=g)
    means = values.reshape(-1).double()[idx].mean(1)
    return [float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))]


def env_info() -> dict:
    """CPU model and capability, library versions, threads and load: recorded beside every result."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }
