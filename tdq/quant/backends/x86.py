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

import torch

from tdq.quant.backends.base import (
    RealQuantModule,
    dequantize_rows,
    fake_quant_bucket,
    split_by_bucket,
    weight_rows,
)
from tdq.quant.modules import QuantMixin


def _inv_scale(scale_f: float) -> float:
    # 1.0f / scale in float32, the multiplier PyTorch's fake_quantize_per_tensor_affine uses
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale_f, dtype=torch.float32))


class X86Int8Module(RealQuantModule):
    r"""
    A `QuantLinear`/`QuantConv2d` executed by oneDNN's int8 kernels (u8 activations x s8 weights -> FP32).

    Holds only the prepacked `int8` weight (`packed_weight`, oneDNN's blocked layout), the per-channel weight
    scales, the bias and the layer's quantizers.

    Args:
        qmod (`QuantMixin`): the calibrated simulated layer (symmetric per-channel or per-tensor weights).
        codes (`torch.Tensor`, *optional*): saved integer codes (rows) to use instead of the layer's weight.
    """

    def __init__(self, qmod: QuantMixin, codes: torch.Tensor | None = None):
        super().__init__(qmod)
        wq = self.weight_quantizer
        rows = weight_rows(qmod, codes)
        q = rows.reshape(self.weight_shape).to(torch.int8)
        scale = wq.scale.reshape(-1).float()
        if scale.numel() == 1:
            scale = scale.expand(self.weight_shape[0]).contiguous()
        self.register_buffer("w_scale", scale.clone(), persistent=False)
        self.register_buffer(
            "w_zero_point", torch.zeros(self.weight_shape[0], dtype=torch.long), persistent=False
        )
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
        if not int_ok:  # > 8 activation bits at this bucket: the simulator's arithmetic, dequantized weight
            return self._float_forward(
                fake_quant_bucket(self, self._smoothed(x), k), self.dequantized_weight()
            )
        if self.act_smooth is not None:
            shape = (-1, 1, 1) if self.is_conv else (-1,)
            mult = (1.0 / self.act_smooth).view(shape) * inv
        else:
            mult = inv
        xq = x.mul(mult).round_().add_(zp).clamp_(lo, hi).to(torch.uint8)
        if self.is_conv:
            return torch.ops.onednn.qconv2d_pointwise(
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
