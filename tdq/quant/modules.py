"""Quantized modules and the registry that maps float module types to them.

Quantized modules subclass the float module they replace (`QuantLinear` is an `nn.Linear`), keep its parameters
under the same names, and add a `weight_quantizer` and an input `act_quantizer`. When the model's
`TimestepContext` is inactive (no hook installed) they compute exactly what the float module computes.

Optional buffer `act_smooth` (shape `[C_in]`, absent/`None` = no smoothing): the input quantizer sees
`x / act_smooth` (channel dim 1 for conv, last dim for linear) and `weight` holds `W * act_smooth` along input
channels (SmoothQuant migration, per-input-channel activation scales folded into the weight). Set it with
`set_act_smooth`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as TF
from torch import nn

from tdq.config import QuantSpec
from tdq.quant.quantizers import TimestepActQuantizer, TimestepContext, WeightQuantizer

logger = logging.getLogger(__name__)

QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {}


def register_quant_module(float_cls: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """
    Class decorator: register a quantized module class as the replacement of `float_cls` and its subclasses.

    The class must provide `from_float(module, name, weight_spec, act_spec, context)`. Users register their own
    layer types the same way; the most derived registered class wins (see `quant_module_class`).
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        QUANT_MODULES[float_cls] = cls
        return cls

    return wrap


def quant_module_class(module: nn.Module) -> type[nn.Module] | None:
    """
    The quantized class that replaces `module`: the registration of its class or of its nearest registered base
    class (MRO lookup, so subclasses of `nn.Linear`/`nn.Conv2d` are quantized), or `None`.

    Already-quantized modules return `None`.
    """
    if isinstance(module, QuantMixin):
        return None
    for cls in type(module).__mro__:
        if cls in QUANT_MODULES:
            return QUANT_MODULES[cls]
    return None


