"""The state of one `tdq run`: [`RunContext`], which every stage of `tdq.run.stages` reads and extends."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tdq.eval.distributed import Distributed
from tdq.eval.reference import ReferenceCache
from tdq.mixed_precision import PrecisionSchedule, SensitivityProfile
from tdq.run.config import RunConfig
from tdq.run.models import LoadedModel
from tdq.sampling import DiffusionSampler, SampleResult, make_sampler, make_scheduler

logger = logging.getLogger(__name__)

__all__ = ["RunContext", "Timer"]


class Timer:
    r"""
    Wall-clock seconds of named steps (`with timer("name"): ...`), in the order they ran; logs each start.

    Attributes:
        times (`dict[str, float]`): seconds per name, rounded to milliseconds (the report's `timings_s`).
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        logger.info("%s ...", name)
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t0, 3)


@dataclass
class RunContext:
    r"""
    Everything one `tdq run` has set up and computed so far.

    The driver ([`~tdq.run.job.run_experiment`]) fills the first group of fields; every stage of
    `tdq.run.stages` reads what it needs (config values straight from `cfg`) and writes its results to the fields
    of its group. A field is `None` (or empty) until its stage has run.

    Args:
        cfg (`RunConfig`): the run config.
        run_dir (`Path`): the output directory (written by the main process only).
        dist (`Distributed`): the process group; stages sample, extract features and broadcast through it.
        device (`torch.device`): where the models run.
        progress (`bool`): show progress bars (main process only).
        timer (`Timer`): step timings (the report's `timings_s`).
        model (`LoadedModel`, *optional*): the loaded model (stage `load`); its denoiser is quantized in place.
        fingerprint (`str`, *optional*): fingerprint of the float denoiser (reference-cache key).
        spec_extra (`dict`): everything besides the denoiser that changes FP samples (reference-cache key).
        cache (`ReferenceCache`, *optional*): the reference cache (`None`: disabled).
        cache_report (`dict`): the report's `reference_cache` section (hit/miss per entry).
        prompt_list (`PromptList`, *optional*): prompts of `eval.prompts_file` (conditional models; stage `load`).
        fp (`SampleResult`, *optional*): FP samples of the evaluation seeds (stage `reference`).
        fp_spec (`dict`, *optional*): their cache spec.
        noise_floor (`SampleResult`, *optional*): FP samples of the noise-floor seeds.
        noise_floor_spec (`dict`, *optional*): their cache spec.
        dataset (`str`, *optional*): the real data set (stage `features`).
        extractors (`dict[str, tuple[nn.Module, str]]`): feature extractors by key (`"inception"`, `"judge"`) with
            their feature ids.
        judge (`nn.Module`, *optional*): the domain classifier of `dataset`.
        fp_feats, noise_floor_feats, real_feats (`dict[str, torch.Tensor]`): features by extractor key.
        real_images, real_labels (`torch.Tensor`, *optional*): the real data.
        profile (`SensitivityProfile`, *optional*): the sensitivity profile (stage `profile`).
        schedule (`PrecisionSchedule`, *optional*): the precision schedule (stage `plan`).
        example_call (*optional*): one recorded denoiser call of the calibration run (stage `calibrate`), on which
            the `backend` stage times FP32 against the real backend.
        quantizer (`Callable`, *optional*): a quantizer function `(model, QuantizerContext) -> model` given to
            `run_experiment` / `tdq.evaluate`; `None` takes `cfg.quantizer.name` from the registry
            (`tdq.run.quantizers`).
        fp_call (`dict`, *optional*): one FP denoiser call `{"args", "kwargs"}` (stage `quantize`, before quantizing).
        layer_macs (`dict[str, int]`, *optional*): MACs per Conv/Linear layer of the FP denoiser in `fp_call`.
        q (`SampleResult`, *optional*): quantized samples of the evaluation seeds (stage `sample`).
        q_feats (`dict[str, torch.Tensor]`): their features.
        metrics (`dict`): the paired and distribution metrics (stage `evaluate`; merged into the report's top level).
        drift (`list[float]`, *optional*): trajectory drift per step.
        sections (`dict[str, Any]`): extra report sections by key (`noise_floor`, `data`, `conditioning`, ...), in
            insertion order; any stage may add one.
        report (`dict`): the report (stage `report`), as written to `report.json`.
    """

    cfg: RunConfig
    run_dir: Path
    dist: Distributed
    device: torch.device
    progress: bool = True
    timer: Timer = field(default_factory=Timer)
    # load
    model: LoadedModel | None = None
    fingerprint: str | None = None
    spec_extra: dict[str, Any] = field(default_factory=dict)
    cache: ReferenceCache | None = None
    cache_report: dict[str, Any] = field(default_factory=dict)
    prompt_list: Any = None
    # reference
    fp: SampleResult | None = None
    fp_spec: dict[str, Any] | None = None
    noise_floor: SampleResult | None = None
    noise_floor_spec: dict[str, Any] | None = None
    # features
    dataset: str | None = None
    extractors: dict[str, tuple[torch.nn.Module, str]] = field(default_factory=dict)
    judge: torch.nn.Module | None = None
    fp_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    noise_floor_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    real_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    real_images: torch.Tensor | None = None
    real_labels: torch.Tensor | None = None
    # profile, plan
    profile: SensitivityProfile | None = None
    schedule: PrecisionSchedule | None = None
    # calibrate: one recorded denoiser call (the backend stage times FP32 against the backend on it)
    example_call: Any = None
    # quantize: the quantizer plug-in, one FP call and the MACs of every Conv/Linear layer in it
    quantizer: Any = None
    fp_call: dict[str, Any] | None = None
    layer_macs: dict[str, int] | None = None
    # sample
    q: SampleResult | None = None
    q_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    # evaluate, report
    metrics: dict[str, Any] = field(default_factory=dict)
    drift: list[float] | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def latent(self) -> bool:
        """`bool`: whether the model is a latent (conditional) model."""
        return self.model.kind != "pixel"

    @property
    def crop(self) -> int:
        """`int`: border cut before feature and judge metrics (`model.crop`)."""
        return int(self.model.crop)

    @property
    def eval_seeds(self) -> list[int]:
        """`list[int]`: the evaluation seeds (FP and quantized samplers)."""
        ev = self.cfg.eval
        return list(range(ev.seed, ev.seed + ev.num_samples))

    @property
    def calib_seeds(self) -> list[int]:
        """`list[int]`: the calibration (and profiling) seeds."""
        c = self.cfg.calibration
        return list(range(c.seed, c.seed + c.num_samples))

    @property
    def noise_floor_seeds(self) -> list[int]:
        """`list[int]`: the seeds of the second FP sample set (noise floor)."""
        ev = self.cfg.eval
        return list(range(ev.noise_floor_seed, ev.noise_floor_seed + ev.num_samples))

    def sampler(self, section: Any, trajectory: bool = True) -> DiffusionSampler:
        r"""
        A sampler of the (current, FP or quantized) model.

        Args:
            section (`EvalConfig` or `CalibrationConfig`): supplies `scheduler`, `num_inference_steps`,
                `batch_size`; guidance and prompt always come from `cfg.eval`.
            trajectory (`bool`, *optional*, defaults to `True`): record the trajectory.

        Returns:
            `DiffusionSampler` (a `LatentDiffusionSampler` for latent models).
        """
        ev = self.cfg.eval
        return make_sampler(
            self.model,
            make_scheduler(self.model.scheduler, section.scheduler),
            guidance_scale=ev.guidance_scale,
            prompt_template=ev.prompt_template,
            prompt_list=self.prompt_list,
            num_inference_steps=section.num_inference_steps,
            batch_size=section.batch_size,
            device=self.device,
            record_trajectory=trajectory,
            progress=self.progress,
        )

    def for_features(self, images: torch.Tensor) -> torch.Tensor:
        r"""
        `images` as the feature extractors and the judge see them: cut by `model.crop` on each border.

        Args:
            images (`torch.Tensor` of shape `[N, C, H, W]`)

        Returns:
            `torch.Tensor`
        """
        crop = self.crop
        return images[..., crop : images.shape[-2] - crop, crop : images.shape[-1] - crop] if crop else images
