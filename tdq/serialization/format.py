"""The saved state's format: file names, schema version, the error type, integer-code layouts and packing, and
the key/adapter/probe helpers saving and loading share."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from tdq.adapters import ConstantTimestepAdapter, TimestepAdapter
from tdq.config import TDQConfig
from tdq.grid import SPACINGS, UNITS, is_real
from tdq.quant import codebook as CB
from tdq.quant import functional as F
from tdq.quant.modules import quant_module_class
from tdq.quant.quantizers import TimestepContext
from tdq.rounding.corrections import (
    OUTPUT_CORRECTION_KEY,
)

logger = logging.getLogger("tdq.serialization")

STATE_FILE = "tdq_state.safetensors"
CONFIG_FILE = "tdq_config.json"
STATE_FORMAT = "tdq-quant-state"
STATE_SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS = (1,)

CODES_SUFFIX = ".weight_codes"
_QUANTIZER_PREFIXES = ("weight_quantizer.", "act_quantizer.")


class SavedQuantizationError(ValueError):
    """Raised when a saved tdq state is missing, corrupted, of an unknown schema, or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise SavedQuantizationError(f"unknown dtype {name!r} in the tdq sidecar")
    return dtype


def _code_layout(bits: int, symmetric: bool) -> str:
    signed = "int" if symmetric else "uint"
    return f"{signed}4_packed" if bits <= 4 else f"{signed}8"


