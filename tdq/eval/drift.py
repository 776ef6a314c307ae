"""Per-step trajectory drift between a quantized sampler and its full-precision reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["trajectory_drift"]


def trajectory_drift(
    fp_traj: Sequence[torch.Tensor],
    q_traj: Sequence[torch.Tensor],
    *,
    per_sample: bool = False,
) -> list[float]:
    """Relative drift ``||x_t(q) - x_t(FP)|| / ||x_t(FP)||`` at every sampler step.

    Both trajectories must come from the same seeds and scheduler, one tensor per step (any shape, e.g.
    ``[N, C, H, W]``). Norms are Frobenius norms over the whole tensor, computed in float64.

    Args:
        fp_traj (`Sequence[torch.Tensor]`): full-precision latents ``x_t``, one per step.
        q_traj (`Sequence[torch.Tensor]`): quantized-model latents, same length and shapes.
        per_sample (`bool`, *optional*, defaults to `False`):
            When `True`, compute the ratio per sample (dim 0) and average over samples instead of pooling
            the whole batch.

    Returns:
        `list[float]`: one value per step; ``0.0`` where both are zero, ``inf`` where only the reference is.
    """
    if len(fp_traj) != len(q_traj):
        raise ValueError(f"trajectories differ in length: {len(fp_traj)} vs {len(q_traj)}")
    out: list[float] = []
    for step, (a, b) in enumerate(zip(fp_traj, q_traj, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"step {step}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        ref = a.detach().to("cpu", torch.float64)
        diff = b.detach().to("cpu", torch.float64) - ref
        if per_sample and ref.ndim > 0:
            num = diff.reshape(diff.shape[0], -1).norm(dim=1)
            den = ref.reshape(ref.shape[0], -1).norm(dim=1)
        else:
            num, den = diff.norm().reshape(1), ref.norm().reshape(1)
        ratio = torch.where(
            den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(num)
        )
        ratio = torch.where((den == 0) & (num > 0), torch.full_like(num, float("inf")), ratio)
        out.append(float(ratio.mean()))
    return out
