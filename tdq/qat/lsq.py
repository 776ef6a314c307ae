"""LSQ parameters of a quantized model: learned step sizes, float master weights and optional LoRA adapters.

`LSQState.attach(model, ...)` turns, for every quantized Conv2d/Linear, the weight quantizer's per-row `scale` and
the activation quantizer's per-bucket `scale` into trainable factors on their calibrated values
(`s = s0 * p`, `p` initialised to 1), optionally the weight into `W0 + s0_row * D` (a float master weight, `D` in
units of the initial step, initialised to 0) and adds float LoRA adapters. While attached, each layer's forward runs
LSQ fake quantization (Esser et al., 2020): `q = clamp(round(x / s) + zp, qmin, qmax)`, `x_hat = (q - zp) * s`
with a straight-through estimator for the rounding, so `d x_hat / d s` is LSQ's `round(x/s) - x/s` inside the range
and `qmin - zp` / `qmax - zp` outside it, and the step-size gradient scaled by LSQ's `g = 1 / sqrt(N * qmax)`.
Zero-points stay fixed. `finish()` writes the learned scales (clamped positive and checked finite) back into the
quantizers' buffers, with `min_val`/`max_val` consistent with them, puts every weight back on its grid (the codes
re-derived with the learned scales) and restores the layers' own forward, so saving, loading and the integer
backends see ordinary quantizers.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as TF
from torch import nn

from tdq.api import get_quantization, iter_quant_layers
from tdq.qat.lora import LoRA
from tdq.quant import functional as F

# Learned scale factors never go below this fraction of their calibrated value (keeps scales positive, finite).
MIN_FACTOR = 1e-3


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """`x` in the forward pass, gradient multiplied by `g` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin, qmax
) -> torch.Tensor:
    """Fake quantization differentiable in `x` and `scale` (STE rounding); `qmin`/`qmax` ints or tensors."""
    q = F.round_ste(x / scale) + zero_point
    if isinstance(qmin, torch.Tensor):
        q = torch.maximum(torch.minimum(q, qmax.to(q.dtype)), qmin.to(q.dtype))
    else:
        q = torch.clamp(q, qmin, qmax)
    return (q - zero_point) * scale


