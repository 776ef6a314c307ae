"""The stages of `tdq run`, each a function `stage(ctx: RunContext) -> None` over one [`RunContext`].

Order ([`STAGES`]): load → reference → features → profile → plan → quantize → calibrate → sample → evaluate →
report. Each stage reads its config straight from `ctx.cfg` and what earlier stages computed from the context, and
writes its own results to the context (see the field groups of [`RunContext`]). Step timings go through
`ctx.timer` (the report's `timings_s`).

Processes: stages never branch on the process count. They sample, extract features, broadcast and synchronize
through `ctx.dist` ([`~tdq.eval.distributed.Distributed`]: the plain calls in one process, sharded or broadcast
under ``accelerate launch``), pass `ctx.dist.state` to the reference cache (which shards its misses the same way),
and write files only where `ctx.dist.is_main`. A stage marked `main_only` (metrics, report) runs on the main
process alone and must not make collective calls; the driver waits for all processes after the last stage.

Extension points:

- A new stage: write `def my_stage(ctx: RunContext) -> None` and insert `Stage("my_stage", my_stage)` into
  [`STAGES`] where it belongs (e.g. a weight-rounding step between `quantize` and `calibrate`); add the fields it
  writes to [`RunContext`] (or keep them local). Collective work goes through `ctx.dist`.
- A new report section: a stage puts it into `ctx.sections["name"]` (it lands in `report.json` under that key,
  after `timings_s` in the order the stages added them, before `schedule`; `noise_floor`, `data` and
  `conditioning` come from `evaluate` this way), or a function `(ctx) -> dict` is appended to
  [`tdq.run.report.REPORT_SECTIONS`]; its markdown is a function `(report) -> list[str]` appended to
  [`tdq.run.report.MARKDOWN_SECTIONS`].
- A new config field (e.g. a backend choice): add it to the dataclass in `tdq/run/config.py` (and the group's
  yaml in `configs/`); the stage that uses it reads `ctx.cfg`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import tdq
from tdq.eval import data as data_eval
from tdq.eval.reference import (
    ReferenceCache,
    cached_features,
    cached_samples,
    feature_id,
    model_fingerprint,
    reference_spec,
    state_dict_fingerprint,
)
from tdq.outliers import report_section as outlier_report_section
from tdq.outliers import reset_runtime_counters
from tdq.quant.backends import backend_report, record_call
from tdq.run import quantizers
from tdq.run.context import RunContext
from tdq.run.models import load_model
from tdq.run.report import (
    _conditioning_section,
    _cropped,
    _data_section,
    _noise_floor_section,
    build_report,
    write_run_report,
)
from tdq.sampling import ConditionedForward, LatentDiffusionSampler, SampleResult

__all__ = [
    "STAGES",
    "Stage",
    "backend",
    "calibrate",
    "evaluate",
    "features",
    "load",
    "plan",
    "profile",
    "quantize",
    "reference",
    "report",
    "sample",
]


@dataclass(frozen=True)
class Stage:
    r"""
    One step of `tdq run`.

    Args:
        name (`str`): label (logs).
        run (`Callable[[RunContext], None]`): the stage; reads and writes the context.
        main_only (`bool`, *optional*, defaults to `False`): run on the main process only; such a stage must not
            make collective calls (`ctx.dist`, the reference cache).
    """

    name: str
    run: Callable[[RunContext], None]
    main_only: bool = False


# ----------------------------------------------------------------------------------------------------
# helpers: FP samples and features through the reference cache


def _fp_samples(
    ctx: RunContext, section: Any, seeds: list[int], trajectory: bool, desc: str
) -> tuple[SampleResult, dict[str, Any], Any]:
    """FP samples of `seeds` with the sampler of `section` (cached); returns samples, cache spec, cache info."""
    # latent models always keep the (small) latent trajectory: its last entry is the final latents, which
    # profiling needs and which multi-process sampling gathers only through the trajectory
    smp = ctx.sampler(section, trajectory or ctx.latent)
    if isinstance(smp, LatentDiffusionSampler):
        extra = {**ctx.spec_extra, "conditioning": smp.conditioning.describe()}
        spec = reference_spec(ctx.fingerprint, smp, seeds, guidance_scale=smp.guidance_scale, extra=extra)
    else:
        spec = reference_spec(ctx.fingerprint, smp, seeds)
    result, info = cached_samples(smp, seeds, spec, ctx.cache, ctx.dist.state, desc=desc)
    return result, spec, info


def _fp_features(
    ctx: RunContext, images: torch.Tensor, spec: dict[str, Any], label: str, real: bool = False
) -> dict[str, torch.Tensor]:
    """Features of FP (or, with `real`, real: not cropped) images by every extractor (cached)."""
    out = {}
    for key, (net, fid) in ctx.extractors.items():
        out[key], info = cached_features(
            images if real else ctx.for_features(images),
            net,
            fid,
            spec,
            ctx.cache,
            ctx.dist.state,
            batch_size=ctx.cfg.eval.feature_batch_size,
        )
        ctx.cache_report.setdefault("features", {})[f"{label}/{key}"] = info.status
    return out


# ----------------------------------------------------------------------------------------------------
# stages


def load(ctx: RunContext) -> None:
    """Load the model, fingerprint it (before quantization) and open the reference cache."""
    with ctx.timer("load"):
        ctx.model = load_model(ctx.cfg.model, device=str(ctx.device))
    m = ctx.model
    ctx.fingerprint = model_fingerprint(m.denoiser)
    # Everything besides the denoiser that changes FP samples (cache key).
    if ctx.latent:
        ctx.spec_extra["latent_shape"] = list(m.latent_shape)
        ctx.spec_extra["vae"] = model_fingerprint(m.vae)
        if m.text_encoder is not None:
            # transformers configs are not mappings: class + weights identify the text encoder
            ctx.spec_extra["text_encoder"] = (
                type(m.text_encoder).__name__
                + ":"
                + state_dict_fingerprint(m.text_encoder.state_dict(), skip=None)
            )
    ev = ctx.cfg.eval
    if ev.prompts_file is not None:
        ctx.prompt_list = _load_prompt_list(ctx, ev.prompts_file)
    elif m.kind == "t2i" and not m.class_names:
        from tdq.errors import ConfigError

        raise ConfigError(
            f"{m.name}: a text-to-image model needs eval.prompts_file (captions) or model.class_names (filled "
            f"into model.prompt_template={m.prompt_template!r})"
        )
    if m.kind == "t2i" and ev.clip not in ("auto", "none"):
        from pathlib import Path

        from tdq.errors import ConfigError

        if not (Path(ev.clip) / "config.json").is_file():  # fail before the long FP sampling, not after it
            raise ConfigError(
                f"eval.clip={ev.clip!r}: no CLIP model there (config.json missing); give a local folder holding a "
                "transformers CLIPModel and CLIPProcessor, 'auto' or 'none'"
            )
    ctx.cache = ReferenceCache(ev.cache_dir or None) if ev.cache else None
    ctx.cache_report["dir"] = str(ctx.cache.root) if ctx.cache else None


def _load_prompt_list(ctx: RunContext, path: str):
    """`eval.prompts_file` read and checked against the model (its class names, its number of classes)."""
    from tdq.errors import ConfigError
    from tdq.sampling.conditioning import model_conditioning
    from tdq.sampling.prompts import PromptFileError, load_prompts

    m = ctx.model
    if not ctx.latent:
        raise ConfigError(
            f"eval.prompts_file={path!r}: model {m.name!r} is unconditional (pixel); prompt files are for "
            "text-to-image and class-conditional models"
        )
    try:
        prompt_list = load_prompts(path)
        model_conditioning(m, ctx.cfg.eval.prompt_template, prompt_list)  # class names / labels checked here
    except (PromptFileError, ValueError) as e:
        raise ConfigError(f"eval.prompts_file: {e}") from None
    return prompt_list


def reference(ctx: RunContext) -> None:
    """FP samples of the evaluation seeds and, with `eval.noise_floor`, of the noise-floor seeds."""
    ev = ctx.cfg.eval
    with ctx.timer("fp_sampling"):
        ctx.fp, ctx.fp_spec, info = _fp_samples(ctx, ev, ctx.eval_seeds, True, "FP reference")
    ctx.cache_report["fp_samples"] = info.to_dict()
    if ev.noise_floor:
        if set(ctx.noise_floor_seeds) & set(ctx.eval_seeds):
            raise ValueError("eval.noise_floor_seed range overlaps the evaluation seeds")
        with ctx.timer("fp_sampling_noise_floor"):
            ctx.noise_floor, ctx.noise_floor_spec, info = _fp_samples(
                ctx, ev, ctx.noise_floor_seeds, False, "FP noise floor"
            )
        ctx.cache_report["noise_floor_samples"] = info.to_dict()


def features(ctx: RunContext) -> None:
    """
    Feature extractors (Inception for FID/KID, the domain judge when real data is given) and the features of the
    FP samples and the real data. They see images after `model.crop` (latent MNIST models: 32x32 outputs cropped
    to the 28x28 digit, as real MNIST).
    """
    m, ev = ctx.model, ctx.cfg.eval
    suffix = f"-crop{ctx.crop}" if ctx.crop else ""
    ctx.dataset = data_eval.resolve_dataset(ev.dataset, m.name, m.eval_shape)
    if ev.feature not in ("none", "inception"):
        raise ValueError(f"eval.feature={ev.feature!r} is unknown; choose 'inception' or 'none'")
    if ev.feature == "inception":
        from tdq.eval.features import InceptionFeatures

        net = InceptionFeatures(cache_dir=ev.assets_dir).to(ctx.device)
        ctx.extractors["inception"] = (net, feature_id("inception_v3_tf_pool3" + suffix, net))
    if ctx.dataset is not None and data_eval.judge_applies(ctx.dataset, m.eval_shape):
        ctx.judge, judge_feat, judge_name = data_eval.load_domain_judge(ctx.dataset, ctx.device)
        ctx.extractors["judge"] = (judge_feat, feature_id(judge_name + suffix, judge_feat))

    with ctx.timer("fp_features"):
        ctx.fp_feats = _fp_features(ctx, ctx.fp.images, ctx.fp_spec, "fp")
        if ctx.noise_floor is not None:
            ctx.noise_floor_feats = _fp_features(
                ctx, ctx.noise_floor.images, ctx.noise_floor_spec, "noise_floor"
            )
        if ctx.dataset is not None:
            ctx.real_images, ctx.real_labels = data_eval.load_dataset_images(
                ctx.dataset, ev.num_real or ev.num_samples
            )
            spec = data_eval.data_spec(ctx.dataset, ctx.real_images)
            ctx.real_feats = _fp_features(ctx, ctx.real_images, spec, "data", real=True)


def profile(ctx: RunContext) -> None:
    """
    Sensitivity profile of the FP model on its own samples of the calibration seeds. Under several processes the
    (bucket, batch) units are shared round-robin and the per-unit sums gathered (`profile_sensitivity(shard=None)`),
    so every process holds the single-process profile; the report's `profile_distribution` section says how it ran.
    Skipped with `schedule.planner=none`.
    """
    from tdq.mixed_precision.fisher import profile_sensitivity

    cfg, m = ctx.cfg, ctx.model
    if cfg.schedule.planner == "none" or not quantizers.uses_tdq_stages(ctx):
        return
    with ctx.timer("fp_sampling_for_profile"):
        # latent models: the FP model's own final latents (the trajectory's last entry), with their conditioning
        calib_fp, _, info = _fp_samples(
            ctx, cfg.calibration, ctx.calib_seeds, False, "FP samples for profiling"
        )
        if ctx.latent:
            x0 = calib_fp.latents if calib_fp.latents is not None else calib_fp.trajectory[-1]
        else:
            x0 = calib_fp.images * 2 - 1
    ctx.cache_report["profile_samples"] = info.to_dict()
    forward_fn = None
    if ctx.latent:
        forward_fn = ConditionedForward(
            ctx.sampler(cfg.calibration, trajectory=False), ctx.calib_seeds, cfg.schedule.samples_per_bucket
        )
    with ctx.timer("sensitivity"):
        ctx.profile = profile_sensitivity(
            m.denoiser,
            m.scheduler,
            x0.to(ctx.device),
            cfg.quant.grid.resolve(*tdq.get_adapter(m.denoiser, m.num_train_timesteps).default_grid()),
            config=cfg.quant,
            samples_per_bucket=cfg.schedule.samples_per_bucket,
            batch_size=cfg.schedule.batch_size,
            forward_fn=forward_fn,
            progress=ctx.progress,
            step_timesteps=_eval_step_timesteps(ctx) if cfg.schedule.occupancy else None,
        )
    ctx.sections["profile_distribution"] = dict(ctx.profile.meta["distribution"])
    if ctx.dist.is_main:
        ctx.profile.save(ctx.run_dir / "sensitivity")
        ctx.profile.plot_heatmap(ctx.run_dir / "sensitivity_act.png", kind="act")
        ctx.profile.plot_heatmap(ctx.run_dir / "sensitivity_weight.png", kind="weight")


def _eval_step_timesteps(ctx: RunContext) -> torch.Tensor:
    """The timesteps the evaluation sampler passes to the denoiser (for the planner's bucket occupancy)."""
    from tdq.sampling.noise import make_scheduler

    ev = ctx.cfg.eval
    scheduler = make_scheduler(ctx.model.scheduler, ev.scheduler)
    scheduler.set_timesteps(ev.num_inference_steps)
    return torch.as_tensor(scheduler.timesteps, dtype=torch.float64)


def planner_boundary_layers(ctx: RunContext) -> dict[str, int]:
    r"""
    The boundary layers of the FP denoiser (`tdq.boundary.find_boundary_layers` on one recorded FP call, the rule
    calibration's `convert` applies), as the planner's fixed cells: layer -> `quant.boundary_act_bits`. Empty when
    `boundary_act_bits` is unset or every profiled layer is a boundary layer (then none is raised either).
    """
    from tdq.boundary import find_boundary_layers

    target = ctx.cfg.quant.boundary_act_bits
    if not target or ctx.profile is None:
        return {}
    if ctx.fp_call is None:
        quantizers.measure_fp_macs(ctx)
    modules = dict(ctx.model.denoiser.named_modules())
    layers = {n: modules[n] for n in ctx.profile.layers if n in modules}
    try:
        roles = find_boundary_layers(ctx.model.denoiser, ctx.fp_call["args"], ctx.fp_call["kwargs"], layers)
    except ValueError:  # no sample tensor in the call: calibration raises none either
        return {}
    if len(roles) == len(layers):
        return {}
    return {n: int(target) for n in roles}


def plan(ctx: RunContext) -> None:
    """
    The precision schedule from the profile (`schedule.planner`: `milp` or `uniform`); the main process's schedule
    is broadcast, so every process applies the same one whatever float noise did to the MILP.

    Boundary layers (`quant.boundary_act_bits`) are fixed cells of the plan: they keep that many activation bits, as
    in a run without a schedule, and count in the average-bits budget (`planner_boundary_layers`). With
    `schedule.match_uniform` the budget is the effective average of uniform `W{avg_weight_bits}A{avg_act_bits}`
    with the same boundary layers, i.e. the bits the uniform run really has.
    """
    from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform

    cfg = ctx.cfg
    if cfg.schedule.planner == "none" or not quantizers.uses_tdq_stages(ctx):
        return
    with ctx.timer("plan"):
        sc = cfg.schedule
        fixed = planner_boundary_layers(ctx)
        if sc.planner == "milp":
            avg_act, avg_w = sc.avg_act_bits, sc.avg_weight_bits
            if sc.match_uniform:
                uni = plan_uniform(
                    ctx.profile, act_bits=int(avg_act), weight_bits=int(avg_w), fixed_act_bits=fixed
                ).meta["achieved"]
                avg_act, avg_w = uni["act"], uni["weight"]
            budget = PrecisionBudget(
                avg_act_bits=avg_act,
                avg_weight_bits=avg_w,
                act_candidates=tuple(sc.act_candidates),
                weight_candidates=tuple(sc.weight_candidates),
                max_weight_bytes=sc.max_weight_bytes,
                max_relative_latency=sc.max_relative_latency,
                float_fallback=sc.float_fallback,
            )
            schedule = plan_precision(
                ctx.profile, budget, uniform_fallback=sc.uniform_fallback, fixed_act_bits=fixed
            )
            if sc.match_uniform:
                schedule.meta["match_uniform"] = {
                    "w_bits": int(sc.avg_weight_bits),
                    "a_bits": int(sc.avg_act_bits),
                }
        elif sc.planner == "uniform":
            schedule = plan_uniform(
                ctx.profile,
                act_bits=cfg.quant.activation.bits,
                weight_bits=cfg.quant.weight.bits,
                fixed_act_bits=fixed,
            )
        else:
            raise ValueError(f"schedule.planner={sc.planner!r} is unknown; choose milp, uniform or none")
        schedule.act_bits = ctx.dist.broadcast(schedule.act_bits, schedule.act_bits.shape, torch.long)
        schedule.weight_bits = ctx.dist.broadcast(
            schedule.weight_bits, schedule.weight_bits.shape, torch.long
        )
        ctx.schedule = schedule
    if ctx.dist.is_main:
        schedule.save(ctx.run_dir / "schedule.json")
        schedule.plot(ctx.run_dir / "schedule.png")


def quantize(ctx: RunContext) -> None:
    """
    Quantize the denoiser in place with `cfg.quant` and apply the schedule (if any); with another quantizer
    (`cfg.quantizer`, `ctx.quantizer`), apply that instead (it calibrates itself). Both first count the MACs of the
    FP denoiser's Conv/Linear layers on one real call (the report's `quantizer` section).
    """
    m = ctx.model
    if ctx.layer_macs is None:  # stage `plan` may have measured them (finding the boundary layers)
        quantizers.measure_fp_macs(ctx)
    if not quantizers.uses_tdq_stages(ctx):
        quantizers.apply_quantizer(ctx)
        return
    with ctx.timer("quantize"):
        tdq.quantize_(m.denoiser, ctx.cfg.quant, num_train_timesteps=m.num_train_timesteps)
        if ctx.schedule is not None:
            ctx.schedule.apply_(m.denoiser, attention_bits=ctx.cfg.quant.activation.bits)


def calibrate(ctx: RunContext) -> None:
    """
    Calibrate through the real calibration sampler; the main process's quantizer buffers are synchronized.

    Under several processes, configurations whose statistics merge exactly (min/max observers, round-to-nearest
    weights: `tdq.eval.dist_calib.calibration_mode`) shard the calibration seeds in whole batches and all-reduce
    the observer statistics before the ranges are frozen (`sharded`); the others calibrate on all seeds in every
    process (`replicated`). The report's `calibration_distribution` section names the mode and why.
    """
    from tdq.api import get_quantization, pre_convert_hook
    from tdq.eval.dist_calib import calibration_mode, merge_observer_stats
    from tdq.eval.distributed import shard_batches
    from tdq.rounding import calibrate_with_rounding

    if not quantizers.uses_tdq_stages(ctx):  # the quantizer plug-in calibrated in stage `quantize`
        return
    state = ctx.dist.state
    mode, why = calibration_mode(get_quantization(ctx.model.denoiser).config, ctx.dist.num_processes)
    sampler = ctx.sampler(ctx.cfg.calibration, trajectory=False)
    seeds = list(ctx.calib_seeds)
    if mode == "sharded":
        seeds = shard_batches(seeds, sampler.batch_size, state)

    def run():
        if seeds:  # an empty shard observes nothing; the merge still includes it
            sampler(seeds, desc="calibration")

    merge = pre_convert_hook(lambda model: merge_observer_stats(model, state))
    with ctx.timer(
        "calibrate"
    ):  # weight rounding by quant.weight_rounding (FP-model statistics), then activations
        with record_call(ctx.model.denoiser) as example_call:
            with merge if mode == "sharded" else contextlib.nullcontext():
                rounding = calibrate_with_rounding(ctx.model.denoiser, run)
        ctx.dist.sync_buffers(ctx.model.denoiser)
        reset_runtime_counters(ctx.model.denoiser)  # count run-time range violations of the evaluation only
    ctx.example_call = example_call
    ctx.sections["weight_rounding"] = {k: v for k, v in rounding.items() if k != "filled_buckets"}
    boundary = tdq.get_quantization(ctx.model.denoiser).boundary or {}
    ctx.sections["boundary_layers"] = {
        "boundary_act_bits": ctx.cfg.quant.boundary_act_bits,
        "raised": sorted(n for n, d in boundary.items() if d["bits_before"] != d["bits_after"]),
        "roles": {n: d["role"] for n, d in boundary.items()},
        # held at boundary_act_bits by the planner (fixed cells of the schedule, counted in its budget)
        "fixed_by_planner": sorted((ctx.schedule.meta.get("fixed_act_bits") or {}) if ctx.schedule else []),
    }
    ctx.sections["calibration_distribution"] = {
        "mode": mode,
        "reason": why,
        "num_processes": ctx.dist.num_processes,
        "local_seeds": len(seeds),
        "total_seeds": len(ctx.calib_seeds),
    }
    if ctx.cfg.quant.qat.enabled:
        with ctx.timer("qat"):
            ctx.sections["qat"] = _finetune_qat(ctx)
        ctx.dist.sync_buffers(ctx.model.denoiser)
    planner = ctx.cfg.schedule.planner if ctx.schedule is not None else "none"
    ctx.sections["quantizer"] = quantizers.quantizer_section(
        ctx, quantizers.get_quantizer("tdq"), {"schedule": planner}
    )
    ctx.sections["effective_bits"] = quantizers.effective_bits(
        ctx.model.denoiser, ctx.layer_macs or {}, _eval_occupancy(ctx)
    )


def _eval_occupancy(ctx: RunContext) -> list[float] | None:
    """The evaluation sampler's step occupancy of the quantization grid's buckets (`None` if it cannot be had)."""
    from tdq.mixed_precision.fisher import _occupancy_weights

    state = tdq.get_quantization(ctx.model.denoiser)
    try:
        occ = _occupancy_weights(state.grid, _eval_step_timesteps(ctx), state.adapter)
    except (AttributeError, ValueError):  # a quantizer without a grid / a sampler without integer timesteps
        return None
    return None if occ is None else occ.tolist()


def _finetune_qat(ctx: RunContext) -> dict[str, Any]:
    """
    `quant.qat`: LSQ fine-tuning of the calibrated denoiser by distillation from a freshly loaded FP copy, with the
    evaluation scheduler and its `eval.num_inference_steps` timesteps (`qat.eval_steps` is set to them). Pixel
    models only.
    """
    import dataclasses

    from tdq.errors import ConfigError
    from tdq.qat import finetune_qat
    from tdq.sampling.noise import make_scheduler

    if ctx.latent:
        raise ConfigError(
            f"quant.qat.enabled=true is supported for pixel models only; model {ctx.model.name!r} is a latent model"
        )
    ev = ctx.cfg.eval
    qcfg = dataclasses.replace(ctx.cfg.quant.qat, eval_steps=ev.num_inference_steps)
    fp = load_model(ctx.cfg.model, device=str(ctx.device)).denoiser
    rep = finetune_qat(
        ctx.model.denoiser,
        fp,
        make_scheduler(ctx.model.scheduler, ev.scheduler),
        qcfg,
        sample_shape=ctx.model.sample_shape,
        progress=ctx.progress,
    )
    rep.pop("losses")
    return rep


def backend(ctx: RunContext) -> None:
    """Lower the calibrated model onto `cfg.backend` (no-op for `"simulate"`) and time it against FP32."""
    if ctx.cfg.backend == "simulate":
        return
    with ctx.timer("backend"):
        ctx.sections["backend"] = backend_report(ctx.model.denoiser, ctx.cfg.backend, ctx.example_call)


def sample(ctx: RunContext) -> None:
    """Quantized samples of the evaluation seeds and their features."""
    with ctx.timer("quant_sampling"):
        ctx.q = ctx.dist.sample(ctx.sampler(ctx.cfg.eval), ctx.eval_seeds, desc="quantized")
    if hasattr(ctx.model.denoiser, tdq.api.QUANTIZATION_ATTR):  # a model quantized by tdq (not a baseline)
        outliers = outlier_report_section(
            ctx.model.denoiser
        )  # diagnosis + run-time counters of this sampling
        if outliers is not None:
            ctx.sections["outliers"] = outliers
    quantizers.record_nonfinite(ctx)
    with ctx.timer("quant_features"):
        ctx.q_feats = {
            key: ctx.dist.extract_features(
                ctx.for_features(ctx.q.images), net, batch_size=ctx.cfg.eval.feature_batch_size
            )
            for key, (net, _) in ctx.extractors.items()
        }


def _nan_metrics_of(metrics: dict, indices: list[int]) -> None:
    """Set the per-image values at `indices` and every mean that includes them to NaN (in place)."""
    for key in [k for k in metrics if k.endswith("_per_image")]:
        values = list(metrics[key])
        for i in indices:
            values[i] = float("nan")
        metrics[key] = values
        base = key[: -len("_per_image")]
        if base in metrics:
            metrics[base] = float("nan")


def evaluate(ctx: RunContext) -> None:
    """
    Metrics (main process): paired FP-vs-quantized metrics, FID/KID, trajectory drift, and the `noise_floor`,
    `data` and (latent models) `conditioning` report sections.
    """
    from tdq.eval import paired_metrics, trajectory_drift

    ev, fp, q, nf = ctx.cfg.eval, ctx.fp, ctx.q, ctx.noise_floor
    kid_kw = {"kid_subsets": ev.kid_subsets, "kid_subset_size": 1000, "seed": 0}
    with ctx.timer("metrics"):
        # non-finite quantized samples (counted in the `quantizer` section) get NaN metrics, never dropped; the
        # metric functions refuse such images, so they are measured on a stand-in and their values replaced.
        bad = ~torch.isfinite(q.images).flatten(1).all(1)
        q_images = torch.where(bad.view(-1, 1, 1, 1), fp.images, q.images) if bool(bad.any()) else q.images
        metrics = paired_metrics(
            fp.images,
            q_images,
            feature=None,
            lpips_nets=tuple(ev.lpips_nets),
            cache_dir=ev.assets_dir,
            device=ctx.device,
        )
        if bool(bad.any()):
            _nan_metrics_of(metrics, bad.nonzero().flatten().tolist())
        if "inception" in ctx.extractors:
            fp_in, q_in = ctx.fp_feats["inception"], ctx.q_feats["inception"]
            dist = data_eval.distribution_metrics(fp_in, q_in, **kid_kw)
            metrics["feature"] = "inception_v3_tf_pool3"
            metrics["feature_dim"] = int(fp_in.shape[1])
            metrics.update({k: v for k, v in dist.items() if k not in ("num_real", "num_fake")})
        ctx.metrics = metrics
        ctx.drift = trajectory_drift(fp.trajectory, q.trajectory)
        if nf is not None:
            ctx.sections["noise_floor"] = _noise_floor_section(
                ev, ctx.noise_floor_seeds, ctx.fp_feats, ctx.noise_floor_feats, ctx.q_feats, kid_kw
            )
        if ctx.dataset is not None:
            ctx.sections["data"] = _data_section(
                ctx.dataset,
                ctx.real_feats,
                ctx.real_labels,
                ctx.real_images,
                _cropped(fp, ctx.for_features),
                _cropped(q, ctx.for_features),
                _cropped(nf, ctx.for_features) if nf is not None else None,
                ctx.fp_feats,
                ctx.noise_floor_feats,
                ctx.q_feats,
                ctx.judge,
                kid_kw,
            )
    if ctx.latent:
        with ctx.timer("conditional_metrics"):
            ctx.sections["conditioning"] = _conditioning_section(
                ctx.model,
                ctx.sampler(ev, trajectory=False),
                ctx.eval_seeds,
                ctx.for_features(fp.images),
                ctx.for_features(q.images),
                fp.images,
                q.images,
                ctx.judge,
                ev,
                ctx.device,
            )


def report(ctx: RunContext) -> None:
    """Assemble the report ([`~tdq.run.report.REPORT_SECTIONS`]) and write it with its figures (main process)."""
    ctx.report = build_report(ctx)
    write_run_report(ctx, ctx.report)


#: The stages of `tdq run`, in order; edit this list to add, replace or drop a stage.
STAGES: list[Stage] = [
    Stage("load", load),
    Stage("reference", reference),
    Stage("features", features),
    Stage("profile", profile),
    Stage("plan", plan),
    Stage("quantize", quantize),
    Stage("calibrate", calibrate),
    Stage("backend", backend),
    Stage("sample", sample),
    Stage("evaluate", evaluate, main_only=True),
    Stage("report", report, main_only=True),
]
