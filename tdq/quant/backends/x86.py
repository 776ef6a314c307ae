"""The x86 int8 backend: oneDNN `qconv2d_pointwise` / `qlinear_pointwise` with per-bucket static input scales.

The kernels take plain `uint8` activations with a per-tensor scale and zero-point given at call time (prepacking
does not bake the input scale in: checked by the tests at several scales and zero-points), per-channel `int8`
weights with zero-point 0 prepacked once, and return FP32. Activation codes are exactly the simulator's:
affine codes are passed as they are; symmetric codes `q` in `[-127, 127]` are shifted to `q + 128` with
zero-point 128. A bucket whose activation bit-width is below 8 runs on the same kernel with its coarser scale (the
codes are the simulator's); a bucket with more than 8 bits runs the simulator's arithmetic on the dequantized
weight. Weights with fewer than 8 bits run with their codes on the int8 kernel.
"""

from __future__ import annotations

import os

import torch

from tdq.quant import functional as F
from tdq.quant.backends.base import (
    RealQuantModule,
    dequantize_rows,
    fake_quant_bucket,
    split_by_bucket,
    weight_rows,
)
from tdq.quant.modules import QuantMixin

_inv_scale = F.inv_scale


def quantize_u8(x: torch.Tensor, scale: float, inv: float, zp: int, lo: int, hi: int) -> torch.Tensor | None:
    """
    The `uint8` activation codes the int8 kernels take: `F.integer_codes(x, scale, zp, lo, hi, signed=False)` (huge
    inputs saturate; `None` for NaN/+-inf). `inv` (`1.0f / scale`) is kept for callers; the codes use the same value.
    """
    return F.integer_codes(x, scale, zp, lo, hi, signed=False)


# Whether int8 convolutions return oneDNN's channels-last output as it is (True) or convert it to the input's memory
# format (False); `None` (default): chosen by capability (`conv_output_layout`). Per module as
# `X86Int8Module.keep_channels_last`; the environment variable `TDQ_X86_CHANNELS_LAST=1/0` overrides both.
KEEP_CHANNELS_LAST: bool | None = None


def conv_output_layout(capability: dict) -> tuple[bool, str]:
    r"""
    Whether int8 convolutions keep oneDNN's channels-last (NHWC) output (and the model runs channels-last), and why.

    oneDNN's int8 convolution reads and writes NHWC. It is fast enough (0.19-0.30x an FP32 conv with AVX-512 VNNI on
    a Zen 5 EPYC, ~0.09x on AMX) that converting its input and output between NCHW and NHWC costs a third or more of
    it; the model then runs channels-last from its input to its output (`run_channels_last`): GroupNorm (with affine
    parameters), SiLU, adds, concatenations and the int8 attention keep the layout. Measured on the big UNet (batch
    16, 1 thread; `experiments/results/backends.md`): AMX Xeon 0.44x -> 0.36x FP32, Zen 5 EPYC (VNNI, no AMX) 0.55x
    -> 0.51x, the same EPYC limited to AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, an emulation)
    0.69x -> 0.62x. So channels-last is the choice on every CPU the backend runs on; the reason names the evidence.
    The float ops between layers then sum in another order than the simulator's NCHW ops, so whole runs differ from
    the simulator like any accumulation-order change (per-layer outputs are the same values).

    Args:
        capability (`dict`): `get_cpu_capability()`.

    Returns:
        `(keep_channels_last, reason)`; `KEEP_CHANNELS_LAST` (when not `None`) and `TDQ_X86_CHANNELS_LAST` override.
    """
    env = os.environ.get("TDQ_X86_CHANNELS_LAST", "").strip()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"TDQ_X86_CHANNELS_LAST={env!r}: use 1 (keep channels-last) or 0 (restore NCHW)")
        return env == "1", "TDQ_X86_CHANNELS_LAST=" + env
    if KEEP_CHANNELS_LAST is not None:
        return bool(KEEP_CHANNELS_LAST), f"tdq.quant.backends.x86.KEEP_CHANNELS_LAST={KEEP_CHANNELS_LAST}"
    if capability.get("amx_int8"):
        return (
            True,
            "AMX: layout copies would cost ~1/3 of the int8 convolution (big UNet 0.44x -> 0.36x FP32)",
        )
    if capability.get("avx512_vnni"):
        return (
            True,
            "AVX-512 VNNI: layout copies cost ~1/3 of the int8 convolution (big UNet 0.55x -> 0.51x FP32)",
        )
    return (
        True,
        "AVX2: measured in an AVX2 emulation only (big UNet 0.69x -> 0.62x FP32); TDQ_X86_CHANNELS_LAST=0 restores NCHW",
    )


