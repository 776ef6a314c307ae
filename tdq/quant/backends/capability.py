"""What this machine can run: CPU model, instruction-set flags, PyTorch's CPU capability, quantized engines, CUDA.

The flags a backend chooses kernels by (`avx512_vnni`, `amx_int8`) are the *effective* ones: the CPU's flags
(`/proc/cpuinfo`) limited by what the kernels are allowed to use. oneDNN (the int8 conv/linear and, on CPU,
`torch._int_mm`) honours `ONEDNN_MAX_CPU_ISA` (or the older `DNNL_MAX_CPU_ISA`); ATen's vectorised kernels honour
`ATEN_CPU_CAPABILITY`. With `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` an AMX Xeon is treated as the
AVX2-only machine it then emulates, so no VNNI/AMX-only path is chosen. The raw cpuinfo flags stay in the record as
`cpuinfo_avx512_vnni` / `cpuinfo_amx_int8`.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

__all__ = ["cpu_flags", "cpu_model", "get_cpu_capability", "isa_limits"]


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


# ONEDNN_MAX_CPU_ISA values (oneDNN's `cpu_isa_t` names) -> (VNNI allowed, AMX allowed)
_ONEDNN_ISA = {
    "SSE41": (False, False),
    "AVX": (False, False),
    "AVX2": (False, False),
    "AVX2_VNNI": (True, False),
    "AVX2_VNNI_2": (True, False),
    "AVX512_CORE": (False, False),
    "AVX512_CORE_VNNI": (True, False),
    "AVX512_CORE_BF16": (True, False),
    "AVX512_CORE_FP16": (True, False),
    "AVX10_1_512": (True, False),
    "AVX512_CORE_AMX": (True, True),
    "AVX10_1_512_AMX": (True, True),
    "AVX512_CORE_AMX_FP16": (True, True),
    "AVX10_1_512_AMX_FP16": (True, True),
    "AVX10_2_512": (True, False),
    "AVX10_2_512_AMX_2": (True, True),
    "DEFAULT": (True, True),
    "ALL": (True, True),
}


def isa_limits(env: dict | None = None) -> dict:
    r"""
    What the environment allows the kernels to use, whatever the CPU has.

    Args:
        env (`dict`, *optional*): the environment to read (defaults to `os.environ`).

    Returns:
        `dict` with `onednn_max_cpu_isa` (the `ONEDNN_MAX_CPU_ISA`/`DNNL_MAX_CPU_ISA` value or `None`),
        `aten_cpu_capability` (`ATEN_CPU_CAPABILITY` or `None`), `vnni_allowed`, `amx_allowed` (bools). An
        unrecognised `ONEDNN_MAX_CPU_ISA` value allows nothing beyond AVX2 (the safe choice: no VNNI/AMX-only path).
    """
    env = os.environ if env is None else env
    onednn = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    aten = env.get("ATEN_CPU_CAPABILITY")
    vnni, amx = True, True
    if onednn:
        vnni, amx = _ONEDNN_ISA.get(onednn.strip().upper(), (False, False))
    if aten and aten.strip().lower() not in ("avx512", "avx512_vnni", "avx512_bf16", "amx", "default_max"):
        # ATen restricted to AVX2 (or less): the process emulates a machine without AVX-512, so no AVX-512
        # VNNI / AMX path is taken either (oneDNN alone could still use them)
        vnni, amx = False, False
    return {
        "onednn_max_cpu_isa": onednn,
        "aten_cpu_capability": aten,
        "vnni_allowed": vnni,
        "amx_allowed": amx,
    }


def get_cpu_capability() -> dict:
    r"""
    The facts a backend is chosen by, as a JSON-safe `dict` (recorded in every backend report and benchmark).

    Returns:
        `dict` with `cpu_model`, `torch_cpu_capability` (`torch.backends.cpu.get_cpu_capability()`, e.g. `"AVX2"`,
        `"AVX512"`), `avx2`, `avx512_vnni`, `amx_int8` (effective: cpuinfo flags limited by `ONEDNN_MAX_CPU_ISA`
        and `ATEN_CPU_CAPABILITY`, see `isa_limits`), `cpuinfo_avx512_vnni`, `cpuinfo_amx_int8` (the CPU's own
        flags), `isa` (the best effective int8 ISA: `"amx"`, `"avx512_vnni"`, `"avx2"` or `"none"`),
        `onednn_max_cpu_isa`, `aten_cpu_capability` (the environment overrides, or `None`), `quantized_engines`,
        `onednn_int8` (whether the `onednn::qconv2d_pointwise`/`qlinear_pointwise` kernels exist), `cuda` (bool),
        `cuda_device` (name or `None`), `torch_version`.
    """
    flags = cpu_flags()
    lim = isa_limits()
    cuda = torch.cuda.is_available()
    raw_vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    raw_amx = "amx_int8" in flags
    vnni = raw_vnni and lim["vnni_allowed"]
    amx = raw_amx and lim["amx_allowed"]
    avx2 = "avx2" in flags
    isa = "amx" if amx else "avx512_vnni" if vnni else "avx2" if avx2 else "none"
    return {
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": avx2,
        "avx512_vnni": vnni,
        "amx_int8": amx,
        "cpuinfo_avx512_vnni": raw_vnni,
        "cpuinfo_amx_int8": raw_amx,
        "isa": isa,
        "onednn_max_cpu_isa": lim["onednn_max_cpu_isa"],
        "aten_cpu_capability": lim["aten_cpu_capability"],
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "onednn_int8": hasattr(torch.ops.onednn, "qconv2d_pointwise")
        and hasattr(torch.ops.onednn, "qlinear_pointwise"),
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "torch_version": torch.__version__,
    }
