"""The seeded sampler loop ([`DiffusionSampler`]) and its latent, conditional strategy ([`LatentDiffusionSampler`])."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdq.sampling.conditioning import Conditioning, model_conditioning
from tdq.sampling.noise import initial_noise, step_generators


@dataclass
class SampleResult:
    r"""
    Output of a sampler.

    Args:
        images (`torch.Tensor`): final images, float in [0, 1], `[N, C, H, W]`, on the CPU.
        trajectory (`list[torch.Tensor]`): x_t after every step (model space: latents for latent models), each
            `[N, ...]`, on the CPU; the last entry is the final (clean) sample in model space.
        timesteps (`list[float]`): the scheduler's timesteps, one per step.
        seeds (`list[int]`): the seed of every sample, in row order (empty when unknown).
        latents (`torch.Tensor`, *optional*): the final latents `[N, C, h, w]` of latent models (what the VAE
            decodes), on the CPU; `None` for pixel models or when not kept (the trajectory's last entry is the same).
    """

    images: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None


class DiffusionSampler:
    r"""
    The standard denoising loop (as in `DDIMPipeline`) for a pixel-space denoiser, with per-seed noise and the
    trajectory recorded.

    This is the one sampler loop of tdq: [`sample_batch`] draws the noise of every seed, then for each timestep
    calls [`predict_noise`] and the scheduler step, and finally [`decode`]. Subclasses change what a model needs
    by overriding those strategies ([`conditioning_inputs`], [`predict_noise`], [`decode`], [`keeps_latents`]),
    as [`LatentDiffusionSampler`] does.

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
        #: shape of one sample in model space (what the denoiser sees and the trajectory records)
        self.model_shape = tuple(sample_shape)
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

    @property
    def keeps_latents(self) -> bool:
        """Whether [`SampleResult.latents`] is set (latent models: the final latents the images decode from)."""
        return False

    def conditioning_inputs(self, seeds: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments of [`predict_noise`] for a batch of `seeds` (none for unconditional models)."""
        return {}

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, **conditioning) -> torch.Tensor:
        """The model prediction for `x` (already scaled by `scale_model_input`) at timestep `t`."""
        out = self.denoiser(x, t)
        return out.sample if hasattr(out, "sample") else out

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final samples in model space (pixels in [-1, 1] here) to images in [0, 1] (float32, on the CPU)."""
        return (x / 2 + 0.5).clamp(0, 1).float().cpu()

    @torch.no_grad()
    def sample_batch(self, seeds: Sequence[int]) -> SampleResult:
        """Sample one batch, one image per seed (noise from the seed, conditioning from the seed)."""
        sch = self.scheduler
        sch.set_timesteps(self.num_inference_steps)
        x = initial_noise(seeds, self.model_shape).to(self.device) * sch.init_noise_sigma
        conditioning = self.conditioning_inputs(seeds)
        # Stochastic samplers (DDPM, eta > 0, ancestral) draw the step noise of each sample from its own generator.
        kw = self._step_kwargs(step_generators(seeds))
        traj, ts = [], []
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            eps = self.predict_noise(inp, t, **conditioning)
            x = sch.step(eps, t, x, **kw).prev_sample
            if self.record_trajectory:
                traj.append(x.detach().float().cpu())
            ts.append(float(t))
        return SampleResult(
            images=self.decode(x),
            trajectory=traj,
            timesteps=ts,
            seeds=[int(s) for s in seeds],
            latents=x.detach().float().cpu() if self.keeps_latents else None,
        )

    def __call__(self, seeds: Sequence[int], desc: str = "sampling") -> SampleResult:
        """Sample one image per seed, in batches of `batch_size` (consecutive seeds share a batch)."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("no seeds given")
        parts = []
        batches = [seeds[i : i + self.batch_size] for i in range(0, len(seeds), self.batch_size)]
        for chunk in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            parts.append(self.sample_batch(chunk))
        latents = None
        if all(p.latents is not None for p in parts):
            latents = torch.cat([p.latents for p in parts])
        return SampleResult(
            images=torch.cat([p.images for p in parts]),
            trajectory=[torch.cat(step) for step in zip(*[p.trajectory for p in parts], strict=True)],
            timesteps=parts[0].timesteps,
            seeds=seeds,
            latents=latents,
        )

    def timesteps(self) -> list[float]:
        """The timesteps this sampler steps through (one per trajectory entry)."""
        self.scheduler.set_timesteps(self.num_inference_steps)
        return [float(t) for t in self.scheduler.timesteps]


class LatentDiffusionSampler(DiffusionSampler):
    r"""
    The denoising loop of `StableDiffusionPipeline` (text) and `DiTPipeline` (class labels) on latents, with
    per-seed noise, classifier-free guidance batched in one denoiser call, VAE decoding and the latent trajectory
    recorded.

    - text (`UNet2DConditionModel`): input `[uncond; cond]` latents with `encoder_hidden_states` = empty-prompt and
      prompt embeddings, `eps = eps_u + g (eps_c − eps_u)`, timestep passed as the scheduler's scalar `t`;
    - class (DiT): input `[cond; null]` with `class_labels` = labels and the null class, timesteps expanded to the
      batch; guidance on the first `C` (eps) channels only, and a learned-sigma output (`out_channels = 2C`) is cut
      to its eps half before the scheduler step, as `DiTPipeline` does. (The pipeline steps both identical halves;
      this sampler steps one, which is the same element-wise computation.)

    Guidance is on when `guidance_scale > 1`; otherwise one conditional call per step. Images are
    `vae.decode(latents / scaling_factor)` mapped to [0, 1]. The VAE and text encoder are used as given (keep them
    in floating point); only `denoiser` is meant to be quantized.

    Args:
        denoiser (`nn.Module`): `UNet2DConditionModel` or `DiTTransformer2DModel`.
        scheduler (`SchedulerMixin`): the diffusers scheduler to step with.
        latent_shape (`tuple[int, ...]`): shape `(C, h, w)` of one latent.
        vae (`nn.Module`): the `AutoencoderKL` (with `config.scaling_factor`).
        conditioning (`Conditioning`): how seeds map to prompts / labels.
        guidance_scale (`float`, *optional*, defaults to `7.5`): classifier-free guidance scale.
        num_inference_steps (`int`, *optional*, defaults to `20`): number of steps.
        eta (`float`, *optional*, defaults to `0.0`): DDIM eta (ignored by other schedulers).
        batch_size (`int`, *optional*, defaults to `16`): samples per denoiser call (twice that many rows with CFG).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to run.
        record_trajectory (`bool`, *optional*, defaults to `True`): keep the latents of every step.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler,
        latent_shape: Sequence[int],
        vae: nn.Module,
        conditioning: Conditioning,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 20,
        eta: float = 0.0,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        record_trajectory: bool = True,
        progress: bool = True,
    ):
        super().__init__(
            denoiser,
            scheduler,
            latent_shape,
            num_inference_steps=num_inference_steps,
            eta=eta,
            batch_size=batch_size,
            device=device,
            record_trajectory=record_trajectory,
            progress=progress,
        )
        self.latent_shape = tuple(latent_shape)
        self.model_shape = self.latent_shape
        self.vae = vae
        self.conditioning = conditioning
        self.guidance_scale = float(guidance_scale)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        #: shape `(C, H, W)` of one decoded image (`SampleResult.images`)
        self.sample_shape = (
            int(vae.config.out_channels),
            self.latent_shape[1] * factor,
            self.latent_shape[2] * factor,
        )

    @property
    def keeps_latents(self) -> bool:
        """Latent samplers return the final latents too."""
        return True

    def conditioning_inputs(self, seeds: Sequence[int]) -> dict[str, Any]:
        """`cond` (the seeds' prompt embeddings / labels) and `uncond` (with guidance; else `None`)."""
        cond = self.conditioning.cond(seeds, self.device)
        uncond = self.conditioning.uncond(len(seeds), self.device) if self.do_cfg else None
        return {"cond": cond, "uncond": uncond}

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance is on (`guidance_scale > 1`, as in the diffusers pipelines)."""
        return self.guidance_scale > 1.0

    def predict_noise(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None
    ) -> torch.Tensor:
        """One guided model prediction for `latents` (already scaled by `scale_model_input`) at timestep `t`."""
        cond_kind = self.conditioning.kind
        c = self.latent_shape[0]
        if cond_kind == "t2i":
            inp = torch.cat([latents] * 2) if self.do_cfg else latents
            ctx = torch.cat([uncond, cond]) if self.do_cfg else cond
            out = self.denoiser(inp, t, **self.conditioning.denoiser_kwargs(ctx))
            eps = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
            if self.do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self.guidance_scale * (eps_c - eps_u)
            return eps
        # DiT, as DiTPipeline.__call__
        inp = torch.cat([latents] * 2) if self.do_cfg else latents
        labels = torch.cat([cond, uncond]) if self.do_cfg else cond
        ts = t if torch.is_tensor(t) else torch.tensor([t], device=inp.device)
        ts = (ts[None] if ts.dim() == 0 else ts).to(inp.device).expand(inp.shape[0])
        out = self.denoiser(inp, timestep=ts, **self.conditioning.denoiser_kwargs(labels))
        pred = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        if self.do_cfg:
            eps, rest = pred[:, :c], pred[:, c:]
            eps_c, eps_u = torch.split(eps, len(eps) // 2, dim=0)
            half = eps_u + self.guidance_scale * (eps_c - eps_u)
            pred = torch.cat([half, rest[: len(half)]], dim=1)
        if int(getattr(self.denoiser.config, "out_channels", c)) // 2 == c:  # learned sigma
            pred = pred[:, :c]
        return pred

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents to images in [0, 1] (float32, on the CPU)."""
        x = latents.to(self.device, dtype=next(self.vae.parameters()).dtype)
        images = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1).float().cpu()


