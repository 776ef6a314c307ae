"""The public verbs: `quantize_`, `calibration`/`calibrate`, and hook control.

```python
tdq.quantize_(unet, TDQConfig())          # module swap + timestep hook
with tdq.calibration(unet):               # observers collect per-bucket ranges while the real sampler runs
    pipe(num_inference_steps=20, ...)
images = pipe(...).images                 # timestep-aware quantized sampling
with tdq.disabled(unet):                  # the same model in floating point (FP reference)
    ref = pipe(...).images
```
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from tdq.adapters import ConstantTimestepAdapter, TimestepAdapter, get_adapter
from tdq.config import TDQConfig
from tdq.errors import ConfigError
from tdq.grid import TimestepGrid, is_int
from tdq.hooks import TimestepHook
from tdq.quant.attention import iter_attention_quantizers, quantize_attention_
from tdq.quant.modules import QuantMixin, quant_module_class
from tdq.quant.quantizers import TimestepContext

logger = logging.getLogger(__name__)

QUANTIZATION_ATTR = "_tdq_quantization"


@dataclass
class QuantizationInfo:
    r"""
    What `quantize_` attaches to a model (as `model._tdq_quantization`; read it with `get_quantization`).

    Args:
        config (`TDQConfig`): the config used.
        grid (`TimestepGrid`): the resolved grid.
        adapter (`TimestepAdapter`): the timestep adapter.
        context (`TimestepContext`): the shared context.
        hook (`TimestepHook` or `None`): the installed hook, if any.
        filtered (`bool`): whether a `filter_fn` narrowed the layer selection (saved states then list the layers).
        outliers (`tdq.outliers.OutlierDiagnosis` or `None`): the outlier diagnosis of the last calibration.
        boundary (`dict` or `None`): the boundary layers of the last calibration (`tdq.boundary`).
    """

    config: TDQConfig
    grid: TimestepGrid
    adapter: TimestepAdapter
    context: TimestepContext
    hook: TimestepHook | None = None
    filtered: bool = False
    outliers: object | None = None
    boundary: dict | None = None
    first_call: dict = field(default_factory=dict, repr=False)


def select_layers(
    model: nn.Module,
    config: TDQConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """
    Names of the modules `quantize_` would swap: instances of registered float types (subclasses included)
    selected by the config's include/exclude patterns and by `filter_fn`.

    Args:
        model (`nn.Module`): the (float) model.
        config (`TDQConfig`, *optional*): layer selection; defaults to `TDQConfig()`.
        filter_fn (`Callable[[nn.Module, str], bool]`, *optional*): called as `filter_fn(module, name)`; a layer is
            quantized only where it returns `True`.
    """
    config = config or TDQConfig()
    return [
        name
        for name, m in model.named_modules()
        if name
        and quant_module_class(m) is not None
        and config.selects(name)
        and (filter_fn is None or filter_fn(m, name))
    ]


def quantize_(
    model: nn.Module,
    config: TDQConfig | None = None,
    *,
    adapter: TimestepAdapter | None = None,
    num_train_timesteps: int = 1000,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibrate_weights: bool = True,
) -> nn.Module:
    """
    Quantize a denoiser in place: swap selected layers for quantized ones and install the timestep hook.

    Activation quantizers start uncalibrated: run the sampler inside `calibration(model)` before quantized use.

    Args:
        model (`nn.Module`): the denoiser (UNet, DiT, ... or any module whose `forward` takes a timestep).
        config (`TDQConfig`, *optional*): defaults to `TDQConfig()` (W8A8, 10 buckets).
        adapter (`TimestepAdapter`, *optional*): overrides the adapter found by `get_adapter`.
        num_train_timesteps (`int`, *optional*, defaults to `1000`): length of the training noise schedule.
        filter_fn (`Callable[[nn.Module, str], bool]`, *optional*): called as `filter_fn(module, name)` for every
            candidate layer; only layers where it returns `True` are quantized.
        calibrate_weights (`bool`, *optional*, defaults to `True`): estimate every weight quantizer's range now;
            `False` skips that work for a saved state loaded right after (`tdq.serialization.load_quantization`).

    Returns:
        The same `model`, for chaining.
    """
    if isinstance(config, dict):
        config = TDQConfig.from_dict(config)
    elif config is not None and not isinstance(config, TDQConfig):
        raise TypeError(f"config must be a TDQConfig or a mapping of its fields, got {type(config).__name__}")
    config = config or TDQConfig()
    config.validate()
    if adapter is None and (not is_int(num_train_timesteps) or num_train_timesteps < 2):
        raise ConfigError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 2")
    if hasattr(model, QUANTIZATION_ATTR):
        raise RuntimeError(f"{type(model).__name__} is already quantized by tdq")
    adapter = adapter or get_adapter(model, num_train_timesteps=num_train_timesteps)
    grid = config.grid.resolve(*adapter.default_grid())
    context = TimestepContext(grid.num_buckets)
    context.check_finite = config.check_finite
    config.check_patterns(
        [
            n
            for n, m in model.named_modules()
            if n and quant_module_class(m) is not None and (filter_fn is None or filter_fn(m, n))
        ]
    )
    names = select_layers(model, config, filter_fn)
    if not names:
        raise ValueError(
            f"no layer of {type(model).__name__} matches include={config.include} exclude={config.exclude}"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        float_mod = getattr(parent, child)
        wspec, aspec = config.layer_specs(name)
        cls = quant_module_class(float_mod)
        if calibrate_weights:
            qmod = cls.from_float(float_mod, name, wspec, aspec, context)
        else:
            qmod = cls.from_float(float_mod, name, wspec, aspec, context, calibrate_weight=False)
        # the new quantizer submodules follow the layer's train/eval mode (stochastic rounding only in training)
        qmod.train(float_mod.training)
        setattr(parent, child, qmod)
    if config.attention:
        done = quantize_attention_(model, config.activation, context, config.selects)
        logger.info("quantized the attention matmuls of %d attention module(s)", len(done))
    state = QuantizationInfo(
        config=config, grid=grid, adapter=adapter, context=context, filtered=filter_fn is not None
    )
    object.__setattr__(model, QUANTIZATION_ATTR, state)
    install_hook(model)
    return model


def get_quantization(model: nn.Module) -> QuantizationInfo:
    """The `QuantizationInfo` of a model quantized by `quantize_`; raises `ValueError` otherwise."""
    state = getattr(model, QUANTIZATION_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not quantized by tdq; call tdq.quantize_(model, config) first"
        )
    return state


def iter_quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantMixin]]:
    """Yield `(name, module)` for every quantized layer of `model`."""
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            yield name, m


def install_hook(model: nn.Module) -> TimestepHook:
    """(Re-)install the timestep hook; quantized layers quantize again."""
    state = get_quantization(model)
    if state.hook is None:
        state.hook = TimestepHook(model, state.adapter, state.grid, state.context)
    return state.hook


def remove_hook(model: nn.Module) -> None:
    """Remove the timestep hook: the model computes exactly as the float model did (weights are kept in float)."""
    state = get_quantization(model)
    if state.hook is not None:
        state.hook.remove()
        state.hook = None


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run the quantized model in floating point (the FP reference) and restore afterwards."""
    state = get_quantization(model)
    had_hook = state.hook is not None
    remove_hook(model)
    try:
        yield model
    finally:
        if had_hook:
            install_hook(model)