class _LayerQAT:
    """The trainable state of one quantized layer (see `LSQState`)."""

    def __init__(self, name: str, m: nn.Module, learn_w: bool, learn_a: bool, learn_weight: bool, rank: int):
        self.name = name
        self.module = m
        wq, aq = m.weight_quantizer, m.act_quantizer
        self.w_enabled = wq.spec.enabled
        self.a_enabled = aq.spec.enabled and aq.spec.granularity != "per_token"
        self.w0 = m.weight.detach().clone()
        self.s0_w = wq.scale.detach().clone().float()
        self.s0_a = aq.scale.detach().clone().float()
        dev = m.weight.device
        self.p_w = nn.Parameter(torch.ones_like(self.s0_w), requires_grad=learn_w and self.w_enabled)
        self.p_a = nn.Parameter(torch.ones_like(self.s0_a), requires_grad=learn_a and self.a_enabled)
        rows = F.reshape_for_granularity(self.w0, wq.spec.granularity, wq.spec.group_size)
        self.delta = nn.Parameter(torch.zeros_like(rows, dtype=torch.float32), requires_grad=learn_weight)
        self.lora = LoRA.for_layer(m, rank).to(dev) if rank > 0 else None

    def params(self) -> dict[str, nn.Parameter]:
        """Named tensors of this layer's state (checkpoint keys), trainable or not."""
        out = {f"{self.name}.p_w": self.p_w, f"{self.name}.p_a": self.p_a, f"{self.name}.delta": self.delta}
        if self.lora is not None:
            out.update({f"{self.name}.lora.{k}": v for k, v in self.lora.named_parameters()})
        return out

    # -------------------------------------------------------------- the quantities the forward pass uses
    def weight_scale(self) -> torch.Tensor:
        return self.s0_w * self.p_w.clamp(min=MIN_FACTOR)

    def act_scale(self) -> torch.Tensor:
        return self.s0_a * self.p_a.clamp(min=MIN_FACTOR)

    def master_rows(self) -> torch.Tensor:
        wq = self.module.weight_quantizer
        rows = F.reshape_for_granularity(self.w0.float(), wq.spec.granularity, wq.spec.group_size)
        return rows + self.s0_w * self.delta

    def fake_weight(self) -> torch.Tensor:
        m = self.module
        wq = m.weight_quantizer
        rows = self.master_rows()
        if not self.w_enabled:
            return F.restore_from_granularity(rows, m.weight.shape, wq.spec.granularity).to(m.weight.dtype)
        qmin, qmax = wq.qrange()
        s = self.weight_scale()
        if self.p_w.requires_grad:
            s = grad_scale(s, 1.0 / math.sqrt(rows.shape[1] * max(qmax, 1)))
        wq_rows = lsq_fake_quantize(rows, s, wq.zero_point.float(), qmin, qmax)
        return F.restore_from_granularity(wq_rows, m.weight.shape, wq.spec.granularity).to(m.weight.dtype)

    def fake_act(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.module.act_quantizer
        ctx = aq.context
        if not self.a_enabled:
            return aq(x)
        s_all = self.act_scale()
        zp_all = aq.zero_point.float()
        qmins, qmaxs = F.qrange(aq.bits, aq.spec.symmetric)
        if ctx.bucket is not None:
            k = ctx.bucket
            qmax = int(qmaxs[k])
            if qmax >= 2**15 - 1:
                return x
            s = s_all[k]
            if self.p_a.requires_grad:
                s = grad_scale(s, 1.0 / math.sqrt(x[0].numel() * qmax))
            return lsq_fake_quantize(x, s, zp_all[k], int(qmins[k]), qmax).to(x.dtype)
        b = aq._expand_buckets(ctx.buckets, x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        qmax = qmaxs[b].view(shape)
        s = s_all[b].view(shape)
        if self.p_a.requires_grad:
            s = grad_scale(s, 1.0 / math.sqrt(x[0].numel() * float(qmaxs.clamp(max=2**15).max())))
        y = lsq_fake_quantize(x, s, zp_all[b].view(shape), qmins[b].view(shape), qmax)
        return torch.where(qmax >= 2**15 - 1, x, y.to(x.dtype))


def _qat_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    st: _LayerQAT = self.__dict__["_qat"]
    if not self.context.active:  # the float path of the layer, unchanged
        return type(self).forward(self, x)
    x_in = x
    x = self.smooth_input(x)
    xq = st.fake_act(x)
    w = st.fake_weight()
    if isinstance(self, nn.Conv2d):
        y = self._conv_forward(xq, w, self.bias)
    else:
        y = TF.linear(xq, w, self.bias)
    if st.lora is not None:
        y = y + st.lora(x_in)
    return y


class LSQState:
    r"""
    The trainable LSQ state of a quantized model; attach, train its `parameters()`, then `finish()`.

    Args:
        model (`nn.Module`): a quantized, calibrated model (`tdq.quantize_` + calibration).
        learn_weight_scales (`bool`): per-row weight step sizes trainable.
        learn_act_scales (`bool`): per-bucket activation scales trainable.
        learn_weights (`bool`): float master weights trainable.
        lora_rank (`int`): rank of float LoRA adapters (`0`: none).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        learn_weight_scales: bool = True,
        learn_act_scales: bool = True,
        learn_weights: bool = True,
        lora_rank: int = 0,
    ):
        get_quantization(model)  # raises for a model tdq did not quantize
        self.model = model
        self.layers: dict[str, _LayerQAT] = {}
        for name, m in iter_quant_layers(model):
            if not isinstance(m, nn.Conv2d | nn.Linear):
                continue
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                continue
            self.layers[name] = _LayerQAT(
                name, m, learn_weight_scales, learn_act_scales, learn_weights, lora_rank
            )
        self.attached = False

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Every state tensor by a stable name (for checkpoints), trainable or not."""
        out: dict[str, nn.Parameter] = {}
        for st in self.layers.values():
            out.update(st.params())
        return out

    def param_groups(self, lr: float, weight_lr: float, lora_lr: float) -> list[dict]:
        """Optimizer groups: step sizes at `lr`, master weights at `weight_lr`, LoRA at `lora_lr` (trainable only)."""
        scales, weights, lora = [], [], []
        for key, p in self.named_tensors().items():
            if not p.requires_grad:
                continue
            (lora if ".lora." in key else weights if key.endswith(".delta") else scales).append(p)
        groups = [g for g in ((scales, lr), (weights, weight_lr), (lora, lora_lr)) if g[0]]
        return [{"params": ps, "lr": group_lr} for ps, group_lr in groups]

    def attach(self) -> None:
        """Route every layer's forward through its LSQ fake quantization."""
        for st in self.layers.values():
            st.module.__dict__["_qat"] = st
            st.module.forward = types.MethodType(_qat_forward, st.module)
        self.attached = True

    def detach(self) -> None:
        """Restore every layer's own forward (the learned state is not written back; see `finish`)."""
        for st in self.layers.values():
            st.module.__dict__.pop("_qat", None)
            st.module.__dict__.pop("forward", None)
        self.attached = False

    @torch.no_grad()
    def finish(self) -> dict:
        """
        Write the learned scales into the quantizers' buffers, put each weight on its grid, restore the forward.

        Returns:
            `dict`: mean and extreme learned scale factors (weights, activations) and the share of weight codes
            that changed.
        """
        self.detach()
        fw, fa, changed, total = [], [], 0, 0
        for name, st in self.layers.items():
            m = st.module
            wq, aq = m.weight_quantizer, m.act_quantizer
            if st.w_enabled:
                s_new = st.weight_scale().float().clamp(min=F.MIN_SCALE)
                _check_finite(s_new, name, "weight scale")
                qmin, qmax = wq.qrange()
                old_codes = F.quantize(
                    F.reshape_for_granularity(
                        m.weight.detach().float(), wq.spec.granularity, wq.spec.group_size
                    ),
                    wq.scale,
                    wq.zero_point,
                    qmin,
                    qmax,
                )
                rows = st.master_rows()
                codes = F.quantize(rows, s_new, wq.zero_point.float(), qmin, qmax)
                wq.scale.copy_(s_new)
                wq.min_val.copy_((qmin - wq.zero_point) * s_new)
                wq.max_val.copy_((qmax - wq.zero_point) * s_new)
                deq = F.dequantize(codes, s_new, wq.zero_point.float())
                m.weight.data.copy_(F.restore_from_granularity(deq, m.weight.shape, wq.spec.granularity))
                m._wq_cache = None
                changed += int((codes != old_codes).sum())
                total += codes.numel()
                fw.append(st.p_w.detach().clamp(min=MIN_FACTOR).flatten())
            if st.a_enabled:
                s_new = st.act_scale().float().clamp(min=F.MIN_SCALE)
                _check_finite(s_new, name, "activation scale")
                qmins, qmaxs = F.qrange(aq.bits, aq.spec.symmetric)
                keep = qmaxs >= 2**15 - 1  # 16-bit buckets keep their (unused) scale
                s_new = torch.where(keep, aq.scale, s_new)
                aq.scale.copy_(s_new)
                aq.min_val.copy_(torch.where(keep, aq.min_val, (qmins - aq.zero_point) * s_new))
                aq.max_val.copy_(torch.where(keep, aq.max_val, (qmaxs - aq.zero_point) * s_new))
                aq._params = None
                fa.append(st.p_a.detach().clamp(min=MIN_FACTOR).flatten())
        fw_t = torch.cat(fw) if fw else torch.ones(1)
        fa_t = torch.cat(fa) if fa else torch.ones(1)
        return {
            "weight_scale_factor": {
                "mean": float(fw_t.mean()),
                "min": float(fw_t.min()),
                "max": float(fw_t.max()),
            },
            "act_scale_factor": {
                "mean": float(fa_t.mean()),
                "min": float(fa_t.min()),
                "max": float(fa_t.max()),
            },
            "weight_codes_changed": changed / max(total, 1),
        }


def _check_finite(t: torch.Tensor, name: str, what: str) -> None:
    if not bool(torch.isfinite(t).all() & (t > 0).all()):
        raise FloatingPointError(f"layer {name!r}: QAT produced a non-finite or non-positive {what}")
