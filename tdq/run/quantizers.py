"""Quantizer plug-ins of `tdq run` and [`tdq.evaluate`]: any function `quantizer(model, ctx) -> model`.

A quantizer receives the float denoiser and a [`QuantizerContext`] (the run config, the calibration sampler, one
recorded denoiser call) and returns the quantized denoiser (the same object changed in place, or a new one). The
run then samples, measures and reports it exactly as it does tdq's own quantization: FP reference and noise floor
from the reference cache, paired metrics, FID/KID to FP, drift and the report.

Registered quantizers (config group `quantizer=<name>` of `tdq run`, or `tdq.evaluate(quantizer="<name>")`):

- `tdq` (default): timestep-aware tdq with the `quant` config, the sensitivity profile and the precision
  `schedule` (the stages `profile`, `plan`, `quantize`, `calibrate` of `tdq.run.stages`);
- `static`: tdq with one activation scale for all timesteps (1 bucket, per-tensor), bits from `quant`;
- `dynamic-per-token`: tdq weights, activations quantized per token / pixel with ranges computed on every call;
- `quanto-w8a8`, `quanto-w4a8`, `quanto-w4`, `torchao-int8-dyn`, `torchao-int8-wo`, `torchao-int4-wo`,
  `torchao-intx-int4-wo`: the optional `[baselines]` extra (`tdq.run.baselines`).

Add one with [`register_quantizer`]; a quantizer outside the registry is named `"package.module:function"`.

Every run records which Conv/Linear layers a quantizer quantized and their share of the denoiser's Conv/Linear
multiply-accumulates (MACs counted with forward hooks on one real denoiser call of the FP model): torchao's
configs touch only `nn.Linear`, so its baselines quantize a fraction of a convolutional UNet.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdq.errors import ConfigError

if TYPE_CHECKING:
    from tdq.config import TDQConfig
    from tdq.run.config import RunConfig
    from tdq.run.context import RunContext

logger = logging.getLogger(__name__)

__all__ = [
    "QuantizerContext",
    "QuantizerEntry",
    "QuantizerUnavailableError",
    "available_quantizers",
    "effective_bits",
    "get_quantizer",
    "layer_macs",
    "quantized_layers",
    "register_quantizer",
]

QuantizerFn = Callable[[nn.Module, "QuantizerContext"], nn.Module]

# Layer types whose MACs are counted (the layers tdq quantizes; attention score matmuls are not modules).
MAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QuantizerUnavailableError(RuntimeError):
    """A registered quantizer cannot run here (a missing optional package, or no kernel for this device)."""


@dataclass(frozen=True)
class QuantizerEntry:
    r"""
    One registered quantizer.

    Args:
        name (`str`): registry name (`quantizer=<name>`).
        fn (`Callable[[nn.Module, QuantizerContext], nn.Module]`): the quantizer.
        description (`str`): one line for listings and reports.
        requires (`tuple[str, ...]`): importable modules it needs (checked before the run loads anything).
        install (`str`): how to get them (shown when they are missing).
        quantizes_activations (`bool`): whether layers whose weights it replaces by tensor subclasses also get
            quantized inputs (torchao's dynamic configs); used for the report's activation MAC share.
    """

    name: str
    fn: QuantizerFn
    description: str = ""
    requires: tuple[str, ...] = ()
    install: str = ""
    quantizes_activations: bool = False

    def check_available(self) -> None:
        """Raise `QuantizerUnavailableError` naming the missing package(s) and how to install them."""
        missing = [m for m in self.requires if importlib.util.find_spec(m.split(".")[0]) is None]
        if missing:
            raise QuantizerUnavailableError(
                f"quantizer {self.name!r} needs {missing} (not installed); {self.install or 'install it'}"
            )


_REGISTRY: dict[str, QuantizerEntry] = {}
_BUILTINS_LOADED = False


def register_quantizer(
    name: str,
    *,
    description: str | None = None,
    requires: tuple[str, ...] = (),
    install: str = "",
    quantizes_activations: bool = False,
    replace: bool = False,
) -> Callable[[QuantizerFn], QuantizerFn]:
    r"""
    Decorator: register `fn(model, ctx) -> model` as quantizer `name` of `tdq run quantizer=<name>` and
    `tdq.evaluate(quantizer=<name>)`.

    Args:
        name (`str`): registry name (letters, digits, `-`, `_`).
        description (`str`, *optional*): one line; defaults to the first line of the function's docstring.
        requires (`tuple[str, ...]`, *optional*): modules it imports (an optional extra), checked before a run.
        install (`str`, *optional*): how to install them.
        quantizes_activations (`bool`, *optional*, defaults to `False`): see [`QuantizerEntry`].
        replace (`bool`, *optional*, defaults to `False`): allow replacing an existing registration.

    Example:

    ```py
    >>> import tdq
    >>> @tdq.run.quantizers.register_quantizer("w8-only")
    ... def w8_only(model, ctx):
    ...     tdq.quantize_(model, tdq.TDQConfig(activation={"bits": 16}), num_train_timesteps=ctx.num_train_timesteps)
    ...     ctx.calibrate_tdq(model)
    ...     return model
    ```
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(
            f"quantizer name {name!r} must be a non-empty string of letters, digits, '-' and '_'"
        )

    def wrap(fn: QuantizerFn) -> QuantizerFn:
        if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
            raise ValueError(f"quantizer {name!r} is already registered; pass replace=True to replace it")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = QuantizerEntry(
            name=name,
            fn=fn,
            description=description if description is not None else (doc[0] if doc else ""),
            requires=tuple(requires),
            install=install,
            quantizes_activations=quantizes_activations,
        )
        return fn

    return wrap


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import tdq.run.baselines  # noqa: F401  (registers the quanto / torchao plug-ins; imports neither)


def available_quantizers() -> dict[str, str]:
    r"""
    The registered quantizers.

    Returns:
        `dict[str, str]`: name → one-line description, in registration order.
    """
    _load_builtins()
    return {name: e.description for name, e in _REGISTRY.items()}


def get_quantizer(name: str | Callable) -> QuantizerEntry:
    r"""
    The quantizer registered as `name`, a `"package.module:function"` path, or a callable wrapped as one.

    Args:
        name (`str` or `Callable`): registry name, import path, or `fn(model, ctx) -> model`.

    Returns:
        `QuantizerEntry`

    Raises:
        `ConfigError`: unknown name (the message lists the registered ones) or an import path that does not
            resolve to a callable.
    """
    _load_builtins()
    if callable(name):
        label = getattr(name, "__qualname__", None) or type(name).__name__
        return QuantizerEntry(name=f"custom:{label}", fn=name, description=(name.__doc__ or "").strip()[:200])
    if not isinstance(name, str):
        raise ConfigError(f"quantizer={name!r} must be a registered name or a function (model, ctx) -> model")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"quantizer={name!r}: cannot import {attr!r} from {mod!r} ({e})") from e
        if not callable(fn):
            raise ConfigError(f"quantizer={name!r} is not callable")
        return QuantizerEntry(name=name, fn=fn, description=(fn.__doc__ or "").strip().split("\n")[0])
    raise ConfigError(
        f"quantizer={name!r} is unknown; available: {sorted(_REGISTRY)} (or 'package.module:function')"
    )


