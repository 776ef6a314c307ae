"""`QATConfig`: quantization-aware fine-tuning (LSQ) of a calibrated model (a field of `TDQConfig`, `tdq.qat`)."""

from __future__ import annotations

from dataclasses import dataclass

from tdq.errors import ConfigError
from tdq.grid import check_bool, check_choice, is_int, is_real

QAT_TIMESTEPS = ("sampler", "uniform")


def _check_int(value, name: str, lo: int) -> None:
    if not is_int(value) or value < lo:
        raise ConfigError(f"{name}={value!r} must be an integer >= {lo}")


def _check_real(value, name: str, lo: float, *, strict: bool = False) -> None:
    if not is_real(value) or (value <= lo if strict else value < lo):
        raise ConfigError(f"{name}={value!r} must be a finite number {'>' if strict else '>='} {lo}")


@dataclass
class QATConfig:
    r"""
    LSQ quantization-aware fine-tuning after calibration and weight rounding (`tdq.qat.finetune_qat`); off by default.

    The per-channel weight step sizes and the per-timestep-bucket activation scales become parameters (LSQ: the
    straight-through estimator with LSQ's gradient scale), optionally the float master weights and LoRA adapters,
    trained by output distillation from the FP model on its own samples (data-free): for a random sampler timestep
    `t`, `x_t = add_noise(x0, eps, t)` and the loss is `MSE(q(x_t, t), fp(x_t, t))` (+ `eps_loss_weight` × the
    denoising loss against `eps`). The learned scales are written back into the quantizers' buffers at the end.

    Args:
        enabled (`bool`, *optional*, defaults to `False`): run the fine-tuning (in `tdq run`: after calibration).
        steps (`int`, *optional*, defaults to `200`): optimizer steps.
        lr (`float`, *optional*, defaults to `1e-3`): Adam learning rate of the step sizes (they are learned as a
            factor on their calibrated value, so this is a relative change per step).
        weight_lr (`float`, *optional*, defaults to `5e-3`): Adam learning rate of the float master weights, in
            units of each row's initial quantization step; `0` freezes the weights (scales only).
        learn_act_scales (`bool`, *optional*, defaults to `True`): learn the per-bucket activation scales.
        learn_weight_scales (`bool`, *optional*, defaults to `True`): learn the per-row weight step sizes.
        batch_size (`int`, *optional*, defaults to `8`): samples per step.
        num_samples (`int`, *optional*, defaults to `32`): FP-model samples `x0` drawn (seeds `sample_seed ...`).
        sample_seed (`int`, *optional*, defaults to `200000`): first seed of the `x0` samples.
        sample_steps (`int`, *optional*, defaults to `20`): sampler steps used to draw `x0`.
        timesteps (`str`, *optional*, defaults to `"sampler"`): `"sampler"` draws `t` uniformly from the evaluation
            sampler's `eval_steps` timesteps (each bucket weighted by its step occupancy, as calibration weights
            it), `"uniform"` from all training timesteps.
        eval_steps (`int`, *optional*, defaults to `20`): steps of the evaluation sampler (for `"sampler"`).
        eps_loss_weight (`float`, *optional*, defaults to `0.0`): weight of the true denoising loss
            `MSE(q(x_t, t), eps)` added to the distillation loss.
        lora_rank (`int`, *optional*, defaults to `0`): rank of float LoRA adapters `y = qlayer(x) + B(A(x))` on
            every quantized Conv2d/Linear; `0` is off. LoRA is simulated only (see `tdq.qat.lora`).
        lora_lr (`float`, *optional*, defaults to `1e-3`): Adam learning rate of the LoRA adapters.
        checkpoint_dir (`str`, *optional*, defaults to `""`): directory for resumable checkpoints (safetensors +
            JSON); `""` keeps none. A rerun resumes from the latest checkpoint there.
        checkpoint_every (`int`, *optional*, defaults to `50`): steps between checkpoints.
        seed (`int`, *optional*, defaults to `0`): seed of the batches, noise and timesteps (per step).
    """

    enabled: bool = False
    steps: int = 200
    lr: float = 1e-3
    weight_lr: float = 5e-3
    learn_act_scales: bool = True
    learn_weight_scales: bool = True
    batch_size: int = 8
    num_samples: int = 32
    sample_seed: int = 200000
    sample_steps: int = 20
    timesteps: str = "sampler"
    eval_steps: int = 20
    eps_loss_weight: float = 0.0
    lora_rank: int = 0
    lora_lr: float = 1e-3
    checkpoint_dir: str = ""
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self, field_name: str = "qat") -> None:
        """Raise `ConfigError` naming the first bad field."""
        check_bool(self.enabled, f"{field_name}.enabled")
        _check_int(self.steps, f"{field_name}.steps", 0)
        _check_real(self.lr, f"{field_name}.lr", 0.0)
        _check_real(self.weight_lr, f"{field_name}.weight_lr", 0.0)
        check_bool(self.learn_act_scales, f"{field_name}.learn_act_scales")
        check_bool(self.learn_weight_scales, f"{field_name}.learn_weight_scales")
        _check_int(self.batch_size, f"{field_name}.batch_size", 1)
        _check_int(self.num_samples, f"{field_name}.num_samples", 1)
        _check_int(self.sample_seed, f"{field_name}.sample_seed", 0)
        _check_int(self.sample_steps, f"{field_name}.sample_steps", 1)
        check_choice(self.timesteps, QAT_TIMESTEPS, f"{field_name}.timesteps")
        _check_int(self.eval_steps, f"{field_name}.eval_steps", 1)
        _check_real(self.eps_loss_weight, f"{field_name}.eps_loss_weight", 0.0)
        _check_int(self.lora_rank, f"{field_name}.lora_rank", 0)
        _check_real(self.lora_lr, f"{field_name}.lora_lr", 0.0)
        if not isinstance(self.checkpoint_dir, str):
            raise ConfigError(
                f"{field_name}.checkpoint_dir={self.checkpoint_dir!r} must be a string ('' = none)"
            )
        _check_int(self.checkpoint_every, f"{field_name}.checkpoint_every", 1)
        _check_int(self.seed, f"{field_name}.seed", 0)
