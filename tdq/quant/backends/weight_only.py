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
The input's fake quantization (per-tensor, float32, the current bucket's static scale) is the simulator's
`tdq.quant.functional.fake_quantize_per_tensor`; other cases (mixed-bucket batches, per-token, stochastic rounding, `check_finite`, other dtypes) run the simulator's quantizer as it is.
"""

from __future__ import annotations

import torch

from tdq.quant import functional as F
from tdq.quant.backends.base import RealQuantModule, dequantize_rows, weight_rows
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
            xs = F.fake_quantize_per_tensor(xs, scale_f, zp_i, qmin, qmax, keep_nonfinite=True)
        return self._float_forward(xs, self.dequantized_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_input_ok(x):
            return self.simulate_forward(x)
        return self._run_bucket(x, self.context.bucket)
