"""Reading and validating a saved state directory (sidecar fields, tensor values, codebooks) before anything is
loaded into a model."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdq.api import iter_quant_layers, select_layers
from tdq.config import ACT_BITS, GRANULARITIES, WEIGHT_BITS, TDQConfig
from tdq.quant import codebook as CB
from tdq.quant.attention import attention_state_keys, is_attention_quantizer_key
from tdq.serialization.format import (
    CODES_SUFFIX,
    CONFIG_FILE,
    READABLE_SCHEMA_VERSIONS,
    STATE_FILE,
    SavedQuantizationError,
    _is_int,
    _is_int_list,
    _meta_probe_state,
    _unpack_codes,
)
from tdq.utils.io import read_json_object, sha256_file

logger = logging.getLogger("tdq.serialization")

# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------


def has_saved_quantization(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a tdq state sidecar (`tdq_config.json`)."""
    return (Path(directory) / CONFIG_FILE).is_file()


def read_saved_quantization(directory: str | os.PathLike) -> dict[str, Any]:
    r"""
    Read and check the sidecar `tdq_config.json` of a state directory (schema version, required fields).

    Args:
        directory (`str` or `os.PathLike`): the state directory.

    Returns:
        The sidecar as a `dict`.

    Raises:
        `FileNotFoundError` if the sidecar is missing; `SavedQuantizationError` if it is not valid JSON, has an unknown
        schema version or lacks a field.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tdq state in {str(directory)!r}: {CONFIG_FILE} is missing")
    data = read_json_object(path, SavedQuantizationError, "tdq sidecar")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise SavedQuantizationError(
            f"tdq sidecar {str(path)!r} has schema_version={version!r}, which this tdq cannot read; readable "
            f"versions: {list(READABLE_SCHEMA_VERSIONS)}"
        )
    required = ("config", "grid", "adapter", "layers", "state_sha256", "include_float")
    missing = [k for k in required if k not in data]
    if missing:
        raise SavedQuantizationError(f"tdq sidecar {str(path)!r} is corrupted: missing field(s) {missing}")
    _check_sidecar(data, str(path))
    return data


# The state file a sidecar may name: a bare file name in the state directory (never a path, never `..`).
_STATE_FILE_NAME = re.compile(r"tdq_state(\.[0-9a-f]{8,64})?\.safetensors")
_CODE_LAYOUTS = ("float", "int8", "uint8", "int4_packed", "uint4_packed")


def _check_sidecar(data: dict[str, Any], where: str) -> None:
    """Types and values of every sidecar field the loader reads; the message names the field and what is allowed."""

    def bad(field: str, allowed: str, value: Any = None) -> SavedQuantizationError:
        value = repr(data.get(field) if value is None else value)
        value = value if len(value) <= 80 else value[:77] + "..."
        return SavedQuantizationError(
            f"tdq sidecar {where!r} is corrupted: {field}={value} must be {allowed}"
        )

    state_file = data.get("state_file", STATE_FILE)
    if not isinstance(state_file, str) or not _STATE_FILE_NAME.fullmatch(state_file):
        raise bad(
            "state_file",
            f"a file name inside the state directory such as {STATE_FILE!r} (no path, no '..')",
        )
    for key in ("config", "grid", "adapter"):
        if not isinstance(data[key], dict):
            raise bad(key, "a JSON object")
    if not isinstance(data["state_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", data["state_sha256"]):
        raise bad("state_sha256", "a sha256 hex digest (64 lowercase hex digits)")
    if not isinstance(data["include_float"], bool):
        raise bad("include_float", "true or false")
    if not isinstance(data.get("layer_filter", False), bool):
        raise bad("layer_filter", "true or false")
    if not isinstance(data["layers"], list):
        raise bad("layers", "a list of layer entries")
    for i, info in enumerate(data["layers"]):
        f = f"layers[{i}]"
        if not isinstance(info, dict):
            raise bad(f, "a JSON object", info)
        name = info.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"{f}.name", "a layer name", name)
        f = f"layers[{i}] ({name!r})"
        missing = [k for k in _LAYER_FIELDS if k not in info]
        if missing:
            raise SavedQuantizationError(f"tdq sidecar {where!r} is corrupted: {f} lacks field(s) {missing}")
        if not _is_int_list(info["weight_shape"]) or not all(d >= 0 for d in info["weight_shape"]):
            raise bad(f"{f}.weight_shape", "a list of non-negative integers", info["weight_shape"])
        if not isinstance(info["weight_dtype"], str) or not isinstance(
            getattr(torch, info["weight_dtype"], None), torch.dtype
        ):
            raise bad(f"{f}.weight_dtype", "a torch dtype name such as 'float32'", info["weight_dtype"])
        if not _is_int(info["weight_bits"]) or info["weight_bits"] not in WEIGHT_BITS:
            raise bad(
                f"{f}.weight_bits",
                f"an integer in [{WEIGHT_BITS[0]}, {WEIGHT_BITS[-1]}]",
                info["weight_bits"],
            )
        if not _is_int_list(info["act_bits"]) or not all(b in ACT_BITS for b in info["act_bits"]):
            raise bad(
                f"{f}.act_bits", f"a list of integers in [{ACT_BITS[0]}, {ACT_BITS[-1]}]", info["act_bits"]
            )
        if info["granularity"] not in GRANULARITIES:
            raise bad(f"{f}.granularity", f"one of {list(GRANULARITIES)}", info["granularity"])
        if info["code_layout"] not in _CODE_LAYOUTS:
            raise bad(f"{f}.code_layout", f"one of {list(_CODE_LAYOUTS)}", info["code_layout"])
        if info["code_layout"] != "float":
            for k in ("code_rows", "code_cols"):
                if not _is_int(info.get(k)) or info[k] < 0:
                    raise bad(f"{f}.{k}", "a non-negative integer", info.get(k))


_LAYER_FIELDS = ("weight_shape", "weight_dtype", "weight_bits", "act_bits", "granularity", "code_layout")


def _read_tensors(directory: Path, sidecar: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / sidecar.get("state_file", STATE_FILE)  # a bare file name (checked by `_check_sidecar`)
    if not path.is_file():
        raise FileNotFoundError(f"tdq state file {str(path)!r} is missing")
    digest = sha256_file(path)
    if digest != sidecar["state_sha256"]:
        raise SavedQuantizationError(
            f"tdq state file {str(path)!r} is corrupted or truncated: its sha256 {digest[:12]}… does not match "
            f"{str(sidecar['state_sha256'])[:12]}… recorded in {CONFIG_FILE}"
        )
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise SavedQuantizationError(f"tdq state file {str(path)!r} cannot be read: {e}") from e


def _check_attention_values(tensors: dict[str, torch.Tensor]) -> None:
    """Raise `SavedQuantizationError` naming the tensor if a saved attention quantizer value is unusable."""
    for key, t in tensors.items():
        if not is_attention_quantizer_key(key):
            continue
        buf = key.rsplit(".", 1)[-1]
        if buf == "scale" and not bool((torch.isfinite(t.float()) & (t.float() > 0)).all()):
            raise SavedQuantizationError(
                f"tdq state is corrupted: attention quantizer {key} holds a NaN/inf or non-positive scale"
            )
        if buf in ("zero_point", "min_val", "max_val") and not bool(torch.isfinite(t.float()).all()):
            raise SavedQuantizationError(f"tdq state is corrupted: attention quantizer {key} holds NaN/inf")
        if buf == "bits" and (
            t.dtype.is_floating_point or not bool(((t >= ACT_BITS[0]) & (t <= ACT_BITS[-1])).all())
        ):
            raise SavedQuantizationError(
                f"tdq state is corrupted: attention quantizer {key} holds {t.flatten().tolist()[:8]}; bit-widths "
                f"must be in [{ACT_BITS[0]}, {ACT_BITS[-1]}]"
            )


def _check_quantizer_values(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise `SavedQuantizationError` naming the layer and tensor if a saved quantizer value is unusable: NaN/inf
    or non-positive scales, non-finite zero-points or ranges, bit-widths outside the supported range."""

    def corrupted(key: str, what: str) -> SavedQuantizationError:
        return SavedQuantizationError(f"tdq state is corrupted: layer {name!r}: {key} {what}")

    for q, allowed in (("weight_quantizer", WEIGHT_BITS), ("act_quantizer", ACT_BITS)):
        key = f"{name}.{q}.bits"
        bits = tensors[key]
        if (
            bits.dtype.is_floating_point
            or bits.dtype == torch.bool
            or not bool(((bits >= allowed[0]) & (bits <= allowed[-1])).all())
        ):
            raise corrupted(
                key,
                f"holds {bits.flatten().tolist()[:8]}; bit-widths must be in [{allowed[0]}, {allowed[-1]}]",
            )
        scale = tensors[f"{name}.{q}.scale"].float()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            bad = scale[~(torch.isfinite(scale) & (scale > 0))].flatten()[0].item()
            raise corrupted(f"{name}.{q}.scale", f"holds {bad!r}; scales must be finite and positive")
        for buf in ("zero_point", "min_val", "max_val"):
            key = f"{name}.{q}.{buf}"
            if key in tensors and not bool(torch.isfinite(tensors[key].float()).all()):
                raise corrupted(key, "holds NaN/inf; it must be finite")
        key = f"{name}.{q}.zero_point"
        if key in tensors:
            # an integer code of the layer's range: [-2^(b-1), 2^(b-1) - 1] signed or [0, 2^b - 1] unsigned
            zp = tensors[key].double()
            top = 2.0 ** bits.double().max()
            if not bool((zp == zp.round()).all()) or not bool(((zp >= -top / 2) & (zp <= top - 1)).all()):
                bad = zp.flatten()[((zp != zp.round()) | (zp < -top / 2) | (zp > top - 1)).flatten()][
                    0
                ].item()
                raise corrupted(
                    key,
                    f"holds {bad!r}; a zero-point must be an integer code of its {int(bits.max())}-bit range",
                )


