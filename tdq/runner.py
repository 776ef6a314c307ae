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
from tdq.models import ModelConfig, load_model
from tdq.sampling import DiffusionSampler, make_scheduler

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
        batch_size (`int`, *optional*, defaults to `16`): samples per denoiser call.
        feature (`str`, *optional*, defaults to `"inception"`): FID/KID features (`"inception"` or `"none"`).
        lpips_nets (`list[str]`): LPIPS backbones (`alex`, `vgg`); empty skips LPIPS.
        assets_dir (`str`, *optional*): metric-weight cache (default `~/.cache/tdq/assets`).
    """

    num_samples: int = 16
    num_inference_steps: int = 20
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 16
    feature: str = "inception"
    lpips_nets: list[str] = field(default_factory=lambda: ["alex"])
    assets_dir: str | None = None


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
        device (`str`, *optional*, defaults to `"cpu"`): where to run.
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


def run_experiment(cfg: RunConfig | Any, run_dir: str | Path) -> dict[str, Any]:
    """
    Run the main job and write the run directory.

    Files written: `report.json`, `report.md`, `grid.png` (FP row over quantized row), `drift.png`,
    `lpips_hist.png`, `sensitivity.{safetensors,json}`, `sensitivity_act.png`, `sensitivity_weight.png`,
    `schedule.json`, `schedule.png`, `config.json`.

    Args:
        cfg (`RunConfig` or Hydra `DictConfig`): the run config.
        run_dir (`str` or `Path`): output directory.

    Returns:
        `dict`: the report (as in `report.json`).
    """
    from tdq.eval import paired_metrics, trajectory_drift, write_report
    from tdq.schedule import PrecisionBudget, plan_precision, plan_uniform, schedule_objective
    from tdq.sensitivity import profile_sensitivity

    cfg = _to_run_config(cfg)
    cfg.quant.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(_asdict(cfg), indent=2))
    timer = _Timer()
    device = torch.device(cfg.device)

    with timer("load"):
        m = load_model(cfg.model, device=cfg.device)
    denoiser = m.denoiser

    def sampler(section) -> DiffusionSampler:
        return DiffusionSampler(
            denoiser,
            make_scheduler(m.scheduler, section.scheduler),
            m.sample_shape,
            num_inference_steps=section.num_inference_steps,
            batch_size=section.batch_size,
            device=device,
            progress=cfg.progress,
        )

    eval_seeds = list(range(cfg.eval.seed, cfg.eval.seed + cfg.eval.num_samples))
    calib_seeds = list(range(cfg.calibration.seed, cfg.calibration.seed + cfg.calibration.num_samples))
    with timer("fp_sampling"):
        fp = sampler(cfg.eval)(eval_seeds, desc="FP reference")

    # Sensitivity profile and precision schedule (on the FP model).
    profile = schedule = None
    if cfg.schedule.planner != "none":
        with timer("fp_sampling_for_profile"):
            x0 = sampler(cfg.calibration)(calib_seeds, desc="FP samples for profiling").images * 2 - 1
        with timer("sensitivity"):
            profile = profile_sensitivity(
                denoiser,
                m.scheduler,
                x0.to(device),
                cfg.quant.grid.resolve(*tdq.get_adapter(denoiser, m.num_train_timesteps).default_grid()),
                config=cfg.quant,
                samples_per_bucket=cfg.schedule.samples_per_bucket,
                batch_size=cfg.schedule.batch_size,
                progress=cfg.progress,
            )
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
        schedule.save(run_dir / "schedule.json")
        schedule.plot(run_dir / "schedule.png")

    # Quantize, apply the schedule, calibrate through the real sampler.
    with timer("quantize"):
        tdq.quantize_(denoiser, cfg.quant, num_train_timesteps=m.num_train_timesteps)
        if schedule is not None:
            schedule.apply_(denoiser)
    with timer("calibrate"):
        with tdq.calibration(denoiser):
            sampler(cfg.calibration)(calib_seeds, desc="calibration")
    with timer("quant_sampling"):
        q = sampler(cfg.eval)(eval_seeds, desc="quantized")

    with timer("metrics"):
        feature = None if cfg.eval.feature == "none" else cfg.eval.feature
        metrics = paired_metrics(
            fp.images,
            q.images,
            feature=feature,
            lpips_nets=tuple(cfg.eval.lpips_nets),
            cache_dir=cfg.eval.assets_dir,
        )
        drift = trajectory_drift(fp.trajectory, q.trajectory)

    report: dict[str, Any] = {
        "model": {"name": m.name, "source": m.source, "sample_shape": list(m.sample_shape)},
        "num_samples": len(eval_seeds),
        "eval": {
            "scheduler": cfg.eval.scheduler,
            "num_inference_steps": cfg.eval.num_inference_steps,
            "seeds": [eval_seeds[0], eval_seeds[-1]],
        },
        "calibration": {"num_samples": len(calib_seeds), "scheduler": cfg.calibration.scheduler},
        **metrics,
        "drift": drift,
        "timings_s": timer.times,
    }
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
    write_report(
        run_dir,
        report,
        fp.images,
        q.images,
        drift,
        extra_figures={k: v for k, v in extra.items() if v.exists()},
    )
    return json.loads((run_dir / "report.json").read_text())


def _asdict(cfg: RunConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)
