"""The main job behind `tdq run`: load → FP reference → profile → plan → quantize → calibrate → sample → evaluate.

`RunConfig` is the Hydra structured schema of `configs/config.yaml`; `run_experiment` can also be called directly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tdq
from tdq.config import TDQConfig
from tdq.outliers import report_section as outlier_report_section
from tdq.outliers import reset_runtime_counters
from tdq.run.models import ModelConfig, load_model
from tdq.sampling import (
    ConditionedForward,
    DiffusionSampler,
    LatentDiffusionSampler,
    SampleResult,
    make_sampler,
    make_scheduler,
)

logger = logging.getLogger(__name__)


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
    """

    planner: str = "milp"
    avg_act_bits: float = 6.0
    avg_weight_bits: float = 6.0
    act_candidates: list[int] = field(default_factory=lambda: [4, 6, 8])
    weight_candidates: list[int] = field(default_factory=lambda: [4, 6, 8])
    samples_per_bucket: int = 8
    batch_size: int = 8
    data_free: bool = True


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
    clip: str = "auto"
    clip_batch_size: int = 64


@dataclass
class RunConfig:
    r"""
    Everything `tdq run` does, as a Hydra structured config (groups: model, quant, schedule, calibration, eval).

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
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: TDQConfig = field(default_factory=TDQConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "cpu"
    progress: bool = True
    threads: int = 0


def _to_run_config(cfg: Any) -> RunConfig:
    if isinstance(cfg, RunConfig):
        return cfg
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    data = {k: v for k, v in data.items() if k != "hydra"}
    return RunConfig(
        model=ModelConfig(**data.get("model", {})),
        quant=TDQConfig.from_dict(data.get("quant", {})),
        schedule=ScheduleConfig(**data.get("schedule", {})),
        calibration=CalibrationConfig(**data.get("calibration", {})),
        eval=EvalConfig(**data.get("eval", {})),
        **{k: v for k, v in data.items() if k in ("device", "progress", "threads")},
    )


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()
                logger.info("%s ...", name)

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.t0, 3)

        return _T()


def _resolve_device(cfg_device: str, state: Any) -> torch.device:
    if cfg_device == "auto" or (cfg_device == "cuda" and state.num_processes > 1):
        return torch.device(state.device)
    return torch.device(cfg_device)


def run_experiment(cfg: RunConfig | Any, run_dir: str | Path) -> dict[str, Any]:
    """
    Run the main job and write the run directory.

    Files written: `report.json`, `report.md`, `grid.png` (FP row over quantized row), `drift.png`,
    `lpips_hist.png`, `sensitivity.{safetensors,json}`, `sensitivity_act.png`, `sensitivity_weight.png`,
    `schedule.json`, `schedule.png`, `config.json`.

    Pixel models use [`~tdq.sampling.DiffusionSampler`]; latent conditional models (`model.kind` `"t2i"` /
    `"class"`) use [`~tdq.sampling.LatentDiffusionSampler`]: sample `s` is conditioned on class `s % num_classes`
    (text prompt `eval.prompt_template`), classifier-free guidance `eval.guidance_scale` in every sampler, the
    trajectory and drift are in latent space, sensitivity is profiled on the FP model's own final latents with
    each sample's conditioning, and only the denoiser is quantized (VAE and text encoder stay FP). Their report
    has a `conditioning` section: class accuracy of FP and quantized samples w.r.t. the conditioned class (MNIST
    judge), FP-vs-quantized class agreement and, for text-to-image, CLIPScore against the prompts.

    FP reference samples (eval seeds, noise-floor seeds, calibration seeds) and their features come from the
    reference cache (`tdq.eval.reference`) when present; the report's `reference_cache` section says which were
    hits. Under `accelerate launch` the samplers and feature extractors shard their seeds across processes (see
    `tdq.eval.distributed`); profiling and calibration run on every process (the main process's schedule and
    calibrated scales are broadcast), metrics and all files are computed and written by the main process only.

    Args:
        cfg (`RunConfig` or Hydra `DictConfig`): the run config.
        run_dir (`str` or `Path`): output directory.

    Returns:
        `dict`: the report (as in `report.json`) on the main process, `{}` on the others.
    """
    from tdq.eval import data as data_eval
    from tdq.eval import paired_metrics, trajectory_drift, write_report
    from tdq.eval.distributed import (
        broadcast_tensor,
        distributed_extract_features,
        distributed_sample,
        get_process_state,
        sync_buffers,
    )
    from tdq.eval.reference import (
        ReferenceCache,
        cached_features,
        cached_samples,
        feature_id,
        model_fingerprint,
        reference_spec,
        state_dict_fingerprint,
    )
    from tdq.mixed_precision.fisher import profile_sensitivity
    from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform, schedule_objective

    cfg = _to_run_config(cfg)
    cfg.quant.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    state = get_process_state(cpu=cfg.device == "cpu")
    main = state.is_main_process
    run_dir = Path(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(_asdict(cfg), indent=2))
    timer = _Timer()
    device = _resolve_device(cfg.device, state)
    progress = cfg.progress and main
    ev = cfg.eval

    with timer("load"):
        m = load_model(cfg.model, device=str(device))
    denoiser = m.denoiser
    fingerprint = model_fingerprint(denoiser)  # of the float model, before quantization
    latent = m.kind != "pixel"
    # Everything besides the denoiser that changes FP samples (cache key).
    spec_extra: dict[str, Any] = {}
    if latent:
        spec_extra["latent_shape"] = list(m.latent_shape)
        spec_extra["vae"] = model_fingerprint(m.vae)
        if m.text_encoder is not None:
            # transformers configs are not mappings: class + weights identify the text encoder
            spec_extra["text_encoder"] = (
                type(m.text_encoder).__name__
                + ":"
                + state_dict_fingerprint(m.text_encoder.state_dict(), skip=None)
            )

    def sampler(section, trajectory: bool = True) -> DiffusionSampler:
        return make_sampler(
            m,
            make_scheduler(m.scheduler, section.scheduler),
            guidance_scale=ev.guidance_scale,
            prompt_template=ev.prompt_template,
            num_inference_steps=section.num_inference_steps,
            batch_size=section.batch_size,
            device=device,
            record_trajectory=trajectory,
            progress=progress,
        )

    cache = ReferenceCache(ev.cache_dir or None) if ev.cache else None
    cache_report: dict[str, Any] = {"dir": str(cache.root) if cache else None}

    def fp_samples(section, seeds, trajectory, desc):
        # latent models always keep the (small) latent trajectory: its last entry is the final latents, which
        # profiling needs and which multi-process sampling gathers only through the trajectory
        smp = sampler(section, trajectory or latent)
        if isinstance(smp, LatentDiffusionSampler):
            extra = {**spec_extra, "conditioning": smp.conditioning.describe()}
            spec = reference_spec(fingerprint, smp, seeds, guidance_scale=smp.guidance_scale, extra=extra)
        else:
            spec = reference_spec(fingerprint, smp, seeds)
        result, info = cached_samples(smp, seeds, spec, cache, state, desc=desc)
        return result, spec, info

    eval_seeds = list(range(ev.seed, ev.seed + ev.num_samples))
    calib_seeds = list(range(cfg.calibration.seed, cfg.calibration.seed + cfg.calibration.num_samples))
    with timer("fp_sampling"):
        fp, fp_spec, info = fp_samples(ev, eval_seeds, True, "FP reference")
    cache_report["fp_samples"] = info.to_dict()
    nf = nf_spec = None
    nf_seeds = list(range(ev.noise_floor_seed, ev.noise_floor_seed + ev.num_samples))
    if ev.noise_floor:
        if set(nf_seeds) & set(eval_seeds):
            raise ValueError("eval.noise_floor_seed range overlaps the evaluation seeds")
        with timer("fp_sampling_noise_floor"):
            nf, nf_spec, info = fp_samples(ev, nf_seeds, False, "FP noise floor")
        cache_report["noise_floor_samples"] = info.to_dict()

    # Feature extractors: Inception (FID/KID) and the domain judge when real data is given. They see the images
    # after `model.crop` (latent MNIST models: 32x32 outputs cropped to the 28x28 digit, as real MNIST).
    crop = int(m.crop)

    def for_features(images: torch.Tensor) -> torch.Tensor:
        return images[..., crop : images.shape[-2] - crop, crop : images.shape[-1] - crop] if crop else images

    suffix = f"-crop{crop}" if crop else ""
    dataset = data_eval.resolve_dataset(ev.dataset, m.name, m.eval_shape)
    extractors: dict[str, tuple[torch.nn.Module, str]] = {}
    if ev.feature not in ("none", "inception"):
        raise ValueError(f"eval.feature={ev.feature!r} is unknown; choose 'inception' or 'none'")
    if ev.feature == "inception":
        from tdq.eval.features import InceptionFeatures

        net = InceptionFeatures(cache_dir=ev.assets_dir).to(device)
        extractors["inception"] = (net, feature_id("inception_v3_tf_pool3" + suffix, net))
    judge = None
    if dataset is not None and data_eval.judge_applies(dataset, m.eval_shape):
        judge, judge_feat, judge_name = data_eval.load_domain_judge(dataset, device)
        extractors["judge"] = (judge_feat, feature_id(judge_name + suffix, judge_feat))

    def fp_features(images, spec, label, real: bool = False):
        out = {}
        for key, (net, fid) in extractors.items():
            out[key], info = cached_features(
                images if real else for_features(images),
                net,
                fid,
                spec,
                cache,
                state,
                batch_size=ev.feature_batch_size,
            )
            cache_report.setdefault("features", {})[f"{label}/{key}"] = info.status
        return out

    with timer("fp_features"):
        fp_feats = fp_features(fp.images, fp_spec, "fp")
        nf_feats = fp_features(nf.images, nf_spec, "noise_floor") if nf is not None else {}
        real_feats, real_labels, real_images = {}, None, None
        if dataset is not None:
            real_images, real_labels = data_eval.load_dataset_images(dataset, ev.num_real or ev.num_samples)
            real_feats = fp_features(
                real_images, data_eval.data_spec(dataset, real_images), "data", real=True
            )

    # Sensitivity profile and precision schedule (on the FP model; every process computes them, main's wins).
    profile = schedule = None
    if cfg.schedule.planner != "none":
        with timer("fp_sampling_for_profile"):
            # latent models: the FP model's own final latents (the trajectory's last entry), with their conditioning
            calib_fp, _, info = fp_samples(cfg.calibration, calib_seeds, False, "FP samples for profiling")
            if latent:
                x0 = calib_fp.latents if calib_fp.latents is not None else calib_fp.trajectory[-1]
            else:
                x0 = calib_fp.images * 2 - 1
        cache_report["profile_samples"] = info.to_dict()
        forward_fn = None
        if latent:
            forward_fn = ConditionedForward(
                sampler(cfg.calibration, trajectory=False), calib_seeds, cfg.schedule.samples_per_bucket
            )
        with timer("sensitivity"):
            profile = profile_sensitivity(
                denoiser,
                m.scheduler,
                x0.to(device),
                cfg.quant.grid.resolve(*tdq.get_adapter(denoiser, m.num_train_timesteps).default_grid()),
                config=cfg.quant,
                samples_per_bucket=cfg.schedule.samples_per_bucket,
                batch_size=cfg.schedule.batch_size,
                forward_fn=forward_fn,
                progress=progress,
            )
        if main:
            profile.save(run_dir / "sensitivity")
            profile.plot_heatmap(run_dir / "sensitivity_act.png", kind="act")
            profile.plot_heatmap(run_dir / "sensitivity_weight.png", kind="weight")
        with timer("plan"):
            uniform = plan_uniform(
                profile, act_bits=cfg.quant.activation.bits, weight_bits=cfg.quant.weight.bits
            )
            if cfg.schedule.planner == "milp":
                budget = PrecisionBudget(
                    avg_act_bits=cfg.schedule.avg_act_bits,
                    avg_weight_bits=cfg.schedule.avg_weight_bits,
                    act_candidates=tuple(cfg.schedule.act_candidates),
                    weight_candidates=tuple(cfg.schedule.weight_candidates),
                )
                schedule = plan_precision(profile, budget)
            elif cfg.schedule.planner == "uniform":
                schedule = uniform
            else:
                raise ValueError(
                    f"schedule.planner={cfg.schedule.planner!r} is unknown; choose milp, uniform or none"
                )
            if state.num_processes > 1:  # identical on every process, whatever float noise did to the MILP
                schedule.act_bits = broadcast_tensor(
                    schedule.act_bits, schedule.act_bits.shape, torch.long, state
                )
                schedule.weight_bits = broadcast_tensor(
                    schedule.weight_bits, schedule.weight_bits.shape, torch.long, state
                )
        if main:
            schedule.save(run_dir / "schedule.json")
            schedule.plot(run_dir / "schedule.png")

    # Quantize, apply the schedule, calibrate through the real sampler.
    with timer("quantize"):
        tdq.quantize_(denoiser, cfg.quant, num_train_timesteps=m.num_train_timesteps)
        if schedule is not None:
            schedule.apply_(denoiser)
    with timer("calibrate"):
        with tdq.calibration(denoiser):
            sampler(cfg.calibration, trajectory=False)(calib_seeds, desc="calibration")
        sync_buffers(denoiser, state)
        reset_runtime_counters(denoiser)
    with timer("quant_sampling"):
        q = distributed_sample(sampler(ev), eval_seeds, state, desc="quantized")
    with timer("quant_features"):
        q_feats = {
            key: distributed_extract_features(
                for_features(q.images), net, state, batch_size=ev.feature_batch_size
            )
            for key, (net, _) in extractors.items()
        }

    if not main:
        state.wait_for_everyone()
        return {}

    kid_kw = {"kid_subsets": ev.kid_subsets, "kid_subset_size": 1000, "seed": 0}
    with timer("metrics"):
        metrics = paired_metrics(
            fp.images,
            q.images,
            feature=None,
            lpips_nets=tuple(ev.lpips_nets),
            cache_dir=ev.assets_dir,
            device=device,
        )
        if "inception" in extractors:
            dist = data_eval.distribution_metrics(fp_feats["inception"], q_feats["inception"], **kid_kw)
            metrics["feature"] = "inception_v3_tf_pool3"
            metrics["feature_dim"] = int(fp_feats["inception"].shape[1])
            metrics.update({k: v for k, v in dist.items() if k not in ("num_real", "num_fake")})
        drift = trajectory_drift(fp.trajectory, q.trajectory)
        noise_floor = _noise_floor_section(ev, nf_seeds, fp_feats, nf_feats, q_feats, kid_kw) if nf else None
        data_section = None
        if dataset is not None:
            data_section = _data_section(
                dataset,
                real_feats,
                real_labels,
                real_images,
                _cropped(fp, for_features),
                _cropped(q, for_features),
                _cropped(nf, for_features) if nf is not None else None,
                fp_feats,
                nf_feats,
                q_feats,
                judge,
                kid_kw,
            )
    cond_section = None
    if latent:
        with timer("conditional_metrics"):
            cond_section = _conditioning_section(
                m,
                sampler(ev, trajectory=False),
                eval_seeds,
                for_features(fp.images),
                for_features(q.images),
                fp.images,
                q.images,
                judge,
                ev,
                device,
            )

    model_info: dict[str, Any] = {"name": m.name, "source": m.source, "sample_shape": list(m.sample_shape)}
    if latent:
        model_info.update(kind=m.kind, latent_shape=list(m.latent_shape), crop=crop)
    report: dict[str, Any] = {
        "model": model_info,
        "num_samples": len(eval_seeds),
        "eval": {
            "scheduler": ev.scheduler,
            "num_inference_steps": ev.num_inference_steps,
            "seeds": [eval_seeds[0], eval_seeds[-1]],
            "batch_size": ev.batch_size,
            "device": str(device),
            "num_processes": int(state.num_processes),
        },
        "calibration": {"num_samples": len(calib_seeds), "scheduler": cfg.calibration.scheduler},
        **metrics,
        "drift": drift,
        "reference_cache": cache_report,
        "timings_s": timer.times,
    }
    if noise_floor is not None:
        report["noise_floor"] = noise_floor
    outliers = outlier_report_section(denoiser)
    if outliers is not None:
        report["outliers"] = outliers
    if data_section is not None:
        report["data"] = data_section
    if cond_section is not None:
        report["conditioning"] = cond_section
    if schedule is not None:
        report["schedule"] = {
            "planner": cfg.schedule.planner,
            "average_bits": schedule.average_bits(profile.macs),
            "objective": schedule_objective(profile, schedule),
            "objective_uniform_8bit": schedule_objective(profile, plan_uniform(profile, 8, 8)),
        }
    extra = {
        k: run_dir / f for k, f in [("sensitivity_act", "sensitivity_act.png"), ("schedule", "schedule.png")]
    }
    written = write_report(
        run_dir,
        report,
        fp.images,
        q.images,
        drift,
        extra_figures={k: v for k, v in extra.items() if v.exists()},
    )
    sections = _markdown_sections(report)
    if sections:
        md = written["md"].read_text()
        head, sep, figs = md.partition("\n## Figures")
        written["md"].write_text(head.rstrip("\n") + "\n\n" + sections + (sep + figs if sep else ""))
    state.wait_for_everyone()
    return json.loads((run_dir / "report.json").read_text())


def _cropped(result: SampleResult, fn) -> SampleResult:
    return SampleResult(images=fn(result.images), seeds=result.seeds)


def _conditioning_section(
    m, smp: LatentDiffusionSampler, seeds, fp_eval, q_eval, fp_images, q_images, judge, ev, device
) -> dict[str, Any]:
    """Class accuracy (judge) w.r.t. the conditioned class, FP-vs-quantized agreement and CLIPScore (text)."""
    from tdq.eval import data as data_eval

    cond = smp.conditioning
    labels = cond.labels(seeds)
    out: dict[str, Any] = {
        "kind": m.kind,
        "guidance_scale": smp.guidance_scale,
        "class_names": cond.class_names,
        "label_rule": "class = seed % num_classes",
        "labels_histogram": torch.bincount(torch.tensor(labels), minlength=cond.num_classes).tolist(),
    }
    if m.kind == "t2i":
        out["prompt_template"] = cond.prompt_template
    if (
        judge is None
        and m.name.lower().startswith("mnist")
        and data_eval.judge_applies("mnist-test", m.eval_shape)
    ):
        judge = data_eval.load_domain_judge("mnist-test", device)[0]
    if judge is not None:
        y = torch.tensor(labels)
        fp_c = data_eval.class_metrics(fp_eval, judge, y)
        q_c = data_eval.class_metrics(q_eval, judge, y)
        fp_pred, q_pred = fp_c.pop("predictions"), q_c.pop("predictions")
        keep = ("accuracy", "mean_confidence", "class_entropy_bits")
        out["judge"] = {
            "fp": {k: fp_c[k] for k in keep},
            "quantized": {k: q_c[k] for k in keep},
            "class_agreement_fp_vs_quantized": sum(a == b for a, b in zip(fp_pred, q_pred, strict=True))
            / max(1, len(fp_pred)),
        }
    else:
        out["judge"] = None
        out["judge_skipped"] = f"no judge for {m.name!r} images of shape {list(m.eval_shape)}"
    clip_dir = _resolve_clip(ev.clip, m)
    if clip_dir is not None:
        from tdq.eval.clip import clip_score, load_clip

        clip = load_clip(clip_dir)
        prompts = cond.prompts(seeds)
        out["clip_score"] = {
            "clip": str(clip_dir),
            "fp": clip_score(fp_images, prompts, clip, batch_size=ev.clip_batch_size),
            "quantized": clip_score(q_images, prompts, clip, batch_size=ev.clip_batch_size),
        }
    return out


def _resolve_clip(name: str | None, m) -> str | None:
    if name is None or name == "none" or m.kind != "t2i":
        return None
    if name == "auto":
        if not m.name.lower().startswith("mnist"):
            return None
        from tdq import zoo

        folder = zoo.CHECKPOINT_ROOT / "mnist-clip"
        return str(folder) if (folder / "config.json").is_file() else None
    return name


def _dist_short(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("fid", "kid_mean", "kid_std") if k in d}


def _noise_floor_section(ev, nf_seeds, fp_feats, nf_feats, q_feats, kid_kw) -> dict[str, Any]:
    from tdq.eval.data import distribution_metrics

    out: dict[str, Any] = {
        "description": "FP samples (eval seeds) vs FP samples (other seeds), same counts: the FID/KID an exact "
        "quantized model would score against the FP reference. Quantized-vs-FP values near this are noise.",
        "num_samples": len(nf_seeds),
        "seeds": [nf_seeds[0], nf_seeds[-1]],
    }
    for key in fp_feats:
        floor = distribution_metrics(fp_feats[key], nf_feats[key], **kid_kw)
        quant = distribution_metrics(fp_feats[key], q_feats[key], **kid_kw)
        out[key] = {"fp_vs_fp_other_seeds": _dist_short(floor), "quantized_vs_fp": _dist_short(quant)}
    return out


def _data_section(
    dataset, real_feats, real_labels, real_images, fp, q, nf, fp_feats, nf_feats, q_feats, judge, kid_kw
) -> dict[str, Any]:
    from tdq.eval.data import class_metrics, distribution_metrics

    out: dict[str, Any] = {"dataset": dataset, "num_real": int(real_images.shape[0])}
    for key, real in real_feats.items():
        sec = {
            "fp": _dist_short(distribution_metrics(real, fp_feats[key], **kid_kw)),
            "quantized": _dist_short(distribution_metrics(real, q_feats[key], **kid_kw)),
        }
        if key in nf_feats:
            sec["fp_other_seeds"] = _dist_short(distribution_metrics(real, nf_feats[key], **kid_kw))
        out[key] = sec
    if judge is not None:
        real_c = class_metrics(real_images, judge, real_labels)
        fp_c = class_metrics(fp.images, judge)
        q_c = class_metrics(q.images, judge)
        agree = [a == b for a, b in zip(fp_c.pop("predictions"), q_c.pop("predictions"), strict=True)]
        real_c.pop("predictions")
        # "judge" holds the distribution metrics in the judge's feature space; the classifier's verdicts go here.
        out["judge_classes"] = {
            "real": real_c,
            "fp": fp_c,
            "quantized": q_c,
            "class_agreement_fp_vs_quantized": sum(agree) / max(1, len(agree)),
        }
        if nf is not None:
            nf_c = class_metrics(nf.images, judge)
            nf_c.pop("predictions")
            out["judge_classes"]["fp_other_seeds"] = nf_c
    return out


def _f(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown_sections(report: dict[str, Any]) -> str:
    """Markdown for the noise-floor, data and cache sections (appended to `report.md`)."""
    lines: list[str] = []
    if report.get("outliers"):
        lines.append(report["outliers"]["markdown"])
    nf = report.get("noise_floor")
    if nf:
        n = nf["num_samples"]
        lines += [
            "## Noise floor",
            "",
            f"FID/KID between two FP sample sets of {n} images (other seeds): what an exact quantized model "
            "would score. Quantized-vs-FP values within about this much are indistinguishable from sampling noise.",
            "",
            "| features | FP vs FP (other seeds) FID | quantized vs FP FID | FP vs FP KID | quantized vs FP KID |",
            "|---|---|---|---|---|",
        ]
        for key in ("inception", "judge"):
            if key in nf:
                a, b = nf[key]["fp_vs_fp_other_seeds"], nf[key]["quantized_vs_fp"]
                lines.append(
                    f"| {key} | {_f(a.get('fid'))} | {_f(b.get('fid'))} | "
                    f"{_f(a.get('kid_mean'))} ± {_f(a.get('kid_std'))} | "
                    f"{_f(b.get('kid_mean'))} ± {_f(b.get('kid_std'))} |"
                )
        lines.append("")
    data = report.get("data")
    if data:
        lines += [
            f"## Against real data ({data['dataset']}, {data['num_real']} images)",
            "",
            "| features | set | FID | KID |",
            "|---|---|---|---|",
        ]
        for key in ("inception", "judge"):
            for label in ("fp", "fp_other_seeds", "quantized"):
                d = data.get(key, {}).get(label)
                if d:
                    lines.append(
                        f"| {key} | {label} | {_f(d.get('fid'))} | {_f(d.get('kid_mean'))} ± {_f(d.get('kid_std'))} |"
                    )
        j = data.get("judge_classes")
        if j:
            lines += [
                "",
                "| judge (ccexam MNIST classifier) | mean top-1 confidence | class entropy [bits] | accuracy |",
                "|---|---|---|---|",
            ]
            for label in ("real", "fp", "fp_other_seeds", "quantized"):
                if label in j:
                    c = j[label]
                    lines.append(
                        f"| {label} | {_f(c['mean_confidence'])} | {_f(c['class_entropy_bits'])} | "
                        f"{_f(c.get('accuracy'))} |"
                    )
            lines += [
                "",
                f"Same predicted digit for FP and quantized (same seed): "
                f"{_f(j['class_agreement_fp_vs_quantized'])}.",
            ]
        lines.append("")
    cond = report.get("conditioning")
    if cond:
        lines += [
            f"## Conditioning ({cond['kind']}, guidance scale {_f(cond['guidance_scale'])})",
            "",
            f"Sample of seed `s` is conditioned on class `s % {len(cond['class_names'])}`"
            + (f", prompt `{cond['prompt_template']}`." if cond.get("prompt_template") else "."),
            "",
            "| set | class accuracy (judge) | mean confidence | CLIPScore |",
            "|---|---|---|---|",
        ]
        j, c = cond.get("judge") or {}, cond.get("clip_score") or {}
        for label in ("fp", "quantized"):
            lines.append(
                f"| {label} | {_f((j.get(label) or {}).get('accuracy'))} | "
                f"{_f((j.get(label) or {}).get('mean_confidence'))} | {_f(c.get(label))} |"
            )
        if j:
            lines += [
                "",
                f"Same judged digit for FP and quantized: {_f(j['class_agreement_fp_vs_quantized'])}.",
            ]
        lines.append("")
    cache = report.get("reference_cache")
    if cache:
        entries = {k: v["status"] for k, v in cache.items() if isinstance(v, dict) and "status" in v}
        entries.update({f"features {k}": v for k, v in cache.get("features", {}).items()})
        lines += [
            "## Reference cache",
            "",
            f"Folder: `{cache.get('dir')}`.",
            "",
            "| entry | status |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in entries.items()]
        lines.append("")
    return "\n".join(lines)


def _asdict(cfg: RunConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)