def prepare(model: nn.Module, seed: int = 0) -> None:
    """
    Put every activation quantizer in observe mode with fresh per-bucket observers (and outlier statistics).

    Quantizers built on the `meta` device (`quantize_` on a meta model, then `to_empty()` and loading the float
    weights) are re-initialised here from the config: weight ranges from the loaded weights, bit-widths from the
    config (a precision schedule applied on the meta model must be applied again).

    Raises:
        `RuntimeError` naming the first layer whose weight is still on the `meta` device.
    """
    from tdq.outliers import attach_stats

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer (it seeds the calibration observers)")
    layers = list(iter_quant_layers(model))
    for name, m in layers:
        if m.weight.is_meta:
            raise RuntimeError(
                f"layer {name!r}: its weight is on the meta device; materialise the model (to_empty() and load the "
                "float weights) before calibration"
            )
    install_hook(model)
    for _, m in layers:
        if m.weight_quantizer.needs_init or m.act_quantizer.needs_init:
            m.weight_quantizer.reset_(m.weight)
            m.act_quantizer.reset_()
            m._wq_cache = None
    attach_stats(model, seed=seed)
    state = get_quantization(model)
    state.first_call.clear()
    if state.config.boundary_act_bits:
        from tdq.boundary import record_first_call

        state.first_call["handle"] = record_first_call(model, state.first_call)
    for i, (_, m) in enumerate(layers):
        m.act_quantizer.start_observing(seed=seed + 1000 * i)
    for i, (_, q) in enumerate(iter_attention_quantizers(model), start=len(layers)):
        if q.needs_init:
            q.reset_()
        q.start_observing(seed=seed + 1000 * i)


def _abort_calibration(model: nn.Module) -> None:
    """Leave every activation quantizer in a defined state after a failed calibration: observers dropped, quant
    mode; layers that were not converted keep their previous scales (none on a first calibration, so using them
    raises `NotCalibratedError`)."""
    rec = get_quantization(model).first_call
    if "handle" in rec:
        rec.pop("handle").remove()
    rec.clear()
    quantizers = [m.act_quantizer for _, m in iter_quant_layers(model)]
    for q in quantizers + [q for _, q in iter_attention_quantizers(model)]:
        q.observers = None
        q.stats = None
        q.mode = "quant"


