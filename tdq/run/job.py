"""The main job behind `tdq run`: load → FP reference → profile → plan → quantize → calibrate → sample → evaluate.

[`run_experiment`] builds a [`~tdq.run.context.RunContext`] and runs the stages of [`tdq.run.stages.STAGES`] on it;
the config schema is in `tdq.run.config`, the report in `tdq.run.report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tdq.eval.distributed import get_distributed
from tdq.run import quantizers, stages
from tdq.run.config import CalibrationConfig, EvalConfig, RunConfig, ScheduleConfig, to_run_config
from tdq.run.context import RunContext
from tdq.run.report import write_config
from tdq.utils.io import remove_temporaries

__all__ = ["CalibrationConfig", "EvalConfig", "RunConfig", "ScheduleConfig", "run_experiment"]


#: The files `run_experiment` writes; `report.json` (written last) marks a complete run.
RUN_FILES = (
    "report.json",
    "report.md",
    "config.json",
    "grid.png",
    "drift.png",
    "lpips_hist.png",
    "sensitivity.json",
    "sensitivity.safetensors",
    "sensitivity_act.png",
    "sensitivity_weight.png",
    "schedule.json",
    "schedule.png",
)


def _remove_outputs(run_dir: Path) -> None:
    """Delete what an earlier run wrote into `run_dir` (`report.json` first) and temporaries of killed writes, so
    the folder never shows an old report next to the new run's files, nor files of another run as this one's."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FILES:
        remove_temporaries(run_dir, f".{name}.*.tmp")


def run_experiment(cfg: RunConfig | Any, run_dir: str | Path, quantizer: Any = None) -> dict[str, Any]:
    """
    Run the main job and write the run directory.

    Builds a [`~tdq.run.context.RunContext`] and runs [`tdq.run.stages.STAGES`] on it in order (load → reference →
    features → profile → plan → quantize → calibrate → sample → evaluate → report); see `tdq.run.stages` for what
    each stage does and how to add one.

    Files written: `report.json`, `report.md`, `grid.png` (FP row over quantized row), `drift.png`,
    `lpips_hist.png`, `sensitivity.{safetensors,json}`, `sensitivity_act.png`, `sensitivity_weight.png`,
    `schedule.json`, `schedule.png`, `config.json`.

    Interruption: these files from an earlier run in `run_dir` are deleted first (`report.json` first), every file
    is written through a temporary file and a rename, and `report.json` is written last: a folder with a
    `report.json` holds one complete run, one without it an interrupted run (rerun it: FP samples and features
    already in the reference cache are reused).

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

    The denoiser is quantized by `cfg.quantizer` (`tdq`: the stages profile → plan → quantize → calibrate; any
    other registered quantizer of `tdq.run.quantizers` replaces them in stage `quantize`) or by `quantizer`.

    Args:
        cfg (`RunConfig` or Hydra `DictConfig`): the run config.
        run_dir (`str` or `Path`): output directory.
        quantizer (`Callable`, *optional*): a quantizer function `(model, QuantizerContext) -> model` used instead
            of `cfg.quantizer` (see [`tdq.evaluate`]).

    Returns:
        `dict`: the report (as in `report.json`) on the main process, `{}` on the others.
    """
    cfg = to_run_config(cfg)
    cfg.validate()
    quantizers.resolve_quantizer(cfg, quantizer)  # unknown name / missing extra: fail before loading anything
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = get_distributed(cpu=cfg.device == "cpu")
    run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_outputs(run_dir)
        write_config(run_dir, cfg)
    ctx = RunContext(
        cfg=cfg,
        run_dir=run_dir,
        dist=dist,
        device=dist.resolve_device(cfg.device),
        progress=cfg.progress and dist.is_main,
        quantizer=quantizer,
    )
    # collective stages on every process, then the main-only ones (metrics, report) on the main process
    for stage in stages.STAGES:  # looked up at call time: the list may be edited or replaced
        if dist.is_main or not stage.main_only:
            stage.run(ctx)
    dist.wait_for_everyone()
    if not dist.is_main:
        return {}
    return json.loads((run_dir / "report.json").read_text())
