"""Saving the tdq state of a quantized model (`save_quantization`, `check_saveable`): integer codes, quantizer
buffers and corrections to safetensors, the JSON sidecar, written atomically."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdq._version import __version__
from tdq.api import get_quantization, iter_quant_layers
from tdq.quant.attention import is_attention_quantizer_key, iter_attention_quantizers
from tdq.quant.quantizers import NotCalibratedError
from tdq.rounding.corrections import (
    OUTPUT_CORRECTION_KEY,
    get_output_correction,
)
from tdq.serialization.format import (
    CODES_SUFFIX,
    CONFIG_FILE,
    STATE_FILE,
    STATE_FORMAT,
    STATE_SCHEMA_VERSION,
    _adapter_to_dict,
    _code_layout,
    _dequantize_weight,
    _dtype_name,
    _layer_of_key,
    _pack_codes,
    _weight_codes,
)
from tdq.utils.io import atomic_copy, atomic_write, remove_temporaries, sha256_file

logger = logging.getLogger("tdq.serialization")


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