_PRE_CONVERT_HOOKS: list[Callable[[nn.Module], None]] = []


@contextlib.contextmanager
def pre_convert_hook(hook: Callable[[nn.Module], None]) -> Iterator[None]:
    """
    Within the block, `convert` calls `hook(model)` before it freezes the observed ranges (while every activation
    quantizer still holds its observers), e.g. to merge the observer statistics of several processes
    (`tdq.eval.dist_calib.merge_observer_stats`).
    """
    _PRE_CONVERT_HOOKS.append(hook)
    try:
        yield
    finally:
        _PRE_CONVERT_HOOKS.remove(hook)


def convert(model: nn.Module) -> dict[str, list[int]]:
    """
    Freeze the observed per-bucket ranges into scales and switch to quantized mode, then diagnose and handle
    activation outliers (`TDQConfig.outliers`, see `tdq.outliers.after_calibration`).

    If a layer cannot be converted (e.g. it saw no activations), every layer leaves observe mode: converted layers
    keep their new scales, the others their previous ones (none on a first calibration: using them raises
    `NotCalibratedError`), and the error is raised.

    Returns:
        `dict[str, list[int]]`: per layer, the buckets that saw no calibration data and took their nearest
        calibrated neighbour's range (empty when calibration covered every bucket).
    """
    filled = {}
    try:
        for hook in list(_PRE_CONVERT_HOOKS):  # e.g. merging observer statistics across processes
            hook(model)
        for name, m in iter_quant_layers(model):
            f = m.act_quantizer.finish_observing()
            if f:
                filled[name] = f
        for name, q in iter_attention_quantizers(model):
            f = q.finish_observing()
            if f:
                filled[name] = f
    except BaseException:
        _abort_calibration(model)
        raise
    if filled:
        some = next(iter(filled.values()))
        logger.warning(
            "calibration did not reach bucket(s) %s; they use the nearest calibrated bucket's range", some
        )
    from tdq.boundary import promote_boundary_layers
    from tdq.outliers import after_calibration

    rec = get_quantization(model).first_call
    if "handle" in rec:
        rec.pop("handle").remove()
    promote_boundary_layers(model, rec.pop("call", None))
    after_calibration(model)
    return filled


@contextlib.contextmanager
def calibration(model: nn.Module, seed: int = 0) -> Iterator[nn.Module]:
    """
    Context manager for static calibration: `prepare` on entry, `convert` on a clean exit.

    Run the real sampler inside it; every denoiser call feeds the observers of its own timestep bucket. If the
    body or `convert` raises, no quantizer is left observing (see `convert`) and the error propagates.
    """
    prepare(model, seed=seed)
    try:
        yield model
    except BaseException:
        _abort_calibration(model)
        raise
    convert(model)


def calibrate(model: nn.Module, run: Callable[[], object], seed: int = 0) -> dict[str, list[int]]:
    """
    Prepare, call `run()` (which runs the sampler), convert.

    Returns:
        The buckets filled from neighbours, as `convert` returns them.
    """
    prepare(model, seed=seed)
    try:
        run()
    except BaseException:
        _abort_calibration(model)
        raise
    return convert(model)


def static_config(base: TDQConfig | None = None) -> TDQConfig:
    r"""
    A single-bucket config for a module without a timestep, taking the weight and activation specs of `base`.

    Layer selection (`include`/`exclude`/`overrides`) is not copied: its names refer to the denoiser. The outlier
    handling and weight rounding settings are copied.

    Args:
        base (`TDQConfig`, *optional*): config whose weight/activation specs are reused; defaults to `TDQConfig()`.
    """
    base = base or TDQConfig()
    return TDQConfig(
        weight=base.weight,
        activation=base.activation,
        grid=TimestepGrid(units="t", t_min=0.0, t_max=1.0, num_buckets=1),
        check_finite=base.check_finite,
        outliers=copy.deepcopy(base.outliers),
        weight_rounding=copy.deepcopy(base.weight_rounding),
    )


def quantize_static_(module: nn.Module, config: TDQConfig | None = None) -> nn.Module:
    r"""
    Quantize a module that has no timestep (text encoder, VAE decoder) in place with one activation bucket.

    Calibrate it with `tdq.calibration(module)` like a denoiser: every call feeds its single bucket.

    Args:
        module (`nn.Module`): the module.
        config (`TDQConfig`, *optional*):
            Used as is when its grid has one bucket; otherwise its weight/activation specs are taken into
            `static_config`. Defaults to `static_config()`.

    Returns:
        The same `module`.
    """
    if config is None or config.grid.num_buckets != 1:
        config = static_config(config)
    return quantize_(module, config, adapter=ConstantTimestepAdapter())