# ----------------------------------------------------------------------------------------------------
# the context a quantizer gets


class _FirstCall(Exception):
    pass


@dataclass
class QuantizerContext:
    r"""
    What a quantizer function gets besides the model: the run's config, its calibration sampler and one denoiser
    call.

    Args:
        run (`RunContext`): the run (everything the stages computed so far; read it, do not replace its fields).
        entry (`QuantizerEntry`): the quantizer being applied.
        options (`dict`): `quantizer.options` of the run config.
        notes (`dict`): anything the quantizer wants in the report's `quantizer` section (JSON-safe values).
    """

    run: RunContext
    entry: QuantizerEntry
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> RunConfig:
        """`RunConfig`: the run config (`quant`, `calibration`, `eval`, ...)."""
        return self.run.cfg

    @property
    def quant(self) -> TDQConfig:
        """`TDQConfig`: the run's `quant` config (bits and specs that tdq-based quantizers start from)."""
        return self.run.cfg.quant

    @property
    def device(self) -> torch.device:
        """`torch.device`: where the model runs."""
        return self.run.device

    @property
    def num_train_timesteps(self) -> int:
        """`int`: length of the model's training noise schedule."""
        return self.run.model.num_train_timesteps

    @property
    def calibration_seeds(self) -> list[int]:
        """`list[int]`: the calibration seeds (disjoint from the evaluation seeds)."""
        return self.run.calib_seeds

    @property
    def example_call(self) -> dict[str, Any]:
        """`dict`: `{"args": ..., "kwargs": ...}` of one real FP denoiser call (first step of the calibration
        sampler, first calibration seed), e.g. for tracing or exporting the model."""
        return self.run.fp_call

    def take_options(self, **defaults: Any) -> dict[str, Any]:
        r"""
        The quantizer's options (`quantizer.options`) over `defaults`; an option not in `defaults` is an error.

        Args:
            **defaults: every option the quantizer understands, with its default.

        Returns:
            `dict`: `defaults` updated by the run's options (also recorded in the report).
        """
        unknown = sorted(set(self.options) - set(defaults))
        if unknown:
            raise ConfigError(
                f"quantizer.options {unknown} are not understood by quantizer {self.entry.name!r}; "
                f"it takes {sorted(defaults) or 'no options'}"
            )
        out = {**defaults, **self.options}
        self.notes["options"] = dict(out)
        return out

    def calibrate(self, model: nn.Module | None = None, desc: str = "calibration") -> None:
        r"""
        Run the real calibration sampler (`calibration.*`: scheduler, steps, seeds, batch size) through `model`.

        Wrap it in your library's calibration context (e.g. `with optimum.quanto.Calibration(): ctx.calibrate(m)`).

        Args:
            model (`nn.Module`, *optional*): the denoiser to run; defaults to the run's current denoiser.
            desc (`str`, *optional*): progress-bar label.
        """
        m = self.run.model
        old = m.denoiser
        if model is not None:
            m.denoiser = model
        try:
            self.run.sampler(self.run.cfg.calibration, trajectory=False)(self.calibration_seeds, desc=desc)
        finally:
            m.denoiser = old

    def calibrate_tdq(self, model: nn.Module) -> dict[str, Any]:
        r"""
        Calibrate a model quantized by `tdq.quantize_` as `tdq run` does: weight rounding by the config's
        `weight_rounding`, then the activation ranges of every timestep bucket, through [`calibrate`].

        Args:
            model (`nn.Module`): quantized by `tdq.quantize_`, not yet calibrated.

        Returns:
            `dict`: the weight-rounding report (`tdq.rounding.calibrate_with_rounding`).
        """
        from tdq.outliers import reset_runtime_counters
        from tdq.rounding import calibrate_with_rounding

        report = calibrate_with_rounding(model, lambda: self.calibrate(model))
        self.run.dist.sync_buffers(model)
        reset_runtime_counters(model)  # count run-time range violations of the evaluation only
        return report