def _check_codebook_state(name: str, info: dict, bits: int, tensors: dict[str, torch.Tensor]) -> None:
    """Raise `SavedQuantizationError` naming the tensor unless a codebook layer's levels are a finite, sorted
    `[rows, 2^bits]` table and its stored indices are all below `2^bits`."""
    key = f"{name}.weight_quantizer.codebook"
    rows = int(info["code_rows"])
    why = CB.check_codebook(tensors[key], rows, bits, key)
    if why:
        raise SavedQuantizationError(f"tdq state is corrupted: layer {name!r}: {why}")
    codes = _unpack_codes(tensors[name + CODES_SUFFIX], info["code_layout"], rows, int(info["code_cols"]))
    top = int(codes.max()) if codes.numel() else 0
    if top >= 2**bits or (codes.numel() and int(codes.min()) < 0):
        raise SavedQuantizationError(
            f"tdq state is corrupted: layer {name!r}: codes {name + CODES_SUFFIX!r} hold index {top}; a "
            f"{bits}-bit codebook has indices 0..{2**bits - 1}"
        )


def _expected_state(
    model: nn.Module, config: TDQConfig, num_buckets: int, quantized: bool, layer_filter=None
) -> tuple[list[str], dict[str, tuple[tuple, torch.dtype]]]:
    """The quantized layer names and the `{key: (shape, dtype)}` state of `model` once quantized with `config`."""
    if quantized:
        names = [n for n, _ in iter_quant_layers(model)]
        sd = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        return names, sd
    names = select_layers(model, config, layer_filter)
    name_set = set(names)
    sd: dict[str, tuple[tuple, torch.dtype]] = {}
    probed: set[str] = set()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in name_set:
            if owner not in probed:
                probed.add(owner)
                sub = _meta_probe_state(model.get_submodule(owner), owner, config, num_buckets)
                sd.update({f"{owner}.{k}": v for k, v in sub.items()})
            continue
        sd[key] = (tuple(value.shape), value.dtype)
    if config.attention:
        sd.update(attention_state_keys(model, config.selects, num_buckets))
    return names, sd
