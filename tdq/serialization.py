"""Save and load the tdq state of a quantized model: safetensors plus a JSON sidecar, no pickle.

A state directory holds two files:

- `tdq_state.safetensors`: per quantized layer the real integer weight codes (`<layer>.weight_codes`; `int8` for
  symmetric and `uint8` for affine codes, packed two per byte with `tdq.quant.functional.pack_int4` when the layer
  has 4 bits or fewer), the weight quantizer's `scale`, `zero_point`, `min_val`, `max_val` and `bits`, every buffer of
  the activation quantizer (`scale`, `zero_point`, `bits`, `min_val`, `max_val`, `calibrated`, shape `[K]`) and the
  layer's bias. With `include_float=True` (the default) it also holds every other parameter and buffer of the
  model under its usual name, so the state alone rebuilds the model from a randomly initialised skeleton of the
  same architecture; with `include_float=False` it holds only the quantized layers and is loaded on top of a model
  that already has its float weights.
  A layer with non-uniform weight levels (`weight.levels` log2/kmeans) stores unsigned codebook indices as its
  codes (`uint8`, packed at <= 4 bits) and its per-row levels as `<layer>.weight_quantizer.codebook`
  (`[rows, 2^bits]`, float32, sorted); loading refuses a codebook that is not finite, sorted and of that shape, and
  indices beyond `2^bits - 1`.
  Output corrections of `tdq.rounding.corrections` are part of the state: a layer's per-bucket bias correction is
  its `<layer>.bucket_bias` buffer (`[K, C_out]`), the PTQD-style output correction the tensors
  `_tdq_output_correction.gain` (`[K]`) and `_tdq_output_correction.bias` (`[K, C]`); loading installs them again.
- `tdq_config.json`: schema version, `TDQConfig.to_dict()`, the resolved grid, the timestep adapter, the bit
  schedule (per layer weight bits and activation bits `[K]`), the layout of every layer's codes, the source model,
  the tdq version and the sha256 of the safetensors file.

Weights are stored only as codes. Loading writes the dequantized codes into each layer's `weight`, so the layer's
fake-quantized weight, and therefore every output, is bit-exact what it was before saving; `tdq.disabled(model)`
then runs the model with those dequantized weights, not with the original float weights, which are not stored.

`load_quantization` checks everything (hash, JSON, schema version, config, layer names, every tensor's name, shape and
dtype) before it changes the model, so a failed load leaves the model untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdq._version import __version__
from tdq.adapters import ConstantTimestepAdapter, TimestepAdapter
from tdq.api import QUANTIZATION_ATTR, get_quantization, iter_quant_layers, quantize_, select_layers
from tdq.config import ACT_BITS, GRANULARITIES, WEIGHT_BITS, TDQConfig
from tdq.errors import ConfigError
from tdq.grid import SPACINGS, UNITS, is_real
from tdq.quant import codebook as CB
from tdq.quant import functional as F
from tdq.quant.attention import attention_state_keys, is_attention_quantizer_key, iter_attention_quantizers
from tdq.quant.modules import quant_module_class
from tdq.quant.quantizers import NotCalibratedError, TimestepContext, codes_signed
from tdq.rounding.corrections import (
    OUTPUT_CORRECTION_KEY,
    get_output_correction,
    install_bias_correction,
    install_output_correction,
    remove_bias_correction,
)
from tdq.utils.io import atomic_copy, atomic_write, read_json_object, remove_temporaries, sha256_file

logger = logging.getLogger(__name__)

STATE_FILE = "tdq_state.safetensors"
CONFIG_FILE = "tdq_config.json"
STATE_FORMAT = "tdq-quant-state"
STATE_SCHEMA_VERSION = 1
READABLE_SCHEMA_VERSIONS = (1,)

CODES_SUFFIX = ".weight_codes"
_QUANTIZER_PREFIXES = ("weight_quantizer.", "act_quantizer.")

__all__ = [
    "CONFIG_FILE",
    "SavedQuantizationError",
    "STATE_FILE",
    "STATE_SCHEMA_VERSION",
    "check_saveable",
    "has_saved_quantization",
    "load_quantization",
    "read_saved_quantization",
    "save_quantization",
]


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


# ----------------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------------


def check_saveable(model: nn.Module) -> None:
    r"""
    Raise unless `save_quantization(model, ...)` can save `model` (quantized, initialised, calibrated), without
    writing anything: callers check before they replace an existing save.

    Raises:
        `ValueError` if the model is not quantized; `NotCalibratedError` naming the first layer that is not
        initialised or not calibrated.
    """
    get_quantization(model)
    for name, m in iter_quant_layers(model):
        aq = m.act_quantizer
        if "_qat_lora" in m.__dict__:  # float LoRA adapters from tdq.qat are saved by tdq.qat.save_lora
            raise NotImplementedError(
                f"layer {name!r} has a float LoRA adapter from QAT (simulated only); save_quantization stores no "
                "adapters: save them with tdq.qat.save_lora, or fine-tune with qat.lora_rank=0"
            )
        if m.weight.is_meta or m.weight_quantizer.needs_init or aq.needs_init:
            raise NotCalibratedError(
                f"layer {name!r}: its weight or quantizer state is on the meta device or was never initialised after "
                "to_empty(); load the float weights and calibrate (or load a saved state) before saving"
            )
        if aq.spec.enabled and (aq.mode == "observe" or not bool(aq.calibrated.all())):
            raise NotCalibratedError(
                f"layer {name!r}: activation quantizer is not calibrated; run the sampler inside "
                "`tdq.calibration(model)` before saving"
            )


def save_quantization(
    model: nn.Module,
    directory: str | os.PathLike,
    source_model: str | None = None,
    include_float: bool = True,
) -> Path:
    r"""
    Save the tdq state of a calibrated quantized model as `tdq_state.safetensors` + `tdq_config.json`.

    Args:
        model (`nn.Module`):
            A model quantized by `tdq.quantize_` and calibrated.
        directory (`str` or `os.PathLike`):
            Output directory (created if needed). Existing state files in it are replaced.
        source_model (`str`, *optional*):
            Where the float model came from (hub id or path), recorded in the sidecar.
        include_float (`bool`, *optional*, defaults to `True`):
            Also store every non-quantized parameter and buffer, so the state rebuilds the model from a skeleton.
            `False` stores only the quantized layers (for a model whose float weights are saved elsewhere).

    Returns:
        `Path` of the directory.

    Raises:
        `ValueError` if the model is not quantized; `NotCalibratedError` if a layer's activation quantizer is not
        calibrated.
    """
    from safetensors.torch import save_file

    state = get_quantization(model)
    layers = list(iter_quant_layers(model))
    layer_names = {n for n, _ in layers}
    check_saveable(model)

    for qname, q in iter_attention_quantizers(model):
        if q.needs_init or q.mode == "observe" or not bool(q.calibrated.all()):
            raise NotCalibratedError(
                f"attention quantizer {qname!r} is not calibrated; run the sampler inside `tdq.calibration(model)` "
                "before saving"
            )

    tensors: dict[str, torch.Tensor] = {}
    layer_info: list[dict[str, Any]] = []
    mismatched = []
    for name, m in layers:
        wq = m.weight_quantizer
        spec = wq.spec
        info: dict[str, Any] = {
            "name": name,
            "module": type(m).__name__,
            "weight_shape": list(m.weight.shape),
            "weight_dtype": _dtype_name(m.weight.dtype),
            "weight_bits": int(wq.bits),
            "act_bits": [int(b) for b in m.act_quantizer.bits],
            "granularity": spec.granularity,
        }
        if spec.enabled:
            with torch.no_grad():
                fq = m.quantized_weight().detach()
                codes = _weight_codes(wq, fq)
                layout = _code_layout(int(wq.bits), wq.codes_signed)
                rows, cols = codes.shape
                deq = _dequantize_weight(
                    codes.to(torch.int16),
                    wq.scale,
                    wq.zero_point,
                    tuple(fq.shape),
                    spec.granularity,
                    fq.dtype,
                    wq.codebook if wq.has_codebook else None,
                )
                if not torch.equal(deq, fq):
                    mismatched.append(name)
            tensors[name + CODES_SUFFIX] = _pack_codes(codes, layout).cpu()
            info.update(code_layout=layout, code_rows=rows, code_cols=cols)
        else:
            info.update(code_layout="float")
        layer_info.append(info)
    if mismatched:
        logger.warning(
            "dequantized codes of %d layer(s) (first: %r) differ from the fake-quantized weights in the last bit; "
            "reloaded outputs will not be bit-exact (this happens with bfloat16 weights)",
            len(mismatched),
            mismatched[0],
        )

    coded = {info["name"] + ".weight" for info in layer_info if info["code_layout"] != "float"}
    seen_ptrs: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        if key in coded:
            continue
        if (
            not include_float
            and _layer_of_key(key, layer_names) not in layer_names
            and not is_attention_quantizer_key(key)
        ):
            continue
        t = value.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen_ptrs:  # tied tensors: safetensors refuses shared storage
            t = t.clone()
        seen_ptrs.add(ptr)
        tensors[key] = t

    corr = get_output_correction(model)
    if corr is not None:
        tensors[OUTPUT_CORRECTION_KEY + ".gain"] = corr.gain.detach().cpu().float().contiguous()
        tensors[OUTPUT_CORRECTION_KEY + ".bias"] = corr.bias.detach().cpu().float().contiguous()
    corrections = {
        "bucket_bias_layers": [n for n, m in layers if m._buffers.get("bucket_bias") is not None],
        "output_correction": corr is not None,
    }

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_quantization: {str(directory)!r} is a file; pass a directory")
    directory.mkdir(parents=True, exist_ok=True)
    # The pair is replaced as a whole: the new tensors go to a file of their own name, the sidecar switches to it
    # (the commit: until then the old pair is untouched and loads), then the file is promoted to `STATE_FILE` and
    # the sidecar switched again. A failure at any step leaves a sidecar whose state file exists and matches.
    staged_name = f"tdq_state.{uuid.uuid4().hex[:16]}.safetensors"
    staged = directory / staged_name
    atomic_write(
        staged,
        lambda p: save_file(
            tensors, p, metadata={"format": STATE_FORMAT, "schema_version": str(STATE_SCHEMA_VERSION)}
        ),
    )
    sidecar = {
        "format": STATE_FORMAT,
        "schema_version": STATE_SCHEMA_VERSION,
        "tdq_version": __version__,
        "model_class": type(model).__name__,
        "source_model": source_model,
        "include_float": bool(include_float),
        "layer_filter": bool(state.filtered),
        "config": state.config.to_dict(),
        "grid": state.grid.to_dict(),
        "adapter": _adapter_to_dict(state.adapter),
        "schedule": {
            "layers": [i["name"] for i in layer_info],
            "weight_bits": [i["weight_bits"] for i in layer_info],
            "act_bits": [i["act_bits"] for i in layer_info],
        },
        "layers": layer_info,
        "corrections": corrections,
        "state_file": staged_name,
        "state_sha256": sha256_file(staged),
    }

    def write_sidecar() -> None:
        atomic_write(
            directory / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(sidecar, indent=2) + "\n")
        )

    try:
        write_sidecar()
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _promote(staged, directory / STATE_FILE)
    sidecar["state_file"] = STATE_FILE
    write_sidecar()
    # this save's staged file, and what failed or killed saves left (never read: the sidecar names neither)
    for path in directory.glob("tdq_state.*.safetensors"):
        if path.name != STATE_FILE:
            path.unlink(missing_ok=True)
    remove_temporaries(directory, ".tdq_state*.tmp")
    remove_temporaries(directory, f".{CONFIG_FILE}.*.tmp")
    return directory


def _promote(src: Path, dst: Path) -> None:
    """Atomically make `dst` hold the bytes of `src` (a hard link where the file system allows, else a copy)."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            atomic_copy(src, dst)
            return
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(v) for v in value)


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


