"""Real execution of tdq-quantized models: backends chosen by CPU/GPU capability, and memory accounting.

```python
tdq.quantize_(unet, config)
with tdq.calibration(unet):
    pipe(...)                                 # per-bucket scales
tdq.to_backend(unet, "auto")                  # x86 int8 kernels on an AVX2/AVX-512 CPU, `_int_mm` on CUDA
tdq.backend_info(unet)                        # backend, kernel per layer, resident weight bytes
```

Backends (`BACKENDS`, by name): `"simulate"` (fake quantization with float kernels: the reference, no speed or
memory gain), `"x86"` (oneDNN int8 conv/linear, `uint8` activations with the current bucket's static scale),
`"weight_only_int8"` / `"weight_only_int4"` (integer weight storage, dequantized per call: the simulator's
arithmetic with ~4x/~8x less weight memory), `"cuda"` (`torch._int_mm` for Linear layers). Each backend maps
simulated module classes to lowerings in a class-keyed table with MRO lookup; a layer a backend cannot run stays
simulated, and the reason is recorded per layer (`backend_info(model)["layers"]`) and logged.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from tdq.quant.attention import iter_attention_processors
from tdq.quant.backends.base import (
    BackendError,
    BackendState,
    LayerRecord,
    RealQuantModule,
    release_file_mappings,
)
from tdq.quant.backends.capability import cpu_flags, cpu_model, get_cpu_capability
from tdq.quant.backends.cuda import IntMMLinear
from tdq.quant.backends.registry import (  # noqa: F401  (re-exported)
    BACKENDS,
    Backend,
    Lowering,
    register_backend,
)
from tdq.quant.backends.report import backend_report, record_call
from tdq.quant.backends.weight_only import WeightOnlyModule
from tdq.quant.backends.x86 import X86Int8Module
from tdq.quant.modules import QuantMixin
from tdq.quant.quantizers import NotCalibratedError

logger = logging.getLogger("tdq.backends")

BACKEND_ATTR = "_tdq_backend"

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "IntMMLinear",
    "LayerRecord",
    "RealQuantModule",
    "WeightOnlyModule",
    "X86Int8Module",
    "backend_info",
    "backend_report",
    "cpu_flags",
    "cpu_model",
    "get_cpu_capability",
    "record_call",
    "register_backend",
    "release_file_mappings",
    "resident_bytes",
    "select_backend",
    "to_backend",
]


# ---------------------------------------------------------------------------------------------------- public verbs
def select_backend(model: nn.Module, capability: dict | None = None) -> str:
    r"""
    The backend `"auto"` picks: `"cuda"` for a model on a GPU, `"x86"` where oneDNN's int8 kernels exist and the
    CPU has AVX2 or better (VNNI/AMX make them faster), otherwise `"simulate"`.

    Args:
        model (`nn.Module`): the quantized model.
        capability (`dict`, *optional*): `get_cpu_capability()` (computed when omitted).
    """
    cap = capability or get_cpu_capability()
    if cap["cuda"] and any(p.is_cuda for p in model.parameters()):
        return "cuda"
    if cap["onednn_int8"] and (cap["avx2"] or cap["avx512_vnni"] or cap["amx_int8"]):
        return "x86"
    return "simulate"


def _carry_extras(old: nn.Module, new: nn.Module) -> None:
    """Forward hooks and extra buffers of a simulated layer (e.g. `tdq.rounding`'s per-bucket `bucket_bias`
    correction) move to the real module that replaces it."""
    for k, v in old._buffers.items():
        if v is not None and k != "act_smooth" and k not in new._buffers and not hasattr(new, k):
            new.register_buffer(k, v)
    for hid, hook in old._forward_hooks.items():
        new.register_forward_hook(hook, with_kwargs=hid in old._forward_hooks_with_kwargs)


def to_backend(
    model: nn.Module, backend: str = "auto", *, codes: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    r"""
    Lower a calibrated tdq-quantized model onto a backend, in place. No scale changes.

    Args:
        model (`nn.Module`):
            A model quantized with `tdq.quantize_` and calibrated (or loaded with `tdq.serialization.load_quantization`).
        backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (by capability, see `select_backend`), `"simulate"`, `"x86"`, `"weight_only_int8"`,
            `"weight_only_int4"` or `"cuda"`.
        codes (`dict[str, torch.Tensor]`, *optional*):
            Per layer name, saved integer codes (rows of `reshape_for_granularity`) that go straight into the
            kernels instead of being re-derived from the layer's weight (used by `load_quantization(..., backend=)`).

    Returns:
        The same `model`. `backend_info(model)` tells which backend and which kernel per layer run.

    Raises:
        `ValueError` for an unknown backend or a model that tdq did not quantize; `BackendError` if the backend
        cannot run here or the model is already converted; `NotCalibratedError` if a layer is not calibrated.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose 'auto' or one of {sorted(BACKENDS)}")
    if getattr(model, BACKEND_ATTR, None) is not None and getattr(model, BACKEND_ATTR).name != "simulate":
        raise BackendError(
            f"{type(model).__name__} is already converted to backend {getattr(model, BACKEND_ATTR).name!r}"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMixin)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no tdq-quantized layer; call tdq.quantize_ first")
    for name, m in layers:
        if "_qat_lora" in m.__dict__:  # float LoRA adapters from tdq.qat (simulated only)
            raise NotImplementedError(
                f"layer {name!r} has a float LoRA adapter from QAT (qat.lora_rank > 0); LoRA is simulated only and "
                f"backend {backend!r} cannot run it; fine-tune with qat.lora_rank=0 to convert"
            )
        aq = m.act_quantizer
        if aq.spec.enabled and (aq.mode == "observe" or not bool(aq.calibrated.all())):
            raise NotCalibratedError(
                f"layer {name!r}: activation quantizer is not calibrated; calibrate (tdq.calibration) before "
                "tdq.to_backend"
            )
    for name, proc in iter_attention_processors(model):
        for qname, q in proc.quantizers():
            if q.mode == "observe" or not bool(q.calibrated.all()):
                raise NotCalibratedError(
                    f"attention {name!r}: {qname} is not calibrated; calibrate (tdq.calibration) before "
                    "tdq.to_backend"
                )
    cap = get_cpu_capability()
    name_ = select_backend(model, cap) if backend == "auto" else backend
    impl = BACKENDS[name_]()
    impl.check(model, cap)
    codes = codes or {}
    state = BackendState(name=name_, requested=backend, capability=cap, choices=impl.choose(cap))
    # one layer at a time, each simulated layer dropped as soon as it is replaced: its float weight (and fake-quant
    # cache) is freed before the next layer is packed, so conversion peaks at about one layer above the result
    layers.reverse()
    while layers:
        name, m = layers.pop()
        with torch.no_grad():
            new, rec = impl.lower(name, m, codes.get(name))
        if new is not m:
            _carry_extras(m, new)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
        del m, new
        state.layers[name] = rec
        if rec.reason:
            logger.info("backend %s: layer %r runs %s (%s)", name_, name, rec.kernel, rec.reason)
    if name_ != "simulate":
        # float tensors left (biases, norms, float layers) that live in a memory-mapped checkpoint would keep it,
        # and every quantized weight page read from it, resident
        release_file_mappings(model)
    impl.finish(model)
    kernel, why = impl.attention_kernel(cap)
    for name, proc in iter_attention_processors(model):
        proc.kernel = kernel
        state.attention[name] = LayerRecord(kernel, why, "none")
    object.__setattr__(model, BACKEND_ATTR, state)
    counts = Counter(r.kernel for r in state.layers.values())
    counts.update("attention:" + r.kernel for r in state.attention.values())
    logger.info("backend %s (asked %r): %s", name_, backend, dict(counts))
    return model


