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
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from tdq.adapters import TimestepAdapter, get_adapter
from tdq.config import TDQConfig, TimestepGrid
from tdq.hooks import TimestepHook
from tdq.quant.modules import QUANT_MODULES, QuantMixin
from tdq.quant.quantizers import TimestepContext

logger = logging.getLogger(__name__)

STATE_ATTR = "_tdq_state"


@dataclass
class TDQState:
    r"""
    What `quantize_` attaches to a model (as `model._tdq_state`).

    Args:
        config (`TDQConfig`): the config used.
        grid (`TimestepGrid`): the resolved grid.
        adapter (`TimestepAdapter`): the timestep adapter.
        context (`TimestepContext`): the shared context.
        hook (`TimestepHook` or `None`): the installed hook, if any.
    """

    config: TDQConfig
    grid: TimestepGrid
    adapter: TimestepAdapter
    context: TimestepContext
    hook: TimestepHook | None = None


def select_layers(model: nn.Module, config: TDQConfig | None = None) -> list[str]:
    """
    Names of the modules `quantize_` would swap: registered float types selected by the config.

    Args:
        model (`nn.Module`): the (float) model.
        config (`TDQConfig`, *optional*): layer selection; defaults to `TDQConfig()`.
    """
    config = config or TDQConfig()
    return [
        name
        for name, m in model.named_modules()
        if name and type(m) in QUANT_MODULES and config.selects(name) and not isinstance(m, QuantMixin)
    ]


def quantize_(
    model: nn.Module,
    config: TDQConfig | None = None,
    *,
    adapter: TimestepAdapter | None = None,
    num_train_timesteps: int = 1000,
) -> nn.Module:
    """
    Quantize a denoiser in place: swap selected layers for quantized ones and install the timestep hook.

    Activation quantizers start uncalibrated: run the sampler inside `calibration(model)` before quantized use.

    Args:
        model (`nn.Module`): the denoiser (UNet, DiT, ... or any module whose `forward` takes a timestep).
        config (`TDQConfig`, *optional*): defaults to `TDQConfig()` (W8A8, 10 buckets).
        adapter (`TimestepAdapter`, *optional*): overrides the adapter found by `get_adapter`.
        num_train_timesteps (`int`, *optional*, defaults to `1000`): length of the training noise schedule.

    Returns:
        The same `model`, for chaining.
    """
    config = config or TDQConfig()
    config.validate()
    if hasattr(model, STATE_ATTR):
        raise RuntimeError(f"{type(model).__name__} is already quantized by tdq")
    adapter = adapter or get_adapter(model, num_train_timesteps=num_train_timesteps)
    grid = config.grid.resolve(*adapter.default_grid())
    context = TimestepContext(grid.num_buckets)
    names = select_layers(model, config)
    if not names:
        raise ValueError(
            f"no layer of {type(model).__name__} matches include={config.include} exclude={config.exclude}"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        float_mod = getattr(parent, child)
        wspec, aspec = config.layer_specs(name)
        qmod = QUANT_MODULES[type(float_mod)].from_float(float_mod, name, wspec, aspec, context)
        setattr(parent, child, qmod)
    state = TDQState(config=config, grid=grid, adapter=adapter, context=context)
    object.__setattr__(model, STATE_ATTR, state)
    install_hook(model)
    return model


def get_state(model: nn.Module) -> TDQState:
    """The `TDQState` of a model quantized by `quantize_`; raises `ValueError` otherwise."""
    state = getattr(model, STATE_ATTR, None)
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
    state = get_state(model)
    if state.hook is None:
        state.hook = TimestepHook(model, state.adapter, state.grid, state.context)
    return state.hook


def remove_hook(model: nn.Module) -> None:
    """Remove the timestep hook: the model computes exactly as the float model did (weights are kept in float)."""
    state = get_state(model)
    if state.hook is not None:
        state.hook.remove()
        state.hook = None


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run the quantized model in floating point (the FP reference) and restore afterwards."""
    state = get_state(model)
    had_hook = state.hook is not None
    remove_hook(model)
    try:
        yield model
    finally:
        if had_hook:
            install_hook(model)


def prepare(model: nn.Module, seed: int = 0) -> None:
    """Put every activation quantizer in observe mode with fresh per-bucket observers."""
    install_hook(model)
    for i, (_, m) in enumerate(iter_quant_layers(model)):
        m.act_quantizer.start_observing(seed=seed + 1000 * i)


def convert(model: nn.Module) -> dict[str, list[int]]:
    """
    Freeze the observed per-bucket ranges into scales and switch to quantized mode.

    Returns:
        `dict[str, list[int]]`: per layer, the buckets that saw no calibration data and took their nearest
        calibrated neighbour's range (empty when calibration covered every bucket).
    """
    filled = {}
    for name, m in iter_quant_layers(model):
        f = m.act_quantizer.finish_observing()
        if f:
            filled[name] = f
    if filled:
        some = next(iter(filled.values()))
        logger.warning(
            "calibration did not reach bucket(s) %s; they use the nearest calibrated bucket's range", some
        )
    return filled


@contextlib.contextmanager
def calibration(model: nn.Module, seed: int = 0) -> Iterator[nn.Module]:
    """
    Context manager for static calibration: `prepare` on entry, `convert` on a clean exit.

    Run the real sampler inside it; every denoiser call feeds the observers of its own timestep bucket.
    """
    prepare(model, seed=seed)
    try:
        yield model
    except BaseException:
        for _, m in iter_quant_layers(model):
            m.act_quantizer.observers = None
            m.act_quantizer.mode = "quant"
        raise
    convert(model)


def calibrate(model: nn.Module, run: Callable[[], object], seed: int = 0) -> dict[str, list[int]]:
    """
    Prepare, call `run()` (which runs the sampler), convert.

    Returns:
        The buckets filled from neighbours, as `convert` returns them.
    """
    prepare(model, seed=seed)
    run()
    return convert(model)