def _codes_shape(layout: str, rows: int, cols: int) -> tuple[int, ...]:
    if layout.endswith("_packed"):
        return ((rows * cols + 1) // 2,)
    return (rows, cols)


def _codes_dtype(layout: str) -> torch.dtype:
    return torch.uint8 if layout.endswith("_packed") or layout.startswith("uint") else torch.int8


def _pack_codes(codes: torch.Tensor, layout: str) -> torch.Tensor:
    if layout.endswith("_packed"):
        return F.pack_int4(codes)
    return codes.contiguous()


def _unpack_codes(stored: torch.Tensor, layout: str, rows: int, cols: int) -> torch.Tensor:
    """Integer codes as an `int16` tensor `[rows, cols]` (affine codes are unsigned)."""
    if layout.endswith("_packed"):
        codes = F.unpack_int4(stored, rows * cols).to(torch.int16)
        if layout.startswith("uint"):
            codes = codes & 0xF
        return codes.reshape(rows, cols)
    return stored.to(torch.int16).reshape(rows, cols)


def _weight_codes(wq, fq: torch.Tensor) -> torch.Tensor:
    """
    The integer codes of a fake-quantized weight, as `int8`/`uint8` rows.

    Divides by the scale *as the forward pass used it* (cast to the weight's dtype), so the codes are exact for
    half-precision weights too (`WeightQuantizer.int_codes` divides by the float32 scale).
    """
    rows = F.reshape_for_granularity(fq, wq.spec.granularity, wq.spec.group_size).float()
    if wq.has_codebook:  # the levels as the forward pass used them (cast to the weight's dtype)
        return CB.nearest_codes(rows, wq.codebook.to(fq.dtype).float()).to(torch.uint8)
    qmin, qmax = wq.qrange()
    scale = wq.scale.to(fq.dtype).float()
    zero_point = wq.zero_point.to(fq.dtype).float()
    return F.quantize(rows, scale, zero_point, qmin, qmax).to(torch.int8 if qmin < 0 else torch.uint8)


def _dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    shape: tuple[int, ...],
    granularity: str,
    dtype: torch.dtype,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(q - zp) * scale` in `dtype`, the arithmetic of `fake_quantize` (or the lookup `codebook[row, q]`), so the
    result equals the fake-quant weight."""
    if codebook is not None:
        rows = CB.lookup(codes, codebook, dtype)
    else:
        rows = (codes.to(dtype) - zero_point.to(dtype)) * scale.to(dtype)
    return F.restore_from_granularity(rows, torch.Size(shape), granularity).contiguous()


def _layer_of_key(key: str, layer_names: set[str]) -> str:
    """The module a state key belongs to: a quantized layer's name for its codes and quantizer buffers."""
    if key.endswith(CODES_SUFFIX):
        return key[: -len(CODES_SUFFIX)]
    owner = key.rpartition(".")[0]
    base, _, child = owner.rpartition(".")
    if child + "." in _QUANTIZER_PREFIXES and base in layer_names:
        return base
    return owner


def _is_act_smooth(key: str, layer_names: set[str], saved_layers: dict, tensors: dict) -> bool:
    """Whether `key` is the optional `act_smooth` buffer (shape `[C_in]`) of a quantized layer."""
    layer = key[: -len(".act_smooth")]
    if not key.endswith(".act_smooth") or layer not in layer_names:
        return False
    if list(tensors[key].shape) != [int(saved_layers[layer]["weight_shape"][1])]:
        raise SavedQuantizationError(f"tdq state is corrupted: {key!r} has shape {list(tensors[key].shape)}")
    return True


def _adapter_to_dict(adapter: TimestepAdapter) -> dict[str, Any]:
    return {"class": type(adapter).__name__, **dataclasses.asdict(adapter)}


def _adapter_from_dict(data: dict[str, Any]) -> TimestepAdapter:
    classes = {"TimestepAdapter": TimestepAdapter, "ConstantTimestepAdapter": ConstantTimestepAdapter}
    data = dict(data)
    name = data.pop("class", "TimestepAdapter")
    if name not in classes:
        raise SavedQuantizationError(
            f"unknown timestep adapter class {name!r} in the tdq sidecar; known: {sorted(classes)}"
        )
    try:
        adapter = classes[name](**data)
    except TypeError as e:
        raise SavedQuantizationError(f"bad timestep adapter in the tdq sidecar: {e}") from e
    checks = {
        "arg_name": isinstance(adapter.arg_name, str),
        "position": adapter.position is None or (_is_int(adapter.position) and adapter.position >= 0),
        "units": adapter.units in UNITS and adapter.units != "auto",
        "t_min": is_real(adapter.t_min),
        "t_max": is_real(adapter.t_max),
        "spacing": adapter.spacing in SPACINGS,
        "scale": is_real(adapter.scale) and adapter.scale > 0,
        "value": is_real(getattr(adapter, "value", 0.0)),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise SavedQuantizationError(
            f"bad timestep adapter in the tdq sidecar: adapter.{bad[0]}={getattr(adapter, bad[0])!r} is not allowed "
            "(arg_name: a string, position: a non-negative integer or null, units: train_timestep/t/sigma, t_min/"
            "t_max/value: finite numbers, spacing: linear/log, scale: a positive number)"
        )
    return adapter


def _meta_probe_state(module: nn.Module, name: str, config: TDQConfig, num_buckets: int) -> dict[str, tuple]:
    """Names and shapes of the state of `module` once quantized, computed on meta tensors (nothing is changed)."""
    probe = copy.copy(module)
    probe._parameters = {
        k: None if v is None else nn.Parameter(torch.empty(v.shape, dtype=v.dtype, device="meta"), False)
        for k, v in module._parameters.items()
    }
    probe._buffers = {
        k: None if v is None else torch.empty(v.shape, dtype=v.dtype, device="meta")
        for k, v in module._buffers.items()
    }
    wspec, aspec = config.layer_specs(name)
    qmod = quant_module_class(module).from_float(probe, name, wspec, aspec, TimestepContext(num_buckets))
    return {k: (tuple(v.shape), v.dtype) for k, v in qmod.state_dict().items()}


def _is_correction(
    key: str, layer_names: set[str], saved_layers: dict, tensors: dict, num_buckets: int
) -> bool:
    """Whether `key` is a saved output correction: a layer's `bucket_bias` (`[K, C_out]`) or the model's PTQD-style
    output correction (`[K]` gain, `[K, C]` bias); a wrong shape or a non-finite value is an error."""
    if key.endswith(".bucket_bias") and key[: -len(".bucket_bias")] in layer_names:
        c = int(saved_layers[key[: -len(".bucket_bias")]]["weight_shape"][0])
        want = [num_buckets, c]
    elif key == OUTPUT_CORRECTION_KEY + ".gain":
        want = [num_buckets]
    elif key == OUTPUT_CORRECTION_KEY + ".bias":
        want = [num_buckets, -1]
    else:
        return False
    t = tensors[key]
    shape = list(t.shape)
    if len(shape) != len(want) or any(w not in (-1, d) for w, d in zip(want, shape, strict=True)):
        raise SavedQuantizationError(f"tdq state is corrupted: {key!r} has shape {shape}, expected {want}")
    if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
        raise SavedQuantizationError(f"tdq state is corrupted: {key!r} must hold finite floats")
    if key.endswith(".gain") and not bool((t > 0).all()):
        raise SavedQuantizationError(f"tdq state is corrupted: {key!r} must hold positive gains")
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)
