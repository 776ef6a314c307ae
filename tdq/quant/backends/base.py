"""Shared parts of the real-execution backends: integer weight storage, the backend registry, per-layer records.

A real module replaces a calibrated `QuantLinear`/`QuantConv2d`. It keeps the layer's own `weight_quantizer` and
`act_quantizer` (the same objects, so converting changes no scale and a later `set_bits` of activation bits is
seen at once), the bias, an optional `act_smooth` buffer, and the weight as integer codes only: no float copy.
Its `state_dict()` looks like the simulated layer's (the `weight` entry is the dequantized codes, which equal the
simulator's fake-quantized weight), so `tdq.serialization.save_quantization` of a converted model writes the same files.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

from tdq.quant import functional as F
from tdq.quant.modules import QuantConv2d, QuantLinear, QuantMixin

logger = logging.getLogger("tdq.backends")


class BackendError(RuntimeError):
    """Raised when a model cannot be lowered onto the requested backend (the message names the layer)."""


@dataclass
class LayerRecord:
    r"""
    What a backend did with one quantized layer.

    Args:
        kernel (`str`): the kernel that runs it (e.g. `"onednn.qconv2d_pointwise"`, `"simulate"`).
        reason (`str`, *optional*): why a layer stays on a fallback path (empty when it runs the backend's kernel).
        storage (`str`, *optional*): how its weight is held (`"int8"`, `"int4_packed"`, `"onednn_packed_int8"`,
            `"float"`).
    """

    kernel: str
    reason: str = ""
    storage: str = "float"

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"kernel": self.kernel, "reason": self.reason, "storage": self.storage}


@dataclass
class BackendState:
    r"""
    What `to_backend` attaches to a model (as `model._tdq_backend`), read by `backend_info`.

    Args:
        name (`str`): the backend that ran.
        requested (`str`): what the caller asked for (`"auto"` or a name).
        capability (`dict`): `get_cpu_capability()` at conversion time.
        layers (`dict[str, LayerRecord]`): per quantized layer.
        attention (`dict[str, LayerRecord]`): per quantized attention processor (`TDQConfig.attention`), the
            kernel of its two matmuls.
        choices (`dict[str, str]`): the backend's capability-dependent kernel choices and why (`Backend.choose`).
    """

    name: str
    requested: str
    capability: dict
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    attention: dict[str, LayerRecord] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)


def weight_rows(qmod: QuantMixin, codes: torch.Tensor | None = None) -> torch.Tensor:
    """
    The integer weight codes of a simulated layer as `int16` rows (layout of `reshape_for_granularity`).

    Args:
        qmod (`QuantMixin`): the simulated layer.
        codes (`torch.Tensor`, *optional*): codes loaded from a saved state (used as they are, no rounding).
    """
    wq = qmod.weight_quantizer
    if codes is not None:
        return codes.to(torch.int16)
    return wq.int_codes(qmod.weight.detach()).to(torch.int16)


class RealQuantModule(QuantMixin, nn.Module):
    r"""
    Base of the modules that execute a quantized layer for real. Subclasses implement `forward` and
    `dequantized_weight`.

    Args:
        qmod (`QuantMixin`): the calibrated simulated layer it replaces (its quantizers are reused, not copied).
    """

    kernel = "simulate"

    def __init__(self, qmod: QuantMixin):
        nn.Module.__init__(self)
        self.layer_name = qmod.layer_name
        self.context = qmod.context
        self.weight_quantizer = qmod.weight_quantizer
        self.act_quantizer = qmod.act_quantizer
        self.weight_shape = tuple(qmod.weight.shape)
        self.weight_dtype = qmod.weight.dtype
        self.is_conv = isinstance(qmod, nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = (
                tuple(qmod.stride),
                qmod.padding,
                tuple(qmod.dilation),
                qmod.groups,
            )
            self.in_channels, self.out_channels = qmod.in_channels, qmod.out_channels
            self.kernel_size = tuple(qmod.kernel_size)
            self.padding_mode = qmod.padding_mode
        else:
            self.in_features, self.out_features = qmod.in_features, qmod.out_features
        self.bias = qmod.bias
        smooth = getattr(qmod, "act_smooth", None)
        if smooth is not None:
            self.register_buffer("act_smooth", smooth.detach().clone().float())
        else:
            self.act_smooth = None
        self._wq_cache = None

    # ----------------------------------------------------------------- QuantMixin interface
    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed on each access: the module keeps integer codes only)."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The weight rebuilt from the integer codes, `(q - zp) * scale` (equals the simulator's fake-quant weight)."""
        raise NotImplementedError

    def quantized_weight(self) -> torch.Tensor:
        """The simulator's fake-quantized weight, rebuilt from the codes (equal to it, bit for bit)."""
        return self.dequantized_weight()

    def set_bits(self, weight_bits: int | None = None, act_bits: torch.Tensor | int | None = None) -> None:
        """Change activation bits (per bucket); the weight bit-width is fixed once the weight is held as codes."""
        if weight_bits is not None and int(weight_bits) != int(self.weight_quantizer.bits):
            raise BackendError(
                f"layer {self.layer_name!r}: weight bits cannot change after conversion to a real backend "
                "(its weight is held as integer codes); set them before tdq.to_backend"
            )
        super().set_bits(None, act_bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the simulated layer's layout: `weight` (dequantized codes), `bias`, then the quantizers (child modules)
        destination[prefix + "weight"] = self.dequantized_weight().detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self.act_smooth is not None:
            destination[prefix + "act_smooth"] = self.act_smooth

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise BackendError(
            f"layer {self.layer_name!r}: load a saved state into the float or simulated model "
            "(tdq.serialization.load_quantization(model, dir, backend=...)), not into a converted one"
        )

    # ----------------------------------------------------------------- helpers for subclasses
    def _float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            if self.padding_mode != "zeros":
                x = TF.pad(x, _reversed_padding(self.padding), mode=self.padding_mode)
                return TF.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
            return TF.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return TF.linear(x, weight, self.bias)

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_smooth is None:
            return x
        shape = (-1, 1, 1) if self.is_conv else (-1,)
        return x / self.act_smooth.view(shape).to(x.dtype)

    def simulate_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The simulator's arithmetic on the stored codes: fake-quantized input, dequantized weight, float op."""
        if not self.context.active:
            # no hook: the model runs as the float model would, here with the dequantized weight
            return self._float_forward(self._smoothed(x), self.dequantized_weight().to(x.dtype))
        return self._float_forward(
            self.act_quantizer(self._smoothed(x)), self.dequantized_weight().to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, kernel={self.kernel}, weight_shape={list(self.weight_shape)}"


def _reversed_padding(padding) -> list[int]:
    out = []
    for p in reversed(tuple(padding)):
        out += [p, p]
    return out


def dequantize_rows(
    rows: torch.Tensor, qmod_or_wq, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """`(q - zp) * scale` (or the codebook lookup `codebook[row, q]` for non-uniform levels) restored to the weight's
    shape: the same arithmetic as the weight quantizer's forward (bit-exact)."""
    wq = getattr(qmod_or_wq, "weight_quantizer", qmod_or_wq)
    out = wq.dequantize_codes(rows, dtype)
    return F.restore_from_granularity(out, torch.Size(shape), wq.spec.granularity)


def simulated_types() -> tuple[type, ...]:
    """The simulated module types a backend lowers."""
    return (QuantLinear, QuantConv2d)


def split_by_bucket(module: RealQuantModule, x: torch.Tensor, fn) -> torch.Tensor:
    """
    Run `fn(x_part, bucket)` once per timestep bucket present in the batch and reassemble the batch.

    One call when the whole batch shares a bucket (the usual case); a batch that mixes buckets (per-sample
    timesteps) is split along dim 0, so every sample uses its own bucket's static scale, as in the simulator.
    """
    ctx = module.context
    if ctx.bucket is not None:
        return fn(x, ctx.bucket)
    if ctx.buckets is None:
        raise RuntimeError(
            f"layer {module.layer_name!r}: no timestep was published for this call; quantized layers must run "
            "inside the hooked denoiser's forward"
        )
    b = module.act_quantizer._expand_buckets(ctx.buckets, x)
    ks = torch.unique(b).tolist()
    if len(ks) == 1:
        return fn(x, ks[0])
    out = None
    for k in ks:
        idx = (b == k).nonzero().squeeze(1)
        y = fn(x.index_select(0, idx), k)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, idx, y)
    return out


def fake_quant_bucket(module: RealQuantModule, x: torch.Tensor, k: int) -> torch.Tensor:
    """The simulator's activation fake-quantization of `x` with bucket `k`'s parameters (any bit-width; NaN/inf pass
    through unchanged, as in `TimestepActQuantizer`)."""
    scale, zp, qmin, qmax, scale_f, zp_i = module.act_quantizer._bucket_params()[k]
    if qmax >= 2**15 - 1:
        return x
    if x.dtype == torch.float32:
        return F.fake_quantize_per_tensor(x, scale_f, zp_i, qmin, qmax, keep_nonfinite=True)
    out = F.fake_quantize(x, scale.to(x.dtype), zp.to(x.dtype), qmin, qmax)
    return torch.where(torch.isfinite(x), out, x)


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Sorted `(start, end)` addresses of this process's file-backed memory mappings (Linux `/proc/self/maps`;
    empty where it cannot be read)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


@torch.no_grad()
def release_file_mappings(model: nn.Module) -> int:
    r"""
    Copy the float tensors of `model` that live in a file mapping (e.g. the memory-mapped safetensors checkpoint of a
    diffusers `from_pretrained` model) into memory of their own, so the mapping, and with it every float weight page
    read from it, is released once the quantized layers' float weights are gone.

    A converted model still holds a few float tensors (biases, norms, layers left in float). Without this copy each
    of them keeps the whole checkpoint mapped, and the pages the conversion read (all quantized weights) stay
    resident. Tied tensors stay tied.

    Args:
        model (`nn.Module`): the converted model.

    Returns:
        `int`: bytes copied (0 where nothing was mapped or the mappings cannot be read).
    """
    ranges = file_mapped_ranges()
    if not ranges:
        return 0
    starts = [lo for lo, _ in ranges]

    def mapped(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.is_mkldnn or t.is_meta or t.numel() == 0:
            return False
        ptr = t.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        return i >= 0 and ptr < ranges[i][1]

    copies: dict[int, torch.Tensor] = {}
    copied = 0
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None:
                    continue
                if id(t) not in copies:
                    if not mapped(t):
                        continue
                    new = t.detach().clone()
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    copies[id(t)] = new
                    copied += t.numel() * t.element_size()
                store[k] = copies[id(t)]
    return copied
