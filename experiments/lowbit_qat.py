"""The QAT step of `lowbit.py`'s `*-qat` rows: LSQ fine-tuning (`tdq.qat`) of the calibrated model, resumable.

Kept out of `lowbit.py` so that script's diff stays small: a row whose `ROWS` entry has a 9th element (the
`QATConfig` fields) calls `run_qat` after calibration and before sampling.
"""

from __future__ import annotations

from pathlib import Path


def run_qat(mm, fresh, qat_fields: dict, steps: int, checkpoint_dir: Path) -> dict:
    """
    Fine-tune `mm.denoiser` (quantized, calibrated) with LSQ against a fresh FP copy (`fresh()`), DDIM `steps`.

    Checkpoints go to `checkpoint_dir`, so a killed run resumes there. Returns the row's `qat` entry (the
    `finetune_qat` report without the per-step losses, plus every 10th loss).
    """
    from tdq.qat import QATConfig, finetune_qat
    from tdq.sampling import make_scheduler

    cfg = QATConfig(
        enabled=True, eval_steps=steps, checkpoint_dir=str(checkpoint_dir), checkpoint_every=25, **qat_fields
    )
    fp = fresh().denoiser
    rep = finetune_qat(
        mm.denoiser, fp, make_scheduler(mm.scheduler, "ddim"), cfg, sample_shape=mm.sample_shape
    )
    losses = rep.pop("losses")
    rep["losses_every_10"] = losses[::10]
    rep["config"] = {k: v for k, v in cfg.__dict__.items() if k not in ("checkpoint_dir",)}
    return rep