def make_sampler(
    model,
    scheduler=None,
    *,
    guidance_scale: float | None = None,
    prompt_template: str | None = None,
    prompt_list=None,
    **kwargs,
) -> DiffusionSampler:
    r"""
    The sampler that fits a [`~tdq.run.models.LoadedModel`]: [`DiffusionSampler`] for pixel models,
    [`LatentDiffusionSampler`] for text-to-image and class-conditional latent models.

    Args:
        model (`LoadedModel`): from [`tdq.run.models.load_model`].
        scheduler (`SchedulerMixin`, *optional*): the scheduler (default: the model's).
        guidance_scale (`float`, *optional*): overrides the model's guidance scale.
        prompt_template (`str`, *optional*): overrides the model's prompt template.
        prompt_list (`PromptList`, *optional*): prompts read from a file ([`~tdq.sampling.prompts.load_prompts`]):
            seed `s` takes entry `s % len(prompts)`.
        **kwargs: `num_inference_steps`, `eta`, `batch_size`, `device`, `record_trajectory`, `progress`.

    Returns:
        `DiffusionSampler`.
    """
    scheduler = model.scheduler if scheduler is None else scheduler
    if model.kind == "pixel":
        return DiffusionSampler(model.denoiser, scheduler, model.sample_shape, **kwargs)
    return LatentDiffusionSampler(
        model.denoiser,
        scheduler,
        model.latent_shape,
        model.vae,
        model_conditioning(model, prompt_template, prompt_list),
        guidance_scale=model.guidance_scale if guidance_scale is None else guidance_scale,
        **kwargs,
    )
