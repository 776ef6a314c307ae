"""The CUDA int8 backend: `torch._int_mm` (int8 x int8 -> int32) for Linear layers with the same static scales.

Activation codes are the simulator's (affine `uint8` or symmetric `int8` codes of the current bucket); they are
shifted to `int8` as `q - 128` and the shift is undone with the weight's per-channel code sums:
`sum_i (q_i - zp) w_i = sum_i (q_i - 128) w_i + (128 - zp) sum_i w_i`, exact in int32. Convolutions hold int8 codes
and run the simulator's arithmetic on the dequantized weight (no implicit-GEMM int8 conv in PyTorch).
The module also runs on CPU (`aten._int_mm` has a CPU kernel), which is how the arithmetic is tested without a GPU.
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
from tdq.quant.functional import inv_scale as _inv_scale
from tdq.quant.modules import QuantMixin


class IntMMLinear(RealQuantModule):
    r"""
    A `QuantLinear` executed by `torch._int_mm` with per-bucket static activation scales.

    Args:
        qmod (`QuantMixin`): the calibrated simulated Linear (symmetric per-channel or per-tensor weights).
        codes (`torch.Tensor`, *optional*): saved integer codes (rows) to use instead of the layer's weight.
    """

    kernel = "aten._int_mm"

    def __init__(self, qmod: QuantMixin, codes: torch.Tensor | None = None):
        super().__init__(qmod)
        wq = self.weight_quantizer
        q = weight_rows(qmod, codes).reshape(self.weight_shape).to(torch.int8)
        scale = wq.scale.reshape(-1).float()
        if scale.numel() == 1:
            scale = scale.expand(self.weight_shape[0])
        self.register_buffer("w_scale", scale.contiguous().clone(), persistent=False)
        self.register_buffer("weight_t", q.t().contiguous(), persistent=False)  # [in, out] int8
        self.register_buffer("w_colsum", q.to(torch.int32).sum(1), persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The simulator's fake-quantized weight, rebuilt from the codes."""
        wq = self.weight_quantizer
        rows = self.weight_t.t().reshape(wq.scale.shape[0], -1).to(torch.int16)
        return dequantize_rows(rows, wq, self.weight_shape, self.weight_dtype)

    def _run_bucket(self, x: torch.Tensor, k: int) -> torch.Tensor:
        _, _, qmin, qmax, scale_f, zp_i = self.act_quantizer._bucket_params()[k]
        shift = 128 if self.act_quantizer.spec.symmetric else 0
        if qmin + shift < 0 or qmax + shift > 255:
            return self._float_forward(
                fake_quant_bucket(self, self._smoothed(x), k), self.dequantized_weight()
            )
        x = self._smoothed(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        q = x2.mul(_inv_scale(scale_f)).round_().add_(zp_i + shift).clamp_(qmin + shift, qmax + shift)
        qs = q.sub_(128).to(torch.int8)
        m = qs.shape[0]
        pad = 0
        if x.is_cuda and (m <= 16 or m % 8):  # cuBLAS int8 GEMM: M > 16 and a multiple of 8
            pad = -(-max(m, 17) // 8) * 8 - m
            qs = torch.nn.functional.pad(qs, (0, 0, 0, pad))
        acc = torch._int_mm(qs, self.weight_t)
        if pad:
            acc = acc[:m]
        acc = acc + (128 - (zp_i + shift)) * self.w_colsum
        y = acc.float() * (self.w_scale * scale_f)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.act_quantizer
        if (
            not self.context.active
            or aq.mode != "quant"
            or x.dtype != torch.float32
            or not aq._calibrated_all()
        ):
            return self.simulate_forward(x)
        return split_by_bucket(self, x, self._run_bucket)
