"""Weight-only backends: weights held as `int8` codes or packed `int4` (two codes per byte), dequantized per call.

The arithmetic is the simulator's (fake-quantized input, dequantized weight, float kernel), so outputs equal the
simulated model's bit for bit; what changes is memory: no float weight is kept. This is the memory-bound mode.

Why not `aten._weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`: on the machines measured they are GEMV
kernels for LLM decoding, 30-90x slower than FP32 at the M (batch x pixels) of a diffusion denoiser
(`experiments/results/backends.json`, `kernel_microbench`); dequantize-then-GEMM costs ~1.05x FP32 there.
Convolutions in weight-only mode hold their codes the same way and are dequantized per call.

Layers with non-uniform levels (`weight.levels` log2/kmeans) hold their codebook indices the same way (unsigned,
packed two per byte at <= 4 bits) plus the small per-row codebook, and dequantize by a table lookup per call
(`kernel` `"lut_dequant_int4+float"` / `"lut_dequant_int8+float"`).
The input's fake quantization (per-tensor, float32, the current bucket's static scale) uses `fast_fake_quant`, bit
for bit PyTorch's `fake_quantize_per_tensor_affine` (which the simulator calls) in ~1/15 of its time on an AMX Xeon;
other cases (mixed-bucket batches, per-token, stochastic rounding, `check_finite`, other dtypes) run the simulator's quantizer as it is.
"""

from __future__ import annotations

import torch

from tdq.quant import functional as F
from tdq.quant.backends.base import RealQuantModule, dequantize_rows, weight_rows
from tdq.quant.backends.x86 import _HAS_QTENSOR
from tdq.quant.modules import QuantMixin


class WeightOnlyModule(RealQuantModule):
    r"""
    A quantized layer whose weight is stored as integer codes only and dequantized at every call.

    Args:
        qmod (`QuantMixin`): the calibrated simulated layer (any weight granularity, symmetric or affine).
        codes (`torch.Tensor`, *optional*): saved integer codes (rows) to use instead of the layer's weight.
        pack4 (`bool`, *optional*, defaults to `False`): pack codes two per byte (layers with at most 4 weight bits).
    """

    def __init__(self, qmod: QuantMixin, codes: torch.Tensor | None = None, pack4: bool = False):
        super().__init__(qmod)
        rows = weight_rows(qmod, codes)
        self.rows_shape = tuple(rows.shape)
        signed = self.weight_quantizer.codes_signed
        self.packed4 = bool(pack4)
        lut = "lut_" if self.weight_quantizer.has_codebook else ""
        if pack4:
            self.register_buffer("weight_codes", F.pack_int4(rows), persistent=False)
            self.kernel = lut + "dequant_int4+float"
        else:
            self.register_buffer(
                "weight_codes", rows.to(torch.int8 if signed else torch.uint8), persistent=False
            )
            self.kernel = lut + "dequant_int8+float"

    @property
    def storage(self) -> str:
        """`"int4_packed"` or `"int8"` (`+codebook` with non-uniform levels)."""
        return ("int4_packed" if self.packed4 else "int8") + (
            "+codebook" if self.weight_quantizer.has_codebook else ""
        )

    def codes(self) -> torch.Tensor:
        """The integer codes as `int16` rows."""
        if self.packed4:
            n = self.rows_shape[0] * self.rows_shape[1]
            q = F.unpack_int4(self.weight_codes, n).to(torch.int16)
            if not self.weight_quantizer.codes_signed:
                q = q & 0xF
            return q.reshape(self.rows_shape)
        return self.weight_codes.to(torch.int16)

    def dequantized_weight(self) -> torch.Tensor:
        """The simulator's fake-quantized weight, rebuilt from the codes."""
        return dequantize_rows(self.codes(), self.weight_quantizer, self.weight_shape, self.weight_dtype)

    def _fast_input_ok(self, x: torch.Tensor) -> bool:
        aq, ctx = self.act_quantizer, self.context
        return (
            ctx.active
            and ctx.bucket is not None  # a mixed-bucket batch: the simulator's per-sample arithmetic
            and aq.mode == "quant"
            and x.dtype == torch.float32
            and aq.spec.enabled
            and aq.spec.granularity == "per_tensor"
            and not (aq.spec.rounding == "stochastic" and aq.training)
            and not getattr(ctx, "check_finite", False)
            and not getattr(aq, "needs_init", False)
            and aq._calibrated_all()
        )

    def _run_bucket(self, x: torch.Tensor, k: int) -> torch.Tensor:
        _, _, qmin, qmax, scale_f, zp_i = self.act_quantizer._bucket_params()[k]
        xs = self._smoothed(x)
        if qmax < 2**15 - 1:  # 16-bit: the simulator's identity
            xs = torch.where(torch.isfinite(xs), fast_fake_quant(xs, scale_f, zp_i, qmin, qmax), xs)
        return self._float_forward(xs, self.dequantized_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_input_ok(x):
            return self.simulate_forward(x)
        return self._run_bucket(x, self.context.bucket)


def fast_fake_quant(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    r"""
    `torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)` for float32 `x`, bit for bit, in about 1/15 of
    its time (measured on an AMX Xeon, 16x256x16x16: 1.9 ms vs 34 ms): PyTorch's vectorised `quantize_per_tensor`
    (the same `round(x * (1/scale)) + zp` codes), the codes clamped to `[qmin, qmax]` in place, then `dequantize`
    (`(q - zp) * scale`, the fake quantizer's own formula). Falls back to the fused op where quantized dtypes are gone
    or the range does not fit 8 bits.
    """
    if _HAS_QTENSOR and 0 <= qmin and qmax <= 255:
        dtype, lo, hi = torch.quint8, 0, 255
    elif _HAS_QTENSOR and -128 <= qmin and qmax <= 127 and -128 <= zp <= 127:
        dtype, lo, hi = torch.qint8, -128, 127
    else:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    qx = torch.quantize_per_tensor(x, scale, zp, dtype)
    if qmin > lo or qmax < hi:
        codes = torch.empty(0, dtype=torch.uint8 if dtype == torch.quint8 else torch.int8).set_(
            qx.untyped_storage(), qx.storage_offset(), qx.size(), qx.stride()
        )
        codes.clamp_(qmin, qmax)  # the QTensor shares this storage
    return qx.dequantize()
