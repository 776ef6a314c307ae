"""What this machine can run: CPU model, instruction-set flags, PyTorch's CPU capability, quantized engines, CUDA."""

from __future__ import annotations

import functools
import platform

import torch

__all__ = ["cpu_flags", "cpu_model", "get_cpu_capability"]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU model name from `/proc/cpuinfo` (or `platform.processor()` where that file does not exist)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    """The instruction-set flags of the first CPU in `/proc/cpuinfo` (empty where it cannot be read)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def get_cpu_capability() -> dict:
    r"""
    The facts a backend is chosen by, as a JSON-safe `dict` (recorded in every backend report and benchmark).

    Returns:
        `dict` with `cpu_model`, `torch_cpu_capability` (`torch.backends.cpu.get_cpu_capability()`, e.g. `"AVX2"`,
        `"AVX512"`), `avx2`, `avx512_vnni`, `amx_int8` (cpuinfo flags), `quantized_engines`, `onednn_int8` (whether
        the `onednn::qconv2d_pointwise`/`qlinear_pointwise` kernels exist), `cuda` (bool), `cuda_device` (name or
        `None`), `torch_version`.
    """
    flags = cpu_flags()
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "onednn_int8": hasattr(torch.ops.onednn, "qconv2d_pointwise")
        and hasattr(torch.ops.onednn, "qlinear_pointwise"),
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "torch_version": torch.__version__,
    }