def _channels_last(t):
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _standard_layout(out):
    if isinstance(out, torch.Tensor):
        return out.contiguous() if out.dim() == 4 else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_standard_layout(o) for o in out)
    if isinstance(out, dict):  # diffusers' BaseOutput: item assignment also sets the field
        for k, v in list(out.items()):
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                out[k] = v.contiguous()
    return out


def _to_channels_last_hook(module, args, kwargs):
    """Forward pre-hook: the denoiser's 4-D float input (first positional argument, or `sample` / `hidden_states`)
    in channels-last, so the whole model (residual stream, skip connections) runs in the int8 convs' layout."""
    if args:
        return (_channels_last(args[0]), *args[1:]), kwargs
    for key in ("sample", "hidden_states"):
        if key in kwargs:
            kwargs = {**kwargs, key: _channels_last(kwargs[key])}
            break
    return args, kwargs


def _standard_layout_hook(module, args, kwargs, output):
    """Forward hook: 4-D outputs back in the standard (NCHW-contiguous) layout callers expect."""
    return _standard_layout(output)


class ChannelsLastGroupNorm(torch.nn.GroupNorm):
    r"""
    `nn.GroupNorm` that normalises a channels-last 4-D input as accurately as an NCHW one, and not slower than needed.

    PyTorch's channels-last GroupNorm CPU kernel takes the variance as `E[x^2] - E[x]^2`, which cancels when a group's
    mean is large against its spread (max error vs float64: 5.8e-5 at mean 3, 5.2e-3 at mean 30, std 1; the NCHW
    kernel: 1.9e-6 / 1.2e-5), and it is slow with 1-2 channels per group (10x the NCHW kernel at 16x32x28x28 with 32
    groups). With more than 2 channels per group, each group's mean is subtracted first (GroupNorm does not change
    under a per-group shift; one cheap pass over the channel means) and the channels-last kernel runs on that (error
    ~1e-6 at any mean); with 1-2 channels per group the input is copied to NCHW, normalised by the NCHW kernel and
    copied back (~2.5x faster than the channels-last kernel there). Other inputs run `nn.GroupNorm` as is. Same
    parameters and state dict as `nn.GroupNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        if c // g <= 2:
            out = torch.nn.functional.group_norm(x.contiguous(), g, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        # per-channel means over a view of the channels-last memory: one pass
        mean_c = x.permute(0, 2, 3, 1).reshape(b, h * w, c).mean(1)
        shift = mean_c.view(b, g, c // g).mean(-1, keepdim=True).expand(b, g, c // g).reshape(b, c, 1, 1)
        return torch.nn.functional.group_norm(x - shift, g, self.weight, self.bias, self.eps)


def _channels_last_output_hook(module, args, output):
    return _channels_last(output)


def run_channels_last(model: torch.nn.Module) -> None:
    """
    Make `model` (the converted denoiser) take its input in channels-last and hand its output back contiguous: with
    `keep_channels_last` convolutions, every activation between them then stays channels-last (no layout copies;
    GroupNorm, SiLU, adds and concatenations keep the layout; `nn.GroupNorm` modules become `ChannelsLastGroupNorm`,
    as accurate on that layout as on NCHW). Idempotent.
    """
    if getattr(model, "_tdq_channels_last_hooks", None):
        return
    handles = [
        model.register_forward_pre_hook(_to_channels_last_hook, with_kwargs=True),
        model.register_forward_hook(_standard_layout_hook, with_kwargs=True),
    ]
    # float convolutions (layers kept in float, tiny-reduction fallbacks) follow their input's layout, and an input
    # with one channel is both NCHW and channels-last (PyTorch then picks NCHW): their outputs are made channels-last
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) or (
            getattr(m, "is_conv", False) and not isinstance(m, X86Int8Module)
        ):
            handles.append(m.register_forward_hook(_channels_last_output_hook))
        elif type(m) is torch.nn.GroupNorm:
            m.__class__ = ChannelsLastGroupNorm  # same parameters; accurate on channels-last inputs
    object.__setattr__(model, "_tdq_channels_last_hooks", tuple(handles))


_ZEROS: dict[int, torch.Tensor] = {}


def _zeros(n: int) -> torch.Tensor:
    """Weight zero-points (all 0) of `n` channels, one shared tensor per size (the kernels only read them)."""
    if n not in _ZEROS:
        _ZEROS[n] = torch.zeros(n, dtype=torch.long)
    return _ZEROS[n]


class X86Int8Module(RealQuantModule):
    r"""
    A `QuantLinear`/`QuantConv2d` executed by oneDNN's int8 kernels (u8 activations x s8 weights -> FP32).

    Holds only the prepacked `int8` weight (`packed_weight`, oneDNN's blocked layout), the per-channel weight
    scales, the bias and the layer's quantizers.

    Args:
        qmod (`QuantMixin`): the calibrated simulated layer (symmetric per-channel or per-tensor weights).
        codes (`torch.Tensor`, *optional*): saved integer codes (rows) to use instead of the layer's weight.
        keep_channels_last (`bool`, *optional*, defaults to `False`): a convolution returns oneDNN's channels-last
            output as it is instead of the input's memory format (recorded in `backend_info(model)["choices"]`).
    """

    def __init__(self, qmod: QuantMixin, codes: torch.Tensor | None = None, keep_channels_last: bool = False):
        super().__init__(qmod)
        wq = self.weight_quantizer
        rows = weight_rows(qmod, codes)
        q = rows.reshape(self.weight_shape).to(torch.int8)
        scale = wq.scale.reshape(-1)  # a view: shares the weight quantizer's storage (no second copy)
        if scale.numel() == 1:
            scale = scale.expand(self.weight_shape[0])
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_zero_point", _zeros(self.weight_shape[0]), persistent=False)
        if self.is_conv:
            self.kernel = "onednn.qconv2d_pointwise"
            packed = torch.ops.onednn.qconv_prepack(
                q,
                self.w_scale,
                1.0,
                0,
                list(self.stride),
                list(self.padding),
                list(self.dilation),
                self.groups,
                None,
            )
        else:
            self.kernel = "onednn.qlinear_pointwise"
            packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.register_buffer("packed_weight", packed, persistent=False)
        self._kparams = None
        self.keep_channels_last = bool(keep_channels_last)

    def dequantized_weight(self) -> torch.Tensor:
        """The simulator's fake-quantized weight, rebuilt from the packed codes."""
        q = self.packed_weight.to_dense()
        if not self.is_conv:
            q = q.t()
        wq = self.weight_quantizer
        rows = q.reshape(wq.scale.shape[0], -1).to(torch.int16)
        return dequantize_rows(rows, wq, self.weight_shape, self.weight_dtype)

    def _kernel_params(self) -> list:
        params = self.act_quantizer._bucket_params()
        if self._kparams is None or self._kparams[0] is not params:
            shift = 128 if self.act_quantizer.spec.symmetric else 0
            per_bucket = []
            for _, _, qmin, qmax, scale_f, zp_i in params:
                int_ok = qmin + shift >= 0 and qmax + shift <= 255
                per_bucket.append(
                    (int_ok, _inv_scale(scale_f), zp_i + shift, qmin + shift, qmax + shift, scale_f)
                )
            self._kparams = (params, per_bucket)
        return self._kparams[1]

    def _run_bucket(self, x: torch.Tensor, k: int) -> torch.Tensor:
        int_ok, inv, zp, lo, hi, scale_f = self._kernel_params()[k]
        xs = self._smoothed(x)
        xq = quantize_u8(xs, scale_f, inv, zp, lo, hi) if int_ok else None
        if xq is None:
            # > 8 activation bits at this bucket, or NaN/inf in the input: the simulator's arithmetic (NaN/inf kept),
            # dequantized weight
            return self._float_forward(fake_quant_bucket(self, xs, k), self.dequantized_weight())
        nchw = self.is_conv and not x.is_contiguous(memory_format=torch.channels_last)
        if nchw:
            xq = xq.contiguous(memory_format=torch.channels_last)  # oneDNN's int8 conv is fastest in NHWC
        if self.is_conv:
            out = torch.ops.onednn.qconv2d_pointwise(
                xq,
                scale_f,
                zp,
                self.packed_weight,
                self.w_scale,
                self.w_zero_point,
                self.bias,
                list(self.stride),
                list(self.padding),
                list(self.dilation),
                self.groups,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
            # oneDNN writes channels-last. By default the output takes the input's memory format, as F.conv2d's,
            # so the float ops between layers sum in the simulator's order. `keep_channels_last` skips that copy
            # (~2/3 of an int8 conv's time at 16x256x16x16) but changes their summation order: measured on
            # mnist-ddpm it moves whole DDIM runs further from the simulator (experiments/results/backend_psnr.md).
            return out.contiguous() if nchw and not self.keep_channels_last else out
        return torch.ops.onednn.qlinear_pointwise(
            xq.contiguous(),
            scale_f,
            zp,
            self.packed_weight,
            self.w_scale,
            self.w_zero_point,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.act_quantizer
        if not self.context.active or aq.mode != "quant" or x.dtype != torch.float32:
            return self.simulate_forward(x)
        if not aq._calibrated_all():
            return self.simulate_forward(x)  # raises the simulator's NotCalibratedError
        return split_by_bucket(self, x, self._run_bucket)