def load_quantization(
    model: nn.Module, directory: str | os.PathLike, backend: str | None = None
) -> nn.Module:
    r"""
    Quantize `model` with the saved config and adapter and load the saved tdq state into it (no calibration).

    Everything is checked before the model is changed: a failed load leaves it as it was.

    Args:
        model (`nn.Module`):
            The float model of the same architecture (a randomly initialised skeleton is enough for a state saved
            with `include_float=True`), or a model already quantized with the same config.
        directory (`str` or `os.PathLike`):
            The directory written by `save_quantization`.
        backend (`str`, *optional*):
            Lower the model onto this backend (see `tdq.to_backend`: `"auto"`, `"x86"`, `"weight_only_int4"`, ...)
            with the saved integer codes going straight into its kernels (no dequantize/requantize round trip).
            `None` (default) loads the simulated model with dequantized float weights.

    Returns:
        The same `model`, quantized and calibrated.

    Raises:
        `FileNotFoundError` if a file is missing; `SavedQuantizationError` if the sidecar or the safetensors file is
        corrupted (bad JSON, hash mismatch, truncated), the schema version is unknown, or the state does not fit the
        model (the message names the first mismatched layer).
    """
    directory = Path(directory)
    sidecar = read_saved_quantization(directory)
    tensors = _read_tensors(directory, sidecar)
    try:
        config = TDQConfig.from_dict(sidecar["config"])
    except (ConfigError, TypeError) as e:
        raise SavedQuantizationError(f"tdq sidecar in {str(directory)!r} holds an invalid config: {e}") from e
    adapter = _adapter_from_dict(sidecar["adapter"])
    try:
        grid = config.grid.resolve(*adapter.default_grid())
    except ConfigError as e:
        raise SavedQuantizationError(f"tdq sidecar in {str(directory)!r} holds an unusable grid: {e}") from e
    if grid.to_dict() != sidecar["grid"]:
        raise SavedQuantizationError(
            f"tdq sidecar in {str(directory)!r} is inconsistent: grid {sidecar['grid']} does not follow from its "
            f"config and adapter ({grid.to_dict()})"
        )
    model_name = type(model).__name__
    quantized = hasattr(model, QUANTIZATION_ATTR)
    if quantized:
        current = get_quantization(model)
        if current.config.to_dict() != config.to_dict() or current.grid.to_dict() != grid.to_dict():
            raise SavedQuantizationError(
                f"{model_name} is already quantized with another config than the saved state; load the state into "
                "the float model"
            )
    include_float = bool(sidecar["include_float"])

    # 1. layer names, in model order: the first mismatch is named.
    saved_layers = {info["name"]: info for info in sidecar["layers"]}
    # A state saved from a model quantized with a `filter_fn` lists its layers: only those are quantized again.
    layer_filter = (lambda m, n: n in saved_layers) if sidecar.get("layer_filter") else None
    try:
        names, expected = _expected_state(model, config, grid.num_buckets, quantized, layer_filter)
    except (ValueError, RuntimeError) as e:
        raise SavedQuantizationError(f"the saved tdq state does not fit {model_name}: {e}") from e
    for name in names:
        if name not in saved_layers:
            raise SavedQuantizationError(
                f"the saved tdq state does not fit {model_name}: first mismatched layer {name!r} is quantized in the "
                "model but absent from the saved state"
            )
    name_set = set(names)
    for name in saved_layers:
        if name not in name_set:
            raise SavedQuantizationError(
                f"the saved tdq state does not fit {model_name}: first mismatched layer {name!r} is in the saved "
                "state but is not a quantizable layer of the model"
            )

    # 2. every tensor in model order: names, shapes, dtypes; quantized weights are stored as their codes.
    checked: set[str] = set()
    for key, (shape, model_dtype) in expected.items():
        layer = _layer_of_key(key, name_set)
        # tdq's own buffers have fixed dtypes; a float16 scale would load rounded without a word
        dtype = model_dtype if "_quantizer." in key else None
        if layer in name_set and key == layer + ".weight":
            info = saved_layers[layer]
            if list(shape) != list(info["weight_shape"]):
                raise SavedQuantizationError(
                    f"the saved tdq state does not fit {model_name}: first mismatched layer {layer!r} has weight "
                    f"shape {list(info['weight_shape'])} in the saved state and {list(shape)} in the model"
                )
            if info["code_layout"] != "float":
                layout = info["code_layout"]
                key = layer + CODES_SUFFIX
                shape = _codes_shape(layout, int(info["code_rows"]), int(info["code_cols"]))
                dtype = _codes_dtype(layout)
        if not include_float and layer not in name_set and not is_attention_quantizer_key(key):
            continue
        if layer in name_set and key == layer + ".weight_quantizer.codebook":
            # its shape follows the layer's saved bit-width (a precision schedule may differ from the spec)
            shape = (shape[0], 2 ** int(saved_layers[layer]["weight_bits"]))
        if key.endswith((".act_smooth", ".bucket_bias")) and layer in name_set and key not in tensors:
            continue  # optional smoothing / bias-correction buffer: the saved layer has none
        checked.add(key)
        if key not in tensors:
            raise SavedQuantizationError(
                f"the saved tdq state does not fit {model_name}: first mismatched layer {layer!r}: tensor {key!r} is "
                "missing from the saved state"
            )
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise SavedQuantizationError(
                f"the saved tdq state does not fit {model_name}: first mismatched layer {layer!r}: tensor {key!r} has "
                f"shape {list(t.shape)} in the saved state and {list(shape)} in the model"
            )
        if dtype is not None and t.dtype != dtype:
            what = "codes" if key.endswith(CODES_SUFFIX) else "tensor"
            raise SavedQuantizationError(
                f"tdq state is corrupted: {what} {key!r} {'have' if what == 'codes' else 'has'} dtype {t.dtype}, "
                f"expected {dtype}"
            )
    extra = [
        k
        for k in tensors
        if k not in checked
        and not _is_act_smooth(k, name_set, saved_layers, tensors)
        and not _is_correction(k, name_set, saved_layers, tensors, grid.num_buckets)
    ]
    has_gain, has_bias = (
        (OUTPUT_CORRECTION_KEY + ".gain") in tensors,
        (OUTPUT_CORRECTION_KEY + ".bias") in tensors,
    )
    if has_gain != has_bias:
        raise SavedQuantizationError(
            f"tdq state is corrupted: the output correction needs both {OUTPUT_CORRECTION_KEY}.gain and .bias"
        )
    if extra:
        raise SavedQuantizationError(
            f"the saved tdq state does not fit {model_name}: first mismatched layer "
            f"{_layer_of_key(extra[0], name_set)!r}: tensor {extra[0]!r} is not in the model"
        )

    # 3. the quantizer values must be usable and the sidecar's bit schedule must agree with the tensors.
    _check_attention_values(tensors)
    for name in names:
        _check_quantizer_values(name, tensors)
        info = saved_layers[name]
        wbits = int(tensors[f"{name}.weight_quantizer.bits"])
        abits = [int(b) for b in tensors[f"{name}.act_quantizer.bits"]]
        if wbits != int(info["weight_bits"]) or abits != [int(b) for b in info["act_bits"]]:
            raise SavedQuantizationError(
                f"tdq state is corrupted: layer {name!r} has bits W{wbits}/A{abits} in {STATE_FILE} but "
                f"W{info['weight_bits']}/A{info['act_bits']} in {CONFIG_FILE}"
            )
        wspec = config.layer_specs(name)[0]
        if info["code_layout"] != "float" and info["code_layout"] != _code_layout(wbits, codes_signed(wspec)):
            raise SavedQuantizationError(
                f"tdq state is corrupted: layer {name!r} has code layout {info['code_layout']!r}"
            )
        if wspec.levels != "uniform" and info["code_layout"] != "float":
            _check_codebook_state(name, info, wbits, tensors)

    # 4. build the state dict to load: dequantize the codes in the dtype they were saved from.
    load: dict[str, torch.Tensor] = {}
    codes_for_backend: dict[str, torch.Tensor] = {}
    corrections: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".bucket_bias") and key[: -len(".bucket_bias")] in name_set:
            corrections[key[: -len(".bucket_bias")]] = t
        elif key.startswith(OUTPUT_CORRECTION_KEY + "."):
            continue
        elif not key.endswith(CODES_SUFFIX):
            load[key] = t
    modules = dict(model.named_modules())
    for name in names:
        info = saved_layers[name]
        if info["code_layout"] == "float":
            continue
        gran = info["granularity"]
        codes = _unpack_codes(
            tensors[name + CODES_SUFFIX], info["code_layout"], int(info["code_rows"]), int(info["code_cols"])
        )
        if backend is not None:
            codes_for_backend[name] = codes
            continue
        weight = _dequantize_weight(
            codes,
            tensors[f"{name}.weight_quantizer.scale"],
            tensors[f"{name}.weight_quantizer.zero_point"],
            tuple(info["weight_shape"]),
            gran,
            _dtype_from_name(info["weight_dtype"]),
            tensors.get(f"{name}.weight_quantizer.codebook"),
        )
        load[name + ".weight"] = weight.to(modules[name].weight.dtype)

    # 5. mutate: quantize (if needed) and load. Everything above was checked, so this does not fail half-way.
    if not quantized:
        # the saved state sets every weight quantizer: no range estimate on the float weights (work and resident code)
        quantize_(model, config, adapter=adapter, filter_fn=layer_filter, calibrate_weights=False)
    missing, unexpected = model.load_state_dict(load, strict=False)
    missing = [
        k
        for k in missing
        if k.removesuffix(".weight") not in codes_for_backend and not k.endswith(".bucket_bias")
    ]
    if unexpected or (include_float and missing):
        raise RuntimeError(  # pragma: no cover - guarded by the checks above
            f"internal error loading tdq state: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, m in iter_quant_layers(model):
        m._wq_cache = None
        m.act_quantizer.mode = "quant"
        if name in corrections:
            install_bias_correction(m, corrections[name].to(m.weight.dtype))
        else:
            remove_bias_correction(m)
    old = get_output_correction(model)
    if old is not None:
        old.remove()
    if has_gain:
        install_output_correction(
            model, tensors[OUTPUT_CORRECTION_KEY + ".gain"], tensors[OUTPUT_CORRECTION_KEY + ".bias"]
        )
    for _, q in iter_attention_quantizers(model):
        q.mode = "quant"
        q._params = None
    if backend is not None:
        from tdq.quant.backends import to_backend

        to_backend(model, backend, codes=codes_for_backend)
    return model
