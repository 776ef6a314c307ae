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

import logging
import os
from pathlib import Path

import torch
from torch import nn

from tdq.api import QUANTIZATION_ATTR, get_quantization, iter_quant_layers, quantize_
from tdq.config import TDQConfig
from tdq.errors import ConfigError
from tdq.quant.attention import is_attention_quantizer_key, iter_attention_quantizers
from tdq.quant.quantizers import codes_signed
from tdq.rounding.corrections import (
    OUTPUT_CORRECTION_KEY,
    get_output_correction,
    install_bias_correction,
    install_output_correction,
    remove_bias_correction,
)
from tdq.serialization.checks import (
    _check_attention_values,
    _check_codebook_state,
    _check_quantizer_values,
    _expected_state,
    _read_tensors,
    has_saved_quantization,
    read_saved_quantization,
)
from tdq.serialization.format import (
    CODES_SUFFIX,
    CONFIG_FILE,
    STATE_FILE,
    STATE_SCHEMA_VERSION,
    SavedQuantizationError,
    _adapter_from_dict,
    _code_layout,
    _codes_dtype,
    _codes_shape,
    _dequantize_weight,
    _dtype_from_name,
    _is_act_smooth,
    _is_correction,
    _layer_of_key,
    _unpack_codes,
)
from tdq.serialization.save import check_saveable, save_quantization

logger = logging.getLogger("tdq.serialization")

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