def record_fp_call(ctx: RunContext) -> dict[str, Any]:
    r"""
    The positional and keyword arguments of the first denoiser call of the calibration sampler (one seed), without
    running the rest of the sampler.

    Args:
        ctx (`RunContext`): a loaded run.

    Returns:
        `dict`: `{"args": tuple, "kwargs": dict}` (detached clones).
    """
    rec: dict[str, Any] = {}

    def pre(module, args, kwargs):
        rec["args"] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        rec["kwargs"] = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        raise _FirstCall

    handle = ctx.model.denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        ctx.sampler(ctx.cfg.calibration, trajectory=False)(ctx.calib_seeds[:1], desc="one FP call")
    except _FirstCall:
        pass
    finally:
        handle.remove()
    if not rec:
        raise RuntimeError("the calibration sampler never called the denoiser")
    return rec


# ----------------------------------------------------------------------------------------------------
# MACs and which layers are quantized


@torch.no_grad()
def layer_macs(model: nn.Module, call: dict[str, Any]) -> dict[str, int]:
    r"""
    Multiply-accumulates of every Conv/Linear layer of `model` in one call, counted with forward hooks.

    Args:
        model (`nn.Module`): the (float) model.
        call (`dict`): `{"args": ..., "kwargs": ...}` of one call (e.g. from [`record_fp_call`]).

    Returns:
        `dict[str, int]`: layer name → MACs of that call (a layer called twice counts twice).
    """
    macs: dict[str, int] = {}
    handles = []

    def hook(name):
        def run(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(module, nn.Linear):
                n = out.numel() * module.in_features
            else:  # conv: every output element sums in_channels / groups × kernel elements
                k = 1
                for s in module.kernel_size:
                    k *= int(s)
                n = out.numel() * (module.in_channels // module.groups) * k
            macs[name] = macs.get(name, 0) + int(n)

        return run

    for name, m in model.named_modules():
        if isinstance(m, MAC_LAYERS):
            macs[name] = 0
            handles.append(m.register_forward_hook(hook(name)))
    try:
        model(*call["args"], **call["kwargs"])
    finally:
        for h in handles:
            h.remove()
    return macs


def _tdq_kinds(m) -> tuple[bool, bool]:
    wq, aq = m.weight_quantizer, m.act_quantizer
    w = bool(wq.spec.enabled) and int(wq.bits.max()) < 16
    a = bool(aq.spec.enabled) and getattr(aq, "mode", "on") != "off" and int(aq.bits.min()) < 16
    return w, a


def quantized_layers(
    model: nn.Module, names: list[str], activations: bool = False
) -> dict[str, dict[str, Any]]:
    r"""
    Which of the layers `names` (of the float model) are quantized in `model`, and how.

    Recognised: tdq's quantized modules (weight and input quantizer state), optimum-quanto's `QModuleMixin`
    modules (`weight_qtype` / `activation_qtype`), weights that are tensor subclasses (torchao; inputs quantized when
    `activations`), and any other replaced module class (counted as weight-quantized).

    Args:
        model (`nn.Module`): the quantized denoiser.
        names (`list[str]`): the float model's Conv/Linear layer names.
        activations (`bool`, *optional*, defaults to `False`): tensor-subclass weights also quantize inputs.

    Returns:
        `dict[str, dict]`: name → `{"how": str, "weights": bool, "activations": bool}` for every quantized layer.
    """
    from tdq.quant.modules import QuantMixin

    out: dict[str, dict[str, Any]] = {}
    modules = dict(model.named_modules())
    for name in names:
        m = modules.get(name)
        if m is None:
            continue
        if isinstance(m, QuantMixin):
            w, a = _tdq_kinds(m)
            how = f"tdq W{int(m.weight_quantizer.bits.max())}" + (
                f"A{int(m.act_quantizer.bits.max())}" if a else ""
            )
        elif hasattr(m, "weight_qtype") and hasattr(m, "activation_qtype"):  # optimum-quanto QModuleMixin
            w, a = m.weight_qtype is not None, m.activation_qtype is not None
            how = f"quanto {type(m).__name__} w={m.weight_qtype} a={m.activation_qtype}"
        elif type(getattr(m, "weight", None)) not in (torch.Tensor, nn.Parameter, type(None)):
            w, a = True, activations
            how = f"{type(m.weight).__name__} weight"
        elif type(m) not in MAC_LAYERS:
            w, a = True, False
            how = f"replaced by {type(m).__name__}"
        else:
            continue
        if w or a:
            out[name] = {"how": how, "weights": w, "activations": a}
    return out


def mac_report(macs: dict[str, int], quantized: dict[str, dict[str, Any]]) -> dict[str, Any]:
    r"""
    The report's MAC accounting: shares of the Conv/Linear MACs in quantized layers.

    Args:
        macs (`dict[str, int]`): from [`layer_macs`] (float model).
        quantized (`dict[str, dict]`): from [`quantized_layers`].

    Returns:
        `dict`: `macs_total`, `mac_share_quantized` (weights or inputs), `mac_share_weights`,
        `mac_share_activations`, `layers_total`, `layers_quantized`, `layers_by_type` (quantized / total per type),
        `layers_not_quantized` (names).
    """
    total = sum(macs.values())

    def share(pred) -> float:
        return sum(macs[n] for n, q in quantized.items() if n in macs and pred(q)) / total if total else 0.0

    hows: dict[str, int] = {}
    for q in quantized.values():
        hows[q["how"]] = hows.get(q["how"], 0) + 1
    return {
        "macs_counted": "Conv/Linear layers of the denoiser, one FP call of the calibration sampler (forward hooks)",
        "macs_total": int(total),
        "mac_share_quantized": share(lambda q: True),
        "mac_share_weights": share(lambda q: q["weights"]),
        "mac_share_activations": share(lambda q: q["activations"]),
        "layers_total": len(macs),
        "layers_quantized": len(quantized),
        "quantized_as": hows,
        "layers_not_quantized": [n for n in macs if n not in quantized],
    }


def effective_bits(model: nn.Module, macs: dict[str, int], bucket_weights: Any = None) -> dict[str, Any]:
    r"""
    The report's `effective_bits`: MAC-weighted average activation and weight bits of every Conv/Linear layer of a
    model quantized by tdq, as it will run (boundary layers raised, outlier fallbacks, schedules and exclusions
    included; see [`~tdq.mixed_precision.costs.effective_average_bits`]).

    Args:
        model (`nn.Module`): the quantized denoiser (after calibration).
        macs (`dict[str, int]`): from [`layer_macs`] (float model).
        bucket_weights (`Sequence[float]`, *optional*): the evaluation sampler's step occupancy of the buckets.

    Returns:
        `dict`: `act`, `weight`, float MAC shares, `float_bits` and `layers`.
    """
    from tdq.mixed_precision.costs import effective_average_bits
    from tdq.quant.modules import QuantMixin

    modules = dict(model.named_modules())
    act: dict[str, Any] = {}
    weight: dict[str, Any] = {}
    float_bits = 32
    for name in macs:
        m = modules.get(name)
        if m is None:
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            float_bits = torch.finfo(w.dtype).bits
        if not isinstance(m, QuantMixin):
            continue
        wq, aq = m.weight_quantizer, m.act_quantizer
        if wq.spec.enabled and int(wq.bits.max()) < 16:
            weight[name] = float(wq.bits.float().mean())
        if aq.spec.enabled and getattr(aq, "mode", "on") != "off":
            act[name] = aq.bits.reshape(-1).tolist()
    out = effective_average_bits(macs, act, weight, bucket_weights=bucket_weights, float_bits=float_bits)
    out["counted"] = (
        "every Conv/Linear layer, MAC-weighted (one FP call); buckets by the evaluation sampler's step occupancy; "
        "activation cells >= 16 bits count 16, unquantized layers count the float dtype's bits"
    )
    return out


# ----------------------------------------------------------------------------------------------------
# the run's side: which quantizer, applying it, its report section


def resolve_quantizer(cfg: RunConfig, fn: Callable | None = None) -> QuantizerEntry:
    r"""
    The quantizer of a run (checked before anything is loaded): `fn` if given, else `cfg.quantizer.name`.

    Raises:
        `ConfigError`: unknown name, or a real `backend` with a quantizer other than `tdq`.
        `QuantizerUnavailableError`: its optional packages are missing.
    """
    entry = get_quantizer(fn if fn is not None else cfg.quantizer.name)
    entry.check_available()
    if entry.name == "tdq" and cfg.quantizer.options:
        raise ConfigError(
            f"quantizer.options {sorted(cfg.quantizer.options)}: quantizer 'tdq' takes no options"
        )
    check_schedule_unused(cfg, entry)
    if entry.name != "tdq" and cfg.backend != "simulate":
        raise ConfigError(
            f"backend={cfg.backend!r} lowers tdq's own quantization only; quantizer {entry.name!r} runs as it "
            "returns the model (use backend=simulate)"
        )
    return entry


def check_schedule_unused(cfg: RunConfig, entry: QuantizerEntry) -> None:
    r"""
    Refuse `schedule.*` settings that the run's quantizer would silently ignore: only `quantizer=tdq` profiles and
    plans mixed precision. Any schedule field changed from its default (`planner` may also be `none`) is an error
    for another quantizer.

    Raises:
        `ConfigError`: naming the first such field and the quantizer.
    """
    from tdq.run.config import ScheduleConfig

    if entry.name == "tdq":
        return
    default = ScheduleConfig()
    for f in dataclasses.fields(ScheduleConfig):
        value, want = getattr(cfg.schedule, f.name), getattr(default, f.name)
        if f.name == "planner" and value in ("none", want):
            continue
        if value != want:
            raise ConfigError(
                f"schedule.{f.name}={value!r}: quantizer {entry.name!r} does not use the precision schedule (only "
                "quantizer=tdq profiles and plans mixed precision); drop the schedule settings or use schedule=none"
            )


def uses_tdq_stages(ctx: RunContext) -> bool:
    """Whether the run quantizes with tdq's own stages (profile, plan, quantize, calibrate): `quantizer=tdq`."""
    return ctx.quantizer is None and ctx.cfg.quantizer.name == "tdq"


def measure_fp_macs(ctx: RunContext) -> None:
    """Record one FP denoiser call (`ctx.fp_call`) and the MACs of every Conv/Linear layer in it (`ctx.layer_macs`)."""
    with ctx.timer("fp_macs"):
        ctx.fp_call = record_fp_call(ctx)
        ctx.layer_macs = layer_macs(ctx.model.denoiser, ctx.fp_call)


def apply_quantizer(ctx: RunContext) -> None:
    r"""
    Stage body for a quantizer other than `tdq`'s own stages: call it on the denoiser (it quantizes and calibrates
    through [`QuantizerContext.calibrate`]), install what it returns and add the report's `quantizer` section.
    """
    entry = resolve_quantizer(ctx.cfg, ctx.quantizer)
    qctx = QuantizerContext(run=ctx, entry=entry, options=dict(ctx.cfg.quantizer.options))
    with ctx.timer("quantize"):
        out = entry.fn(ctx.model.denoiser, qctx)
    if not isinstance(out, nn.Module):
        raise TypeError(
            f"quantizer {entry.name!r} returned {type(out).__name__}; it must return the quantized nn.Module"
        )
    ctx.model.denoiser = out.eval()
    ctx.sections["quantizer"] = quantizer_section(ctx, entry, qctx.notes)


def quantizer_section(ctx: RunContext, entry: QuantizerEntry, notes: dict[str, Any] | None = None) -> dict:
    r"""
    The report's `quantizer` section: name, description, notes of the quantizer and the MAC accounting of
    [`mac_report`].
    """
    names = list(ctx.layer_macs or {})
    q = quantized_layers(ctx.model.denoiser, names, activations=entry.quantizes_activations)
    out: dict[str, Any] = {"name": entry.name, "description": entry.description}
    out.update(notes or {})
    if ctx.cfg.quantizer.options and "options" not in out:
        out["options"] = dict(ctx.cfg.quantizer.options)
    out.update(mac_report(ctx.layer_macs or {}, q))
    return out


def record_nonfinite(ctx: RunContext) -> int:
    r"""
    Count the quantized samples with NaN/inf (images or trajectory) into the report's `quantizer` section
    (`nonfinite_samples`, with their seeds) and log a warning; their metrics stay NaN.

    Returns:
        `int`: the count.
    """
    q = ctx.q
    n = q.images.shape[0]
    bad = ~torch.isfinite(q.images.reshape(n, -1)).all(1)
    for x in q.trajectory or []:
        bad |= ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    count = int(bad.sum())
    sec = ctx.sections.setdefault("quantizer", {})
    sec["nonfinite_samples"] = count
    if count:
        sec["nonfinite_seeds"] = [int(s) for s, b in zip(q.seeds, bad.tolist(), strict=True) if b]
        logger.warning(
            "quantizer %r: %d of %d quantized samples contain NaN/inf; their metrics are NaN",
            sec.get("name"),
            count,
            n,
        )
    return count


def quantizer_markdown(report: dict[str, Any]) -> list[str]:
    """Markdown lines of the `quantizer` section (and any non-finite output warning)."""
    sec = report.get("quantizer")
    if not sec:
        return []
    lines = [
        "## Quantizer",
        "",
        f"`{sec['name']}`" + (f": {sec['description']}" if sec.get("description") else ""),
        "",
        f"Quantized Conv/Linear layers: {sec['layers_quantized']} of {sec['layers_total']}; share of their MACs "
        f"quantized: {100 * sec['mac_share_quantized']:.1f} % (weights {100 * sec['mac_share_weights']:.1f} %, "
        f"inputs {100 * sec['mac_share_activations']:.1f} %).",
    ]
    bad = sec.get("nonfinite_samples")
    if bad:
        lines += [
            "",
            f"**Warning: {bad} of {report.get('num_samples')} quantized samples contain NaN/inf**; metrics over "
            "them are NaN (not hidden).",
        ]
    return lines + [""]


# ----------------------------------------------------------------------------------------------------
# tdq-based quantizers


def _tdq_with(ctx: QuantizerContext, model: nn.Module, config: TDQConfig) -> nn.Module:
    import tdq

    tdq.quantize_(model, config, num_train_timesteps=ctx.num_train_timesteps)
    ctx.notes["weight_rounding"] = {
        k: v for k, v in ctx.calibrate_tdq(model).items() if k not in ("filled_buckets", "_fp_weights")
    }
    ctx.notes["tdq_config"] = {
        "weight": f"W{config.weight.bits} {config.weight.granularity}",
        "activation": f"A{config.activation.bits} {config.activation.granularity}",
        "num_buckets": int(config.grid.num_buckets),
    }
    return model


@register_quantizer("tdq")
def tdq_quantizer(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """tdq, timestep-aware: the `quant` config, one activation scale per timestep bucket."""
    # `tdq run quantizer=tdq` runs the stages profile/plan/quantize/calibrate instead (with the schedule); this
    # function is the same quantization for callers that hold a quantizer function (`tdq.evaluate`).
    ctx.take_options()
    return _tdq_with(ctx, model, ctx.quant)


@register_quantizer("static")
def static_quantizer(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """Static PTQ: the `quant` bits with one per-tensor activation scale for all timesteps (1 bucket)."""
    import copy

    ctx.take_options()
    cfg = copy.deepcopy(ctx.quant)
    cfg.grid.num_buckets = 1
    cfg.activation.granularity = "per_tensor"
    return _tdq_with(ctx, model, cfg)


@register_quantizer("dynamic-per-token")
def dynamic_per_token_quantizer(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """Dynamic per-token activations (ranges of every token / pixel computed on each call), `quant` weights."""
    import copy

    ctx.take_options()
    cfg = copy.deepcopy(ctx.quant)
    cfg.activation.granularity = "per_token"
    return _tdq_with(ctx, model, cfg)
