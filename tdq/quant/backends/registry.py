"""Backend registry: the `Backend` base class, `register_backend`, and the registered backends' lowering tables
(simulate, x86, weight-only int8/int4, CUDA) with their per-layer fallbacks. `to_backend` (in the package) runs them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from tdq.quant.attention import MIN_INT8_SCORES
from tdq.quant.backends.base import (
    BackendError,
    LayerRecord,
)
from tdq.quant.backends.cuda import IntMMLinear
from tdq.quant.backends.weight_only import WeightOnlyModule
from tdq.quant.backends.x86 import X86Int8Module
from tdq.quant.backends.x86 import conv_output_layout as x86_conv_output_layout
from tdq.quant.backends.x86 import run_channels_last as x86_run_channels_last
from tdq.quant.modules import QuantConv2d, QuantLinear, QuantMixin

logger = logging.getLogger("tdq.backends")

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
