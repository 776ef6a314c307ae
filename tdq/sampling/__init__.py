"""Seeded samplers over diffusers denoisers and schedulers, recording the trajectory x_t of every step.

One denoising loop ([`DiffusionSampler.sample_batch`]) serves every model; what differs between pixel and latent
models is two strategies the loop calls: `predict_noise` (the denoiser call) and `decode` (model space to images).
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

Modules: `noise` (schedulers, per-seed noise), `samplers` (the loop and its pixel/latent strategies),
`conditioning` (seed -> prompt/label, and the conditioned forward used for sensitivity profiling).
"""

from tdq.sampling.conditioning import ConditionedForward, Conditioning, model_conditioning
from tdq.sampling.noise import (
    SCHEDULERS,
    STEP_NOISE_SEED_OFFSET,
    initial_noise,
    make_scheduler,
    step_generators,
)
from tdq.sampling.samplers import DiffusionSampler, LatentDiffusionSampler, SampleResult, make_sampler

__all__ = [
    "SCHEDULERS",
    "STEP_NOISE_SEED_OFFSET",
    "ConditionedForward",
    "Conditioning",
    "DiffusionSampler",
    "LatentDiffusionSampler",
    "SampleResult",
    "initial_noise",
    "make_sampler",
    "make_scheduler",
    "model_conditioning",
    "step_generators",
]
