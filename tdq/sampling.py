"""Seeded samplers over diffusers denoisers and schedulers, recording the trajectory x_t of every step.

The initial noise of every sample comes from its own seed, and so does the step noise of stochastic samplers
(DDPM, DDIM with eta > 0, ancestral samplers: one CPU generator per seed), so the random numbers a sample sees do
not depend on the batch it ran in: FP and quantized runs (and shards of a multi-process run) see identical noise.

Numerically, a sample can still differ in the last float32 bits (~1e-5 after 20 steps on CPU) when it runs in a
batch of another composition or with another number of CPU threads (oneDNN/BLAS pick other blockings); sharding
whole batches of `batch_size` seeds across processes (`tdq.eval.distributed`) keeps results bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}


def make_scheduler(base, name: str | None):
    """
    A scheduler of another type built from `base`'s config (`None` keeps `base`).

    Args:
        base (`SchedulerMixin`): the model's own scheduler.
        name (`str`, *optional*): one of `ddpm`, `ddim`, `dpmsolver`, `euler`, `pndm`.
    """
    if name is None:
        return base
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {sorted(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)


#: Offset added to a sample's seed to seed its step-noise generator (stochastic samplers).
STEP_NOISE_SEED_OFFSET = 7919


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """
    One CPU generator per seed for the step noise of stochastic schedulers (seeded `seed + 7919`).

    Passed as `generator=[...]` to a diffusers scheduler's `step`, `randn_tensor` draws sample `i`'s noise from
    generator `i`, so the noise of a sample does not depend on its batch.

    Args:
        seeds (`Sequence[int]`): one seed per sample of the batch.

    Returns:
        `list[torch.Generator]`: the generators, in the order of `seeds`.
    """
    return [torch.Generator().manual_seed(int(s) + STEP_NOISE_SEED_OFFSET) for s in seeds]


def initial_noise(seeds: Sequence[int], shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Stack one standard-normal tensor of `shape` per seed (CPU generator, so it is device independent)."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
            for s in seeds
        ]
    )


@dataclass
class SampleResult:
    r"""
    Output of a sampler.

    Args:
        images (`torch.Tensor`): final images, float in [0, 1], `[N, C, H, W]`, on the CPU.
        trajectory (`list[torch.Tensor]`): x_t after every step (model space), each `[N, ...]`, on the CPU.
        timesteps (`list[float]`): the scheduler's timesteps, one per step.
        seeds (`list[int]`): the seed of every sample, in row order (empty when unknown).
    """

    images: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


class DiffusionSampler:
    r"""
    The standard denoising loop (as in `DDIMPipeline`) for a pixel-space denoiser, with per-seed noise and the
    trajectory recorded.

    Args:
        denoiser (`nn.Module`): e.g. a `UNet2DModel`; called as `denoiser(x_t, t)`.
        scheduler (`SchedulerMixin`): the diffusers scheduler to step with.
        sample_shape (`tuple[int, ...]`): shape of one sample `(C, H, W)`.
        num_inference_steps (`int`, *optional*, defaults to `20`): number of steps.
        eta (`float`, *optional*, defaults to `0.0`): DDIM eta (ignored by other schedulers).
        batch_size (`int`, *optional*, defaults to `16`): samples per denoiser call.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to run.
        record_trajectory (`bool`, *optional*, defaults to `True`): keep x_t of every step.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler,
        sample_shape: Sequence[int],
        num_inference_steps: int = 20,
        eta: float = 0.0,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        record_trajectory: bool = True,
        progress: bool = True,
    ):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape)
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.record_trajectory = record_trajectory
        self.progress = progress

    def _step_kwargs(self, generator):
        import inspect

        params = inspect.signature(self.scheduler.step).parameters
        kw = {}
        if "eta" in params:
            kw["eta"] = self.eta
        if "generator" in params:
            kw["generator"] = generator
        return kw

    @torch.no_grad()
    def sample_batch(self, seeds: Sequence[int]) -> SampleResult:
        """Sample one batch, one image per seed."""
        sch = self.scheduler
        sch.set_timesteps(self.num_inference_steps)
        x = initial_noise(seeds, self.sample_shape).to(self.device) * sch.init_noise_sigma
        # Stochastic samplers (DDPM, eta > 0, ancestral) draw the step noise of each sample from its own generator.
        kw = self._step_kwargs(step_generators(seeds))
        traj, ts = [], []
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            out = self.denoiser(inp, t)
            eps = out.sample if hasattr(out, "sample") else out
            x = sch.step(eps, t, x, **kw).prev_sample
            if self.record_trajectory:
                traj.append(x.detach().float().cpu())
            ts.append(float(t))
        images = (x / 2 + 0.5).clamp(0, 1).float().cpu()
        return SampleResult(images=images, trajectory=traj, timesteps=ts, seeds=[int(s) for s in seeds])

    def __call__(self, seeds: Sequence[int], desc: str = "sampling") -> SampleResult:
        """Sample one image per seed, in batches of `batch_size` (consecutive seeds share a batch)."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("no seeds given")
        parts = []
        batches = [seeds[i : i + self.batch_size] for i in range(0, len(seeds), self.batch_size)]
        for chunk in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            parts.append(self.sample_batch(chunk))
        return SampleResult(
            images=torch.cat([p.images for p in parts]),
            trajectory=[torch.cat(step) for step in zip(*[p.trajectory for p in parts], strict=True)],
            timesteps=parts[0].timesteps,
            seeds=seeds,
        )

    def timesteps(self) -> list[float]:
        """The timesteps this sampler steps through (one per trajectory entry)."""
        self.scheduler.set_timesteps(self.num_inference_steps)
        return [float(t) for t in self.scheduler.timesteps]
