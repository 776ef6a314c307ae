"""`tdq.evaluate`: the measurements of `tdq run` for a denoiser quantized by any function.

The FP reference and noise floor (reference cache), paired metrics (PSNR, SSIM, LPIPS), FID/KID to FP beside the
noise floor, drift and the report are exactly those of `tdq run`: `evaluate` runs the same stages
(`tdq.run.stages`), with the quantizer in stage `quantize`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tdq.errors import ConfigError
from tdq.run.config import RunConfig, to_run_config
from tdq.run.models import ModelConfig

__all__ = ["compose_run_config", "evaluate"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_run_config(overrides: Sequence[str] = ()) -> RunConfig:
    r"""
    The `RunConfig` that `tdq run <overrides>` would use, without Hydra's global state (usable inside a Hydra job).

    Args:
        overrides (`Sequence[str]`): group choices (`quant=w4a8`, `quantizer=static`, `model=mnist-dit`) and dotted
            values (`eval.num_samples=64`), as on the `tdq run` command line. Hydra's `+key`/`~key` forms are
            not supported here.

    Returns:
        `RunConfig`
    """
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))
    groups: dict[str, str] = {}
    for entry in base.pop("defaults"):
        if isinstance(entry, dict):
            groups.update(entry)
    base.pop("hydra", None)
    dotted = []
    for ov in overrides:
        key, sep, value = str(ov).partition("=")
        if not sep or not key or key[0] in "+~":
            raise ConfigError(f"override {ov!r} must be 'group=name' or 'a.b=value'")
        if key in groups:
            groups[key] = value
        else:
            dotted.append(ov)
    data: dict[str, Any] = {}
    for group, name in groups.items():
        path = CONFIG_DIR / group / f"{name}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            raise ConfigError(f"{group}={name!r} is not a config of group {group!r}; choose one of {choices}")
        data[group] = OmegaConf.to_container(OmegaConf.load(path)) or {}
    merged = OmegaConf.merge(OmegaConf.create({**data, **base}), OmegaConf.from_dotlist(dotted))
    return to_run_config(OmegaConf.to_container(merged, resolve=True))


def evaluate(
    quantizer: str | Callable = "tdq",
    model: str | ModelConfig | Mapping | None = None,
    *,
    overrides: Sequence[str] = (),
    config: RunConfig | Mapping | None = None,
    options: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    r"""
    Quantize a denoiser with `quantizer` and measure it against its FP model exactly as `tdq run` does.

    Runs the stages of `tdq run` (`tdq.run.stages`): load the model, FP reference samples and the FP noise floor
    (other seeds; from the reference cache when present), then the quantizer on the FP denoiser, quantized
    samples on the same seeds, paired metrics (PSNR/SSIM/LPIPS to FP), FID/KID to FP beside the noise floor,
    trajectory drift, and the run directory (`report.json`, `report.md`, figures). The report's `quantizer` section
    names the quantizer and the share of the Conv/Linear MACs it quantized; quantized samples with NaN/inf are
    counted there (`nonfinite_samples`) and their metrics are NaN, never dropped.

    Args:
        quantizer (`str` or `Callable`, *optional*, defaults to `"tdq"`): a registered quantizer
            (`tdq.run.quantizers.available_quantizers()`: `tdq`, `static`, `dynamic-per-token`, `quanto-w8a8`, ...),
            a `"package.module:function"` path, or a function `quantizer(model, ctx) -> model` that quantizes the
            float denoiser `model` and returns it; `ctx` is a [`~tdq.run.quantizers.QuantizerContext`]
            (`ctx.calibrate(model)` runs the real calibration sampler through it, `ctx.quant` is the run's
            `TDQConfig`, `ctx.example_call` one FP denoiser call).
        model (`str`, `ModelConfig` or `dict`, *optional*): the model: a `configs/model` name (`"mnist-ddpm"`,
            `"mnist-t2i"`, `"mnist-dit"`, `"tiny-random"`) or a `ModelConfig` (e.g. `source="path"`); default: that of
            the config.
        overrides (`Sequence[str]`, *optional*): `tdq run` command-line overrides (`"eval.num_samples=64"`,
            `"quant=w4a8"`, `"schedule=none"`), applied to `tdq run`'s default config. Ignored with `config`.
        config (`RunConfig` or `dict`, *optional*): the whole run config instead (a nested dict takes `RunConfig`
            defaults for what it leaves out).
        options (`dict`, *optional*): options of a registered quantizer (`quantizer.options`).
        run_dir (`str` or `Path`, *optional*): output directory; default: a new temporary directory.

    Returns:
        `dict`: the report (as in `report.json`), plus `run_dir`.

    Example:

    ```py
    >>> import tdq
    >>> def int8_weights_only(model, ctx):
    ...     tdq.quantize_(model, tdq.TDQConfig(activation={"bits": 16}), num_train_timesteps=ctx.num_train_timesteps)
    ...     ctx.calibrate_tdq(model)
    ...     return model
    >>> report = tdq.evaluate(int8_weights_only, "mnist-ddpm", overrides=["eval.num_samples=8"])
    >>> report["psnr"], report["lpips_alex"], report["quantizer"]["mac_share_quantized"]
    ```
    """
    import copy

    from tdq.run.job import run_experiment

    if config is not None:
        if overrides:
            raise ConfigError("give either config or overrides, not both")
        cfg = copy.deepcopy(to_run_config(dict(config) if isinstance(config, Mapping) else config))
    else:
        groups = []
        if isinstance(model, str) and (CONFIG_DIR / "model" / f"{model}.yaml").is_file():
            groups.append(f"model={model}")
            model = None
        cfg = compose_run_config([*groups, *overrides])
    if model is not None:
        if isinstance(model, str):
            model = ModelConfig(name=model)
        elif isinstance(model, Mapping):
            model = to_run_config({"model": dict(model)}).model
        if not isinstance(model, ModelConfig):
            raise ConfigError(f"model={model!r} must be a model name, a ModelConfig or a mapping")
        cfg.model = model
    fn = None
    if callable(quantizer):
        fn = quantizer
    elif isinstance(quantizer, str):
        cfg.quantizer.name = quantizer
    else:
        raise ConfigError(
            f"quantizer={quantizer!r} must be a registered name or a function (model, ctx) -> model"
        )
    if options:
        cfg.quantizer.options = dict(options)
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="tdq-evaluate-"))
    report = run_experiment(cfg, run_dir, quantizer=fn)
    if report:
        report["run_dir"] = str(run_dir)
    return report
