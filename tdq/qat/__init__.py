"""Quantization-aware fine-tuning (LSQ) of a quantized denoiser by data-free distillation from its FP model.

`finetune_qat` (learned step sizes and per-bucket activation scales, optional float master weights and float LoRA
adapters, resumable checkpoints); `LSQState` (the trainable state and its write-back into the quantizers); LoRA
helpers (`tdq.qat.lora`, simulated only). Configured by `tdq.qat_config.QATConfig` (`TDQConfig.qat`).
"""

from tdq.qat.lora import LoRA, attach_lora, check_no_lora, load_lora, lora_adapters, save_lora
from tdq.qat.lsq import LSQState, grad_scale, lsq_fake_quantize
from tdq.qat.train import distillation_error, finetune_qat, fp_samples, make_batch, timestep_pool
from tdq.qat_config import QATConfig

__all__ = [
    "LSQState",
    "LoRA",
    "QATConfig",
    "attach_lora",
    "check_no_lora",
    "distillation_error",
    "finetune_qat",
    "fp_samples",
    "grad_scale",
    "load_lora",
    "lora_adapters",
    "lsq_fake_quantize",
    "make_batch",
    "save_lora",
    "timestep_pool",
]