def resident_bytes(model: nn.Module) -> int:
    r"""
    Bytes held by a model's parameters and buffers, each storage counted once (tied or shared tensors are not
    double counted; oneDNN's opaque prepacked weights count as `numel x element_size`).

    Args:
        model (`nn.Module`): any module.
    """
    seen: set = set()
    total = 0

    def leaves(t):
        # tensor subclasses that wrap other tensors (e.g. torchao's quantized weights) hold no storage themselves
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for inner in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, inner))
        else:
            yield t

    for mod in model.modules():
        tensors = list(mod._parameters.values()) + list(mod._buffers.values())
        for t in [leaf for x in tensors if x is not None for leaf in leaves(x)]:
            if t.is_mkldnn:
                key = ("mkldnn", id(t))
                nbytes = t.numel() * t.element_size()
            else:
                st = t.untyped_storage()
                key = (st.data_ptr(), t.device.type) if st.data_ptr() else ("empty", id(st))
                nbytes = st.nbytes()
            if key in seen:
                continue
            seen.add(key)
            total += nbytes
    return total


def backend_info(model: nn.Module) -> dict:
    r"""
    A JSON-safe summary of how a model executes, for reports.

    Returns:
        `dict` with `backend` (`"simulate"` for a model never converted), `requested`, `capability`, `choices`
        (the backend's capability-dependent kernel choices and why, e.g. `conv_output`, `attention`),
        `kernels` (kernel -> number of layers; quantized attention processors count as `"attention:<kernel>"`),
        `layers` (name -> `{kernel, reason, storage}`), `attention` (processor name -> the same) and
        `resident_bytes`.
    """
    state = getattr(model, BACKEND_ATTR, None)
    if state is None:
        layers = {n: LayerRecord("simulate") for n, m in model.named_modules() if isinstance(m, QuantMixin)}
        attention = {n: LayerRecord("simulate") for n, _ in iter_attention_processors(model)}
        state = BackendState("simulate", "simulate", get_cpu_capability(), layers, attention)
    return {
        "backend": state.name,
        "requested": state.requested,
        "capability": state.capability,
        "choices": dict(state.choices),
        "kernels": dict(
            Counter(
                [r.kernel for r in state.layers.values()]
                + ["attention:" + r.kernel for r in state.attention.values()]
            )
        ),
        "layers": {n: r.to_dict() for n, r in state.layers.items()},
        "attention": {n: r.to_dict() for n, r in state.attention.items()},
        "resident_bytes": resident_bytes(model),
    }
