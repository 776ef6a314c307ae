"""`backend_report`: convert a calibrated model and measure it against FP32 in the same process, for run reports."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn

from tdq.quant.modules import QuantMixin


@contextlib.contextmanager
def record_call(model: nn.Module) -> Iterator[dict]:
    """
    Context manager: record the positional and keyword arguments of the first call of `model` (detached clones),
    e.g. of a calibration sampler run, as `{"args": ..., "kwargs": ...}` for `backend_report`.
    """
    rec: dict = {}

    def clone(v):
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    def pre(module, args, kwargs):
        if not rec:
            rec["args"] = tuple(clone(a) for a in args)
            rec["kwargs"] = {k: clone(v) for k, v in kwargs.items()}

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield rec
    finally:
        handle.remove()


def _float_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, QuantMixin):
            m.context.active = False  # quantized layers compute exactly as the float ones (FP32 eager)
            break
    return twin


def backend_report(model: nn.Module, backend: str, example: dict, pairs: int = 5) -> dict:
    r"""
    Lower a calibrated model onto `backend` (in place) and measure it against FP32 in the same process.

    FP32 is a temporary copy of the model with its quantized layers switched to float (removed afterwards); the
    per-call latency ratio is measured in `pairs` interleaved pairs on the recorded call `example` (median, min).

    Args:
        model (`nn.Module`): the calibrated quantized denoiser (not yet converted).
        backend (`str`): as for `tdq.to_backend`.
        example (`dict`): `{"args": tuple, "kwargs": dict}` of one denoiser call (see `record_call`).
        pairs (`int`, *optional*, defaults to `5`): interleaved timing pairs.

    Returns:
        `dict` with `backend`, `requested`, `capability`, `kernels` (kernel -> layers), `layers` (per layer kernel,
        reason, storage), `resident_bytes`, `fp32_resident_bytes`, `resident_bytes_ratio`, `latency` (`fp32_s` and
        `backend_s` medians, `ratio_median`, `ratio_min`, `pairs`, `threads`).
    """
    from tdq.quant.backends import backend_info, resident_bytes, to_backend

    if not example:
        raise ValueError(
            "backend_report needs one recorded denoiser call (example={'args':..., 'kwargs':...})"
        )
    twin = _float_twin(model)
    fp_bytes = resident_bytes(twin)
    to_backend(model, backend)
    args, kwargs = example["args"], example["kwargs"]

    def call(m):
        with torch.no_grad():
            t0 = time.perf_counter()
            m(*args, **kwargs)
            return time.perf_counter() - t0

    call(twin)
    call(model)
    fps, bks, ratios = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            f, b = call(twin), call(model)
        else:
            b, f = call(model), call(twin)
        fps.append(f)
        bks.append(b)
        ratios.append(b / f)
    del twin
    info = backend_info(model)
    info.update(
        fp32_resident_bytes=fp_bytes,
        resident_bytes_ratio=info["resident_bytes"] / fp_bytes,
        latency={
            "fp32_s": statistics.median(fps),
            "backend_s": statistics.median(bks),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "pairs": pairs,
            "threads": torch.get_num_threads(),
        },
    )
    return info