class QuantMixin:
    """Shared behaviour of quantized modules: construction from a float module, cached fake weights, bit setting."""

    weight_quantizer: WeightQuantizer
    act_quantizer: TimestepActQuantizer
    context: TimestepContext
    channel_dim: int = 1  # input-channel dim of the activation (1 for conv, -1 for linear)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        name: str,
        weight_spec: QuantSpec,
        act_spec: QuantSpec,
        context: TimestepContext,
        *,
        calibrate_weight: bool = True,
    ):
        """
        Build the quantized module around `module`'s own parameters (no copy).

        Args:
            module (`nn.Module`): the float module.
            name (`str`): its full name in the model (for error messages).
            weight_spec (`QuantSpec`): weight spec.
            act_spec (`QuantSpec`): input-activation spec.
            context (`TimestepContext`): the model's timestep context.
            calibrate_weight (`bool`, *optional*, defaults to `True`): estimate the weight range now (`False`: a
                saved state is loaded right after, see `WeightQuantizer`).
        """
        base = next(c for c in type(module).__mro__ if c in QUANT_MODULES)
        if type(module).forward is not base.forward:
            logger.warning(
                "layer %r: %s overrides %s.forward; its quantized replacement %s computes %s.forward (exclude the "
                "layer or register a quantized module for %s if that is wrong)",
                name,
                type(module).__name__,
                base.__name__,
                cls.__name__,
                base.__name__,
                type(module).__name__,
            )
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new.layer_name = name
        new.context = context
        new.weight_quantizer = WeightQuantizer(
            weight_spec, module.weight, name=name, calibrate=calibrate_weight
        )
        new.act_quantizer = TimestepActQuantizer(act_spec, context.num_buckets, context, name=name)
        new.act_quantizer.needs_init = module.weight.is_meta  # its buffers are garbage after to_empty()
        new.act_quantizer.channel_dim = cls.channel_dim
        new._buffers["act_smooth"] = None
        new._wq_cache = None
        return new

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x / act_smooth` along the input-channel dim (the identity when the layer is not smoothed)."""
        s = self._buffers.get("act_smooth")
        if s is None:
            return x
        if self.channel_dim == 1 and x.dim() > 2:
            return x / s.view((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)
        return x / s.to(x.dtype)

    @torch.no_grad()
    def set_act_smooth(self, smooth: torch.Tensor | None) -> None:
        r"""
        Migrate activation scale into the weight (SmoothQuant): the input quantizer then sees `x / smooth` and the
        weight holds `W * smooth` along input channels; the float function is unchanged (up to rounding).

        Replaces any previous smoothing (the weight is first restored), re-calibrates the weight quantizer on the
        migrated weight. Activation ranges are not touched: set them for the new input afterwards.

        Args:
            smooth (`torch.Tensor` of shape `[C_in]` or `None`): positive finite factors; `None` removes smoothing.
        """
        old = self._buffers.get("act_smooth")
        w = self.weight
        view = (1, -1) + (1,) * (w.dim() - 2)
        fw = self.__dict__.get("_float_weight")
        if old is not None:
            if fw is not None:
                w.data.copy_(fw)
            else:
                w.data.div_(old.view(view).to(w.dtype))
        self.__dict__["_float_weight"] = None
        if smooth is None:
            self._buffers["act_smooth"] = None
        else:
            smooth = torch.as_tensor(smooth, dtype=torch.float32, device=w.device).reshape(-1)
            if smooth.numel() != w.shape[1] or getattr(self, "groups", 1) != 1:
                raise ValueError(
                    f"layer {self.layer_name!r}: act_smooth needs {w.shape[1]} factors and groups=1, got "
                    f"{smooth.numel()} factors"
                )
            if not bool(torch.isfinite(smooth).all() & (smooth > 0).all()):
                raise ValueError(f"layer {self.layer_name!r}: act_smooth must be positive and finite")
            # the original weight is kept (not saved) so the float path stays bit-identical to the float model
            self.__dict__["_float_weight"] = w.detach().clone()
            w.data.mul_(smooth.view(view).to(w.dtype))
            self._buffers["act_smooth"] = smooth
        self.weight_quantizer.calibrate_(w)
        self._wq_cache = None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; cached while the weight and its quantizer are unchanged and no grad is needed."""
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            return self.weight_quantizer(w)
        key = (
            w.data_ptr(),
            w._version,
            w.dtype,
            # version counters, not values: no device sync on the hot path (set_bits/calibrate_ bump them)
            self.weight_quantizer.bits._version,
            self.weight_quantizer.scale._version,
        )
        if self._wq_cache is None or self._wq_cache[0] != key:
            with torch.no_grad():
                self._wq_cache = (key, self.weight_quantizer(w))
        return self._wq_cache[1]

    def set_bits(self, weight_bits: int | None = None, act_bits: torch.Tensor | int | None = None) -> None:
        """
        Change bit-widths without recalibration.

        Args:
            weight_bits (`int`, *optional*): new weight bit-width.
            act_bits (`int` or `torch.LongTensor` of shape `[K]`, *optional*): activation bits for all or each bucket.
        """
        if weight_bits is not None:
            wq = self.weight_quantizer
            wq.set_bits(int(weight_bits), self.weight.detach() if wq.has_codebook else None)
            self._wq_cache = None
        if act_bits is not None:
            act_bits = torch.as_tensor(act_bits)
            if act_bits.dim() == 1 and act_bits.shape[0] != self.act_quantizer.num_buckets:
                raise ValueError(
                    f"layer {self.layer_name!r}: act_bits has {act_bits.shape[0]} buckets, the quantizer has "
                    f"{self.act_quantizer.num_buckets}"
                )
            self.act_quantizer.set_bits(act_bits)

    def _quant_active(self) -> bool:
        return self.context.active

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `act_smooth` is optional: create or drop it to match the state being loaded.
        key = prefix + "act_smooth"
        self.__dict__["_float_weight"] = None  # the loaded weight replaces any kept float copy
        if key in state_dict:
            self._buffers["act_smooth"] = torch.empty_like(state_dict[key], device=self.weight.device)
        else:
            self._buffers["act_smooth"] = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._wq_cache = None


@register_quant_module(nn.Linear)
class QuantLinear(QuantMixin, nn.Linear):
    """`nn.Linear` with a weight quantizer and a timestep-aware input quantizer."""

    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._buffers["act_smooth"] is not None:
            fw = self.__dict__.get("_float_weight")
            if not self.context.active and fw is not None:
                return TF.linear(x, fw, self.bias)
            x = self.smooth_input(x)
        if not self.context.active:
            return TF.linear(x, self.weight, self.bias)
        return TF.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)


@register_quant_module(nn.Conv2d)
class QuantConv2d(QuantMixin, nn.Conv2d):
    """`nn.Conv2d` with a weight quantizer and a timestep-aware input quantizer."""

    channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._buffers["act_smooth"] is not None:
            fw = self.__dict__.get("_float_weight")
            if not self.context.active and fw is not None:
                return self._conv_forward(x, fw, self.bias)
            x = self.smooth_input(x)
        if not self.context.active:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(self.act_quantizer(x), self.quantized_weight(), self.bias)


def is_quant_module(module: nn.Module) -> bool:
    """Whether `module` is a tdq quantized module."""
    return isinstance(module, QuantMixin)
