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
from collections.abc import Callable

import torch
from torch import nn

from tdq.quant.attention import MIN_INT8_SCORES, iter_attention_processors
from tdq.quant.backends.base import (
    BackendError,
    BackendState,
    LayerRecord,
    RealQuantModule,
    release_file_mappings,
)
from tdq.quant.backends.capability import cpu_flags, cpu_model, get_cpu_capability
from tdq.quant.backends.cuda import IntMMLinear
from tdq.quant.backends.report import backend_report, record_call
from tdq.quant.backends.weight_only import WeightOnlyModule
from tdq.quant.backends.x86 import X86Int8Module
from tdq.quant.backends.x86 import conv_output_layout as x86_conv_output_layout
from tdq.quant.backends.x86 import run_channels_last as x86_run_channels_last
from tdq.quant.modules import QuantConv2d, QuantLinear, QuantMixin
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

# Result of one lowering: the module that replaces the layer (or the layer itself) and its record.
Lowering = Callable[[str, QuantMixin, "torch.Tensor | None"], tuple[nn.Module, LayerRecord]]


class Backend:
    r"""
    A way to execute quantized layers. Subclasses fill `lowerings` (simulated module class -> lowering function,
    looked up along the MRO) and may override `check` (can this machine/model run it).
    """

    name = "simulate"
    lowerings: dict[type, Lowering] = {}

    def check(self, model: nn.Module, capability: dict) -> None:
        """Raise `BackendError` if this backend cannot run here."""

    def choose(self, capability: dict) -> dict[str, str]:
        """Make this backend's capability-dependent kernel choices; returns them (choice -> what and why) for
        `backend_info(model)["choices"]`."""
        return {}

    def attention_kernel(self, capability: dict) -> tuple[str, str]:
        """`(kernel, reason)` for the matmuls of quantized attention processors (`"simulate"`: float arithmetic)."""
        return "simulate", f"no {self.name} attention kernel: the simulator's float arithmetic"

    def finish(self, model: nn.Module) -> None:
        """Model-level setup after every layer is lowered (e.g. the activation layout the kernels want)."""

    def lowering_for(self, cls: type) -> Lowering | None:
        """The lowering registered for `cls` or its nearest base class."""
        for base in cls.__mro__:
            if base in self.lowerings:
                return self.lowerings[base]
        return None

    def lower(
        self, name: str, module: QuantMixin, codes: torch.Tensor | None
    ) -> tuple[nn.Module, LayerRecord]:
        """Lower one layer (or keep it simulated, with the reason)."""
        fn = self.lowering_for(type(module))
        if fn is None:
            return _keep_simulated(module, codes, f"{type(module).__name__} has no {self.name} lowering")
        return fn(name, module, codes)


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a `Backend` subclass available to `to_backend` under its `name`."""
    BACKENDS[cls.name] = cls
    return cls


def _keep_simulated(module: QuantMixin, codes, reason: str) -> tuple[nn.Module, LayerRecord]:
    if codes is not None:  # loaded codes: hold them as codes, never as a float weight
        new = WeightOnlyModule(module, codes)
        return new, LayerRecord("simulate (" + new.kernel + ")", reason, new.storage)
    return module, LayerRecord("simulate", reason, "float")


# Why the integer kernels cannot run a layer with a weight codebook (recorded per layer in `backend_info`).
CODEBOOK_REASON = (
    "non-uniform weight levels ({levels} codebook): the int8 kernels need uniform integer levels; the codebook "
    "indices run the lookup-table dequantize path"
)


def _weight_lowering_blocker(module: QuantMixin) -> str:
    spec = module.weight_quantizer.spec
    if not spec.enabled:
        return "weight quantization disabled"
    if module.weight_quantizer.has_codebook:
        return CODEBOOK_REASON.format(levels=spec.levels)
    if not spec.symmetric:
        return "affine weights (the int8 kernels need weight zero-point 0)"
    if spec.granularity == "per_group":
        return "per-group weight scales (the int8 kernels take one scale per output channel)"
    if not module.act_quantizer.spec.enabled:
        return "activation quantization disabled"
    if module.weight.dtype != torch.float32:
        return f"weight dtype {module.weight.dtype} (the int8 kernels here are for float32 models)"
    return ""


def _dequant_fallback(module, codes, reason):
    new = WeightOnlyModule(module, codes)
    return new, LayerRecord(new.kernel, reason, new.storage)


def _lut_fallback(module, codes, reason):
    # codebook indices, packed two per byte at <= 4 bits, dequantized through the table per call
    new = WeightOnlyModule(module, codes, pack4=int(module.weight_quantizer.bits) <= 4)
    return new, LayerRecord(new.kernel, reason, new.storage)


# ---------------------------------------------------------------------------------------------------- simulate
@register_backend
class SimulateBackend(Backend):
    """Fake quantization with float kernels (the reference every real backend is tested against)."""

    name = "simulate"

    def attention_kernel(self, capability):
        return "simulate", ""

    def lower(self, name, module, codes):
        if codes is not None:
            return _keep_simulated(module, codes, "")
        return module, LayerRecord("simulate", "", "float")


# ---------------------------------------------------------------------------------------------------- x86
# Convolutions whose reduction (in_channels / groups x kernel area) is this small gain nothing from int8 (the
# quantize pass costs as much as the GEMM); they run the simulator's arithmetic on int8-stored weights.
MIN_INT8_REDUCTION = 32


def _x86_conv(name, module, codes, keep_channels_last: bool = False):
    why = _weight_lowering_blocker(module)
    if module.weight_quantizer.has_codebook and module.weight_quantizer.spec.enabled:
        return _lut_fallback(module, codes, why)
    if not why and isinstance(module.padding, str):
        why = f"string padding {module.padding!r}"
    if not why and module.padding_mode != "zeros":
        why = f"padding_mode={module.padding_mode!r}"
    k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    if not why and k < MIN_INT8_REDUCTION:
        return _dequant_fallback(module, codes, f"reduction {k} < {MIN_INT8_REDUCTION}: no int8 gain")
    if why:
        return _keep_simulated(module, codes, why)
    new = X86Int8Module(module, codes, keep_channels_last=keep_channels_last)
    return new, LayerRecord(new.kernel, "", "onednn_packed_int8")


def _x86_linear(name, module, codes):
    why = _weight_lowering_blocker(module)
    if module.weight_quantizer.has_codebook and module.weight_quantizer.spec.enabled:
        return _lut_fallback(module, codes, why)
    if why:
        return _keep_simulated(module, codes, why)
    new = X86Int8Module(module, codes)
    return new, LayerRecord(new.kernel, "", "onednn_packed_int8")


@register_backend
class X86Backend(Backend):
    """oneDNN int8 kernels (`onednn::qconv2d_pointwise`, `onednn::qlinear_pointwise`) on x86 CPUs."""

    name = "x86"
    lowerings = {QuantConv2d: _x86_conv, QuantLinear: _x86_linear}
    keep_channels_last = False

    def choose(self, capability):
        self.keep_channels_last, why = x86_conv_output_layout(capability)
        layout = "channels-last kept" if self.keep_channels_last else "input layout restored"
        attention, _ = self.attention_kernel(capability)
        return {
            "isa": capability.get("isa", ""),
            "conv_output": f"{layout}: {why}",
            "attention": attention,
        }

    def lower(self, name, module, codes):
        if self.lowering_for(type(module)) is _x86_conv:
            return _x86_conv(name, module, codes, self.keep_channels_last)
        return super().lower(name, module, codes)

    def finish(self, model):
        if self.keep_channels_last:
            x86_run_channels_last(model)

    def check(self, model, capability):
        if not capability["onednn_int8"]:
            raise BackendError(
                "backend 'x86' needs torch.ops.onednn.qconv2d_pointwise (a PyTorch built with oneDNN)"
            )
        if any(p.is_cuda for p in model.parameters()):
            raise BackendError("backend 'x86' runs on the CPU; the model is on CUDA (use backend='cuda')")

    def attention_kernel(self, capability):
        # torch._int_mm is fast on VNNI/AMX CPUs and a slow reference kernel elsewhere (25-60x FP32 on AVX2)
        if capability.get("avx512_vnni") or capability.get("amx_int8"):
            return "aten._int_mm", (
                f"calls with fewer than {MIN_INT8_SCORES} query x key scores per head, a mixed-bucket batch, a mask "
                "or > 8 bits run the simulator's float arithmetic"
            )
        return "simulate", "torch._int_mm has no fast kernel without AVX-512 VNNI or AMX: float arithmetic"


# ---------------------------------------------------------------------------------------------------- weight-only
def _weight_only(pack4: bool):
    def lower(name, module, codes):
        wq = module.weight_quantizer
        if not wq.spec.enabled:
            return module, LayerRecord("simulate", "weight quantization disabled", "float")
        pack = pack4 and int(wq.bits) <= 4
        new = WeightOnlyModule(module, codes, pack4=pack)
        why = "" if pack or not pack4 else f"{int(wq.bits)}-bit weight codes are held as int8"
        return new, LayerRecord(new.kernel, why, new.storage)

    return lower


@register_backend
class WeightOnlyInt8Backend(Backend):
    """Weights held as int8 codes, dequantized per call (the simulator's arithmetic)."""

    name = "weight_only_int8"
    lowerings = {QuantLinear: _weight_only(False), QuantConv2d: _weight_only(False)}


@register_backend
class WeightOnlyInt4Backend(Backend):
    """Weights of layers with <= 4 bits packed two codes per byte (others int8), dequantized per call."""

    name = "weight_only_int4"
    lowerings = {QuantLinear: _weight_only(True), QuantConv2d: _weight_only(True)}


# ---------------------------------------------------------------------------------------------------- cuda
def _cuda_linear(name, module, codes):
    why = _weight_lowering_blocker(module)
    if not why and (module.in_features % 8 or module.out_features % 8):
        why = "in/out features not multiples of 8 (cuBLAS int8 GEMM)"
    if why:
        return _keep_simulated(module, codes, why)
    new = IntMMLinear(module, codes)
    return new, LayerRecord(new.kernel, "", "int8")


def _cuda_conv(name, module, codes):
    return _dequant_fallback(module, codes, "no int8 convolution kernel on CUDA in PyTorch: int8 storage")


@register_backend
class CudaBackend(Backend):
    """`torch._int_mm` for Linear layers on CUDA; convolutions keep int8 codes, dequantized per call."""

    name = "cuda"
    lowerings = {QuantLinear: _cuda_linear, QuantConv2d: _cuda_conv}

    def check(self, model, capability):
        if not capability["cuda"]:
            raise BackendError("backend 'cuda' needs a CUDA device; none is available")
        if not all(p.is_cuda for p in model.parameters()):
            raise BackendError("backend 'cuda': move the model to the GPU before conversion")


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
