"""The structured config of `tdq run`: `RunConfig` and its groups (Hydra schema of `configs/config.yaml`).

It imports no sampling or evaluation code: the CLI registers the schema before Hydra parses the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tdq.config import ACT_BITS, WEIGHT_BITS, TDQConfig, _dataclass_from_dict, check_field
from tdq.errors import ConfigError
from tdq.quant.backends import BACKENDS
from tdq.run.models import ModelConfig
from tdq.sampling.noise import SCHEDULERS

__all__ = [
    "CalibrationConfig",
    "EvalConfig",
    "QuantizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "to_run_config",
]


@dataclass
class ScheduleConfig:
    r"""
    How bit-widths are chosen.

    Args:
        planner (`str`, *optional*, defaults to `"milp"`): `"milp"` (Fisher-optimal under the budget),
            `"uniform"` (the `quant` bits everywhere; profiling still runs for the report) or `"none"` (no profiling).
        avg_act_bits (`float`, *optional*, defaults to `6.0`): MAC-weighted average activation bits (MILP budget).
        avg_weight_bits (`float`, *optional*, defaults to `6.0`): MAC-weighted average weight bits (MILP budget).
        act_candidates (`list[int]`): activation bit-widths the planner may pick.
        weight_candidates (`list[int]`): weight bit-widths the planner may pick.
        samples_per_bucket (`int`, *optional*, defaults to `8`): sensitivity samples per timestep bucket.
        batch_size (`int`, *optional*, defaults to `8`): sensitivity batch size.
        data_free (`bool`, *optional*, defaults to `True`): take x0 from the FP model's own samples.
        max_weight_bytes (`float`, *optional*): MILP bound on the bytes of the scheduled layers' integer weights
            (`numel × bits / 8`, scales not counted); `None` for no bound.
        max_relative_latency (`float`, *optional*): MILP bound on the per-step latency relative to every layer at the
            largest candidates, under the bit-operation cost model (MACs × act bits × weight bits); `None` for none.
        occupancy (`bool`, *optional*, defaults to `True`): weight timestep buckets (Fisher and bit budgets) by the
            share of the evaluation sampler's steps in each (`eval.scheduler`, `eval.num_inference_steps`).
        uniform_fallback (`bool`, *optional*, defaults to `True`): let the MILP planner return the best feasible
            uniform schedule when the solver's is worse (reported as `schedule.fallback` in the report).
        float_fallback (`bool`, *optional*, defaults to `False`): let the MILP planner keep a (layer, bucket)'s input
            in float (a 16-bit candidate: 16 bits in the average, MACs × 32 × 32 BOPs), listed in the report as
            `schedule.float_cells`.
        match_uniform (`bool`, *optional*, defaults to `False`): read `avg_weight_bits` / `avg_act_bits` as a uniform
            `W{w}A{a}` (integers) and give the MILP that uniform run's *effective* averages as its budget: its
            boundary layers at `quant.boundary_act_bits` counted, so the two runs compare at equal effective bits.
            Either way the planner keeps the boundary layers at `boundary_act_bits` (fixed cells, counted in the
            budget) and every run reports its effective bits (`report.json["effective_bits"]`).
    """

    planner: str = "milp"
    avg_act_bits: float = 6.0
    avg_weight_bits: float = 6.0
    act_candidates: list[int] = field(default_factory=lambda: [4, 6, 8])
    weight_candidates: list[int] = field(default_factory=lambda: [4, 6, 8])
    samples_per_bucket: int = 8
    batch_size: int = 8
    data_free: bool = True
    max_weight_bytes: float | None = None
    max_relative_latency: float | None = None
    occupancy: bool = True
    uniform_fallback: bool = True
    float_fallback: bool = False
    match_uniform: bool = False

    def validate(self, prefix: str = "schedule") -> None:
        """Raise `ConfigError` naming the first field that is not allowed."""
        check_field(self.planner, f"{prefix}.planner", "choice", choices=("milp", "uniform", "none"))
        check_field(self.avg_act_bits, f"{prefix}.avg_act_bits", "real", lo=ACT_BITS[0], hi=ACT_BITS[-1])
        check_field(
            self.avg_weight_bits, f"{prefix}.avg_weight_bits", "real", lo=WEIGHT_BITS[0], hi=WEIGHT_BITS[-1]
        )
        check_field(
            self.act_candidates, f"{prefix}.act_candidates", "int_list", lo=ACT_BITS[0], hi=ACT_BITS[-1]
        )
        check_field(
            self.weight_candidates,
            f"{prefix}.weight_candidates",
            "int_list",
            lo=WEIGHT_BITS[0],
            hi=WEIGHT_BITS[-1],
        )
        check_field(self.samples_per_bucket, f"{prefix}.samples_per_bucket", "int", lo=1)
        check_field(self.batch_size, f"{prefix}.batch_size", "int", lo=1)
        check_field(self.data_free, f"{prefix}.data_free", "bool")
        check_field(self.max_weight_bytes, f"{prefix}.max_weight_bytes", "real", lo=1, optional=True)
        check_field(
            self.max_relative_latency, f"{prefix}.max_relative_latency", "real", lo=1e-6, hi=1, optional=True
        )
        check_field(self.occupancy, f"{prefix}.occupancy", "bool")
        check_field(self.uniform_fallback, f"{prefix}.uniform_fallback", "bool")
        check_field(self.float_fallback, f"{prefix}.float_fallback", "bool")
        check_field(self.match_uniform, f"{prefix}.match_uniform", "bool")
        if self.match_uniform and self.planner == "milp":
            for name in ("avg_act_bits", "avg_weight_bits"):
                if float(getattr(self, name)) != int(getattr(self, name)):
                    raise ConfigError(
                        f"{prefix}.{name}={getattr(self, name)!r}: with {prefix}.match_uniform it names a uniform "
                        "bit-width and must be an integer"
                    )


@dataclass
class QuantizerConfig:
    r"""
    Which quantizer a run applies to the denoiser (config group `quantizer`, registry `tdq.run.quantizers`).

    Args:
        name (`str`, *optional*, defaults to `"tdq"`): a registered quantizer (`tdq`: timestep-aware tdq with the
            `quant` config, sensitivity profile and precision `schedule`; `static`, `dynamic-per-token`, `quanto-*`,
            `torchao-*`: baselines, see `tdq.run.quantizers.available_quantizers()`) or `"package.module:function"`.
        options (`dict`, *optional*): keyword options of the quantizer (e.g. `{"group_size": 64}`).
    """

    name: str = "tdq"
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str = "quantizer") -> None:
        """Raise `ConfigError` naming the first field that is not allowed (names are checked by the registry)."""
        check_field(self.name, f"{prefix}.name", "str")
        if not self.name:
            raise ConfigError(f"{prefix}.name is empty; name a registered quantizer")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ConfigError(
                f"{prefix}.options={self.options!r} must be a mapping of option names to values"
            )


@dataclass
class CalibrationConfig:
    r"""
    The calibration sampler run.

    Args:
        num_samples (`int`, *optional*, defaults to `8`): samples drawn while observing.
        num_inference_steps (`int`, *optional*, defaults to `20`): sampler steps.
        scheduler (`str`, *optional*, defaults to `"ddim"`): sampler used for calibration.
        seed (`int`, *optional*, defaults to `100000`): first seed (disjoint from evaluation seeds).
        batch_size (`int`, *optional*, defaults to `8`): samples per denoiser call.
    """

    num_samples: int = 8
    num_inference_steps: int = 20
    scheduler: str = "ddim"
    seed: int = 100000
    batch_size: int = 8

    def validate(self, prefix: str = "calibration") -> None:
        """Raise `ConfigError` naming the first field that is not allowed."""
        _check_sampler_fields(self, prefix)


@dataclass
class EvalConfig:
    r"""
    The evaluation: FP and quantized samplers on the same seeds.

    Args:
        num_samples (`int`, *optional*, defaults to `16`): samples per sampler.
        num_inference_steps (`int`, *optional*, defaults to `20`): sampler steps.
        scheduler (`str`, *optional*, defaults to `"ddim"`): sampler (`ddim`, `ddpm`, `dpmsolver`, `euler`, `pndm`).
        seed (`int`, *optional*, defaults to `0`): first seed.
        batch_size (`int`, *optional*, defaults to `16`): samples per denoiser call (also the unit in which seeds
            are sharded across processes; results depend on it in the last float bits, not on the process count).
        feature (`str`, *optional*, defaults to `"inception"`): FID/KID features (`"inception"` or `"none"`).
        lpips_nets (`list[str]`): LPIPS backbones (`alex`, `vgg`); empty skips LPIPS.
        assets_dir (`str`, *optional*): metric-weight cache (default `~/.cache/tdq/assets`).
        cache (`bool`, *optional*, defaults to `True`): reuse FP samples and features from the reference cache.
        cache_dir (`str`, *optional*): reference cache folder (default `~/.cache/tdq/reference`).
        noise_floor (`bool`, *optional*, defaults to `True`): also sample the FP model on `num_samples` other seeds
            and report FID/KID of FP vs FP: the value the quantized model's FID/KID would have if it were exact.
        noise_floor_seed (`int`, *optional*, defaults to `1000000`): first seed of that second FP set.
        dataset (`str`, *optional*, defaults to `"auto"`): real data for FID/KID and judge metrics: `"mnist-test"`,
            `"none"`, or `"auto"` (MNIST test set for 1×28×28 models named `mnist*`).
        num_real (`int`, *optional*): real images used (default: `num_samples`, so all FIDs have equal counts).
        feature_batch_size (`int`, *optional*, defaults to `32`): images per feature-extractor forward.
        kid_subsets (`int`, *optional*, defaults to `100`): KID subsets.
        guidance_scale (`float`, *optional*): classifier-free guidance scale of conditional models for every sampler
            of the run (FP, calibration, quantized); `None` takes `model.guidance_scale` (or the pipeline default).
        prompt_template (`str`, *optional*): text-to-image prompt (`{}` = class name of the seed); `None` takes
            `model.prompt_template`.
        prompts_file (`str`, *optional*): a benchmark's prompts for conditional models, one per sample cycle
            (`.txt` one per line, `.json` list, or `.csv` with a `prompt`/`caption` column and an optional `label`
            column, the judge class): seed `s` takes entry `s % len(prompts)`. Captions for text-to-image models
            (replacing `prompt_template`), class names for class-conditional models. See
            [`~tdq.sampling.prompts.load_prompts`].
        clip (`str`, *optional*, defaults to `"auto"`): CLIP for the CLIPScore of text-to-image samples: a local
            `CLIPModel` + `CLIPProcessor` folder, `"none"`, or `"auto"` (the bundled in-domain `mnist-clip` for
            text-to-image models named `mnist*`).
        clip_batch_size (`int`, *optional*, defaults to `64`): images per CLIP forward.
    """

    num_samples: int = 16
    num_inference_steps: int = 20
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 16
    feature: str = "inception"
    lpips_nets: list[str] = field(default_factory=lambda: ["alex"])
    assets_dir: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    noise_floor: bool = True
    noise_floor_seed: int = 1000000
    dataset: str = "auto"
    num_real: int | None = None
    feature_batch_size: int = 32
    kid_subsets: int = 100
    guidance_scale: float | None = None
    prompt_template: str | None = None
    prompts_file: str | None = None
    clip: str = "auto"
    clip_batch_size: int = 64

    def validate(self, prefix: str = "eval") -> None:
        """Raise `ConfigError` naming the first field that is not allowed."""
        _check_sampler_fields(self, prefix)
        check_field(self.feature, f"{prefix}.feature", "choice", choices=("inception", "none"))
        check_field(self.lpips_nets, f"{prefix}.lpips_nets", "str_list", choices=("alex", "vgg"))
        for name in ("assets_dir", "cache_dir", "prompt_template", "prompts_file"):
            check_field(getattr(self, name), f"{prefix}.{name}", "str", optional=True)
        for name in ("cache", "noise_floor"):
            check_field(getattr(self, name), f"{prefix}.{name}", "bool")
        check_field(self.noise_floor_seed, f"{prefix}.noise_floor_seed", "int", lo=0, hi=MAX_SEED)
        check_field(self.dataset, f"{prefix}.dataset", "str")
        check_field(self.num_real, f"{prefix}.num_real", "int", lo=1, optional=True)
        check_field(self.feature_batch_size, f"{prefix}.feature_batch_size", "int", lo=1)
        check_field(self.kid_subsets, f"{prefix}.kid_subsets", "int", lo=1)
        check_field(self.guidance_scale, f"{prefix}.guidance_scale", "real", lo=0.0, optional=True)
        check_field(self.clip, f"{prefix}.clip", "str")
        check_field(self.clip_batch_size, f"{prefix}.clip_batch_size", "int", lo=1)


# Seeds seed .. seed + num_samples must fit a torch generator seed.
MAX_SEED = 2**62


def _check_model_fields(model: ModelConfig) -> None:
    check_field(model.name, "model.name", "str")
    check_field(model.source, "model.source", "choice", choices=("zoo", "path", "random"))
    check_field(model.path, "model.path", "str", optional=model.source != "path")
    check_field(model.sample_size, "model.sample_size", "int", lo=1, hi=4096)
    check_field(model.guidance_scale, "model.guidance_scale", "real", lo=0.0, optional=True)
    check_field(model.prompt_template, "model.prompt_template", "str")
    check_field(model.class_names, "model.class_names", "str_list", optional=True)
    check_field(model.crop, "model.crop", "int", lo=0)


def _check_sampler_fields(section, prefix: str) -> None:
    check_field(section.num_samples, f"{prefix}.num_samples", "int", lo=1)
    check_field(section.num_inference_steps, f"{prefix}.num_inference_steps", "int", lo=1, hi=10000)
    check_field(section.scheduler, f"{prefix}.scheduler", "choice", choices=tuple(sorted(SCHEDULERS)))
    check_field(section.seed, f"{prefix}.seed", "int", lo=0, hi=MAX_SEED)
    check_field(section.batch_size, f"{prefix}.batch_size", "int", lo=1)


@dataclass
class RunConfig:
    r"""
    Everything `tdq run` does, as a Hydra structured config (groups: model, quant, schedule, calibration, eval,
    quantizer).

    Args:
        model (`ModelConfig`): which model.
        quant (`TDQConfig`): the quantization config.
        schedule (`ScheduleConfig`): the precision planner.
        calibration (`CalibrationConfig`): the calibration run.
        eval (`EvalConfig`): the evaluation run.
        device (`str`, *optional*, defaults to `"cpu"`): where to run: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"`.
            Under `accelerate launch`, `"cuda"`/`"auto"` give every process its own GPU; `"cpu"` uses CPU processes.
        progress (`bool`, *optional*, defaults to `True`): progress bars.
        threads (`int`, *optional*, defaults to `0`): torch CPU threads (0 keeps torch's default).
        backend (`str`, *optional*, defaults to `"simulate"`): where the quantized model runs after calibration:
            `"simulate"` (fake quantization) or a real backend of `tdq.to_backend` (`"auto"`, `"x86"`, ...); the
            quality metrics are then those of that backend, and the report gains a `backend` section.
        quantizer (`QuantizerConfig`): which quantizer (`tdq` by default; baselines are plug-ins).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: TDQConfig = field(default_factory=TDQConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "cpu"
    progress: bool = True
    threads: int = 0
    backend: str = "simulate"
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def validate(self) -> None:
        """Check every section; raise `ConfigError` naming the first field that is not allowed."""
        for name, cls in (("quant", TDQConfig), ("schedule", ScheduleConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__} or a mapping")
        _check_model_fields(self.model)
        self.quant.validate()
        self.schedule.validate("schedule")
        self.calibration.validate("calibration")
        self.eval.validate("eval")
        check_field(self.device, "device", "str")
        check_field(self.progress, "progress", "bool")
        check_field(self.threads, "threads", "int", lo=0, hi=4096)
        check_field(self.backend, "backend", "choice", choices=("auto", *sorted(BACKENDS)))
        if not isinstance(self.quantizer, QuantizerConfig):
            raise ConfigError("quantizer must be a QuantizerConfig or a mapping")
        self.quantizer.validate("quantizer")


def to_run_config(cfg: Any) -> RunConfig:
    r"""
    A `RunConfig` from a Hydra `DictConfig`, a plain nested `dict` or a `RunConfig` (returned as is).

    Args:
        cfg (`RunConfig`, `DictConfig` or `dict`): the config; a `hydra` key (Hydra's own settings) is ignored.

    Returns:
        `RunConfig`
    """
    if isinstance(cfg, RunConfig):
        return cfg
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    data = {k: v for k, v in data.items() if k != "hydra"}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"unknown run config key(s) {unknown}; the run config has {sorted(known)}")
    return RunConfig(
        model=_dataclass_from_dict(ModelConfig, data.get("model", {}), "model"),
        quant=TDQConfig.from_dict(data.get("quant", {})),
        schedule=_dataclass_from_dict(ScheduleConfig, data.get("schedule", {}), "schedule"),
        calibration=_dataclass_from_dict(CalibrationConfig, data.get("calibration", {}), "calibration"),
        eval=_dataclass_from_dict(EvalConfig, data.get("eval", {}), "eval"),
        quantizer=_dataclass_from_dict(QuantizerConfig, data.get("quantizer", {}), "quantizer"),
        **{k: v for k, v in data.items() if k in ("device", "progress", "threads", "backend")},
    )


_to_run_config = to_run_config  # the name before the split of tdq/run/job.py
