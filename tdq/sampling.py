"""Seeded samplers over diffusers denoisers and schedulers, recording the trajectory x_t of every step.

[`DiffusionSampler`] runs pixel-space models; [`LatentDiffusionSampler`] runs latent, conditional models (Stable
Diffusion-layout text-to-image and DiT class-conditional pipelines) with classifier-free guidance batched in one
denoiser call and VAE decoding, through the same interface (`sampler(seeds) -> SampleResult`). The conditioning of a
sample is a function of its seed only ([`Conditioning`]), so sharding and the FP reference cache work unchanged.

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
from typing import Any

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


class Conditioning:
    r"""
    The conditioning of every sample, derived from its seed: class `seed % len(class_names)`, and for text models
    the prompt `prompt_template.format(class_names[class])`.

    Text models are encoded as `StableDiffusionPipeline.encode_prompt` does (tokenizer padded to
    `model_max_length`, `text_encoder(ids)[0]`, the empty prompt as the unconditional input); the prompts of all
    classes and the empty prompt are encoded once, in one call, so a sample's embedding does not depend on its batch.

    Args:
        kind (`str`): `"t2i"` (text embeddings, `encoder_hidden_states`) or `"class"` (DiT `class_labels`).
        class_names (`Sequence[str]`): the class names.
        prompt_template (`str`, *optional*): text prompt, `{}` = class name (text models).
        text_encoder (`nn.Module`, *optional*): the text encoder (text models).
        tokenizer (*optional*): its tokenizer (text models).
        null_class (`int`, *optional*, defaults to `1000`): unconditional class label (DiT's `class_null`).
    """

    def __init__(
        self,
        kind: str,
        class_names: Sequence[str],
        prompt_template: str | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        null_class: int = 1000,
    ):
        if kind not in ("t2i", "class"):
            raise ValueError(f"conditioning kind={kind!r} is unknown; choose 't2i' or 'class'")
        if not class_names:
            raise ValueError("conditioning needs at least one class name")
        if kind == "t2i" and (text_encoder is None or tokenizer is None or not prompt_template):
            raise ValueError("text conditioning needs a text_encoder, a tokenizer and a prompt_template")
        self.kind = kind
        self.class_names = list(class_names)
        self.prompt_template = prompt_template
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.null_class = int(null_class)
        self._embeddings: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes the seeds cycle through."""
        return len(self.class_names)

    def labels(self, seeds: Sequence[int]) -> list[int]:
        """The class of every seed (`seed % num_classes`)."""
        return [int(s) % self.num_classes for s in seeds]

    def prompts(self, seeds: Sequence[int]) -> list[str]:
        """The text prompt of every seed (class name for class models)."""
        if self.kind == "class":
            return [self.class_names[c] for c in self.labels(seeds)]
        return [self.prompt_template.format(self.class_names[c]) for c in self.labels(seeds)]

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """Text embeddings `[num_classes + 1, L, D]`: every class prompt, then the empty (unconditional) prompt."""
        if self._embeddings is None:
            texts = [self.prompt_template.format(n) for n in self.class_names] + [""]
            ids = self.tokenizer(
                texts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(self.text_encoder.parameters()).device
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = (ids != self.tokenizer.pad_token_id).long().to(device)
            self._embeddings = self.text_encoder(ids.to(device), attention_mask=mask)[0].detach()
        return self._embeddings

    def cond(self, seeds: Sequence[int], device: str | torch.device) -> torch.Tensor:
        """The conditional input of the seeds: text embeddings `[N, L, D]` or class labels `[N]`."""
        labels = torch.tensor(self.labels(seeds), dtype=torch.long)
        if self.kind == "class":
            return labels.to(device)
        emb = self.class_embeddings()
        return emb[labels.to(emb.device)].to(device)

    def uncond(self, n: int, device: str | torch.device) -> torch.Tensor:
        """The unconditional input of `n` samples: empty-prompt embeddings or the null class."""
        if self.kind == "class":
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        emb = self.class_embeddings()
        return emb[-1:].expand(n, *emb.shape[1:]).to(device)

    def denoiser_kwargs(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of the denoiser call: `encoder_hidden_states` (UNet) or `class_labels` (DiT)."""
        return {"class_labels": cond} if self.kind == "class" else {"encoder_hidden_states": cond}

    def describe(self) -> dict[str, Any]:
        """JSON-safe description (cache keys, reports)."""
        d: dict[str, Any] = {"kind": self.kind, "class_names": self.class_names}
        if self.kind == "t2i":
            d["prompt_template"] = self.prompt_template
        else:
            d["null_class"] = self.null_class
        return d


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
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance is on (`guidance_scale > 1`, as in the diffusers pipelines)."""
        return self.guidance_scale > 1.0

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor):
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

    @torch.no_grad()
    def sample_batch(self, seeds: Sequence[int]) -> SampleResult:
        """Sample one batch, one image per seed (latent noise from the seed, conditioning from the seed)."""
        sch = self.scheduler
        sch.set_timesteps(self.num_inference_steps)
        x = initial_noise(seeds, self.latent_shape).to(self.device) * sch.init_noise_sigma
        cond = self.conditioning.cond(seeds, self.device)
        uncond = self.conditioning.uncond(len(seeds), self.device) if self.do_cfg else None
        kw = self._step_kwargs(step_generators(seeds))
        traj, ts = [], []
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            eps = self.predict_noise(inp, t, cond, uncond)
            x = sch.step(eps, t, x, **kw).prev_sample
            if self.record_trajectory:
                traj.append(x.detach().float().cpu())
            ts.append(float(t))
        return SampleResult(
            images=self.decode(x),
            trajectory=traj,
            timesteps=ts,
            seeds=[int(s) for s in seeds],
            latents=x.detach().float().cpu(),
        )


def make_sampler(
    model,
    scheduler=None,
    *,
    guidance_scale: float | None = None,
    prompt_template: str | None = None,
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
        model_conditioning(model, prompt_template),
        guidance_scale=model.guidance_scale if guidance_scale is None else guidance_scale,
        **kwargs,
    )


def model_conditioning(model, prompt_template: str | None = None) -> Conditioning:
    r"""
    The [`Conditioning`] of a conditional [`~tdq.run.models.LoadedModel`] (cached on it, so text prompts are encoded
    once per run).

    Args:
        model (`LoadedModel`): a `"t2i"` or `"class"` model.
        prompt_template (`str`, *optional*): overrides the model's prompt template.
    """
    template = prompt_template or model.prompt_template
    cache = model.__dict__.setdefault("_conditioning", {})
    if template not in cache:
        cache[template] = Conditioning(
            model.kind,
            model.class_names,
            prompt_template=template,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            null_class=model.null_class,
        )
    return cache[template]


class ConditionedForward:
    r"""
    A `forward_fn` for [`tdq.mixed_precision.fisher.profile_sensitivity`] on conditional latent models: calls the denoiser
    with each `x0` row's own conditioning (prompt embedding or class label of the seed the row was sampled from),
    without guidance, and returns the eps prediction (the first `C` channels of a learned-sigma DiT output).

    `profile_sensitivity` does not pass row indices to `forward_fn`; it cycles the rows of `x0` in order (the
    `i`-th sample of every bucket is row `i % N`, in batches of `batch_size`, buckets one after the other), and this
    callable follows that order by counting rows, restarting at every `samples_per_bucket` rows.

    Args:
        sampler (`LatentDiffusionSampler`): gives the denoiser's conditioning and latent shape.
        seeds (`Sequence[int]`): the seed of every `x0` row, in row order.
        samples_per_bucket (`int`): the `samples_per_bucket` passed to `profile_sensitivity`.
    """

    def __init__(self, sampler: LatentDiffusionSampler, seeds: Sequence[int], samples_per_bucket: int):
        self.conditioning = sampler.conditioning
        self.channels = sampler.latent_shape[0]
        self.cond = self.conditioning.cond([int(s) for s in seeds], sampler.device)
        self.num_rows = len(seeds)
        self.samples_per_bucket = int(samples_per_bucket)
        self.position = 0

    def rows(self, batch: int) -> torch.Tensor:
        """Indices of the `x0` rows of the next batch of `batch` samples (advances the counter)."""
        if self.position + batch > self.samples_per_bucket:
            raise RuntimeError(
                f"ConditionedForward: batch of {batch} past samples_per_bucket={self.samples_per_bucket}; pass "
                "the samples_per_bucket given to profile_sensitivity"
            )
        rows = torch.arange(self.position, self.position + batch) % self.num_rows
        self.position = (self.position + batch) % self.samples_per_bucket
        return rows

    def __call__(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional prediction of `denoiser` for `x_t` at integer train timesteps `t` (`[B]`)."""
        cond = self.cond[self.rows(x_t.shape[0]).to(self.cond.device)]
        kw = self.conditioning.denoiser_kwargs(cond)
        if self.conditioning.kind == "class":
            out = denoiser(x_t, timestep=t, **kw)
        else:
            out = denoiser(x_t, t, **kw)
        pred = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return pred[:, : self.channels]
