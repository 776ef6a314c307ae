"""Configuration objects of tdq: quantization specs, the timestep grid and `TDQConfig`.

All configs are plain dataclasses with a `to_dict`/`from_dict` round trip, so they can be saved as JSON beside a
checkpoint and used as Hydra structured configs (see `register_configs`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from tdq.errors import ConfigError
from tdq.grid import TimestepGrid, check_bool, check_choice, is_int, is_real
from tdq.outlier_config import OutlierConfig
from tdq.qat_config import QATConfig

CONFIG_VERSION = 1

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
ROUNDINGS = ("nearest", "stochastic")
OBSERVERS = ("minmax", "percentile", "mse")
LEVELS = ("uniform", "log2", "kmeans")

WEIGHT_ROUNDING_METHODS = ("nearest", "mse", "gptq", "adaround", "brecq")
ADAROUND_INITS = ("nearest", "gptq")
WEIGHT_CLIPS = ("observer", "weight_mse", "output_mse")
CORRECTIONS = ("bias", "ptqd")

WEIGHT_BITS = tuple(range(2, 9))
ACT_BITS = tuple(range(2, 17))

# Largest per-group size accepted (a group is one row of a weight's scale table).
MAX_GROUP_SIZE = 1 << 20


@dataclass
class QuantSpec:
    r"""
    How one tensor kind (weights or activations) is quantized.

    Args:
        bits (`int`, *optional*, defaults to `8`):
            Bit-width of the integer codes. Weights take 2–8 bits, activations 2–16 bits.
        granularity (`str`, *optional*, defaults to `"per_tensor"`):
            `"per_tensor"`, `"per_channel"` (one scale per output channel; weights only), `"per_group"`
            (groups of `group_size` input elements per output channel; weights only) or `"per_token"` (dynamic
            per-token / per-pixel ranges computed on every call; activations only, a baseline).
        group_size (`int`, *optional*, defaults to `64`):
            Number of input elements sharing one scale when `granularity="per_group"`.
        symmetric (`bool`, *optional*, defaults to `True`):
            Symmetric (zero-point 0, signed narrow range) or affine (unsigned codes with a zero-point).
        rounding (`str`, *optional*, defaults to `"nearest"`):
            `"nearest"` or `"stochastic"` rounding (stochastic only while training; evaluation rounds to nearest).
        observer (`str`, *optional*, defaults to `"minmax"`):
            Range estimator: `"minmax"`, `"percentile"` or `"mse"` (MSE-optimal clipping).
        percentile (`float`, *optional*, defaults to `99.99`):
            Percentile used by the `"percentile"` observer.
        enabled (`bool`, *optional*, defaults to `True`):
            Whether this tensor kind is quantized at all.
        levels (`str`, *optional*, defaults to `"uniform"`):
            Weights only: `"uniform"` (integer grid), `"log2"` (sign + exponent, `±scale * 2^-e` and 0, per row) or
            `"kmeans"` (Lloyd-Max levels fitted to each row's values), `2^bits` levels per row of the granularity
            (`per_channel`: per output channel; `per_tensor`: per layer). Simulated, and run by the weight-only
            lookup-table backend; the int8 kernels need uniform levels (see `tdq.quant.codebook`).
    """

    bits: int = 8
    granularity: str = "per_tensor"
    group_size: int = 64
    symmetric: bool = True
    rounding: str = "nearest"
    observer: str = "minmax"
    percentile: float = 99.99
    enabled: bool = True
    levels: str = "uniform"

    def validate(self, field_name: str, allowed_bits: tuple[int, ...]) -> None:
        """Raise `ConfigError` naming `field_name` if any value is unsupported (wrong type or out of range)."""
        if not is_int(self.bits) or self.bits not in allowed_bits:
            raise ConfigError(
                f"{field_name}.bits={self.bits!r} is not supported; choose an integer in "
                f"[{allowed_bits[0]}, {allowed_bits[-1]}]"
            )
        check_choice(self.granularity, GRANULARITIES, f"{field_name}.granularity")
        if not is_int(self.group_size) or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise ConfigError(
                f"{field_name}.group_size={self.group_size!r} must be an integer in [1, {MAX_GROUP_SIZE}]"
            )
        check_bool(self.symmetric, f"{field_name}.symmetric")
        check_choice(self.rounding, ROUNDINGS, f"{field_name}.rounding")
        check_choice(self.observer, OBSERVERS, f"{field_name}.observer")
        if not is_real(self.percentile) or not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"{field_name}.percentile={self.percentile!r} must be a number in (0, 100]")
        check_bool(self.enabled, f"{field_name}.enabled")
        check_choice(self.levels, LEVELS, f"{field_name}.levels")
        if self.levels != "uniform" and self.rounding != "nearest":
            raise ConfigError(
                f"{field_name}.rounding={self.rounding!r} is not supported with {field_name}.levels="
                f"{self.levels!r}; codebook levels round to the nearest level"
            )


def _default_weight_spec() -> QuantSpec:
    return QuantSpec(bits=8, granularity="per_channel", symmetric=True, observer="minmax")


def _default_act_spec() -> QuantSpec:
    return QuantSpec(bits=8, granularity="per_tensor", symmetric=False, observer="minmax")


@dataclass
class WeightRounding:
    r"""
    How weights are rounded onto their quantization grid and which output corrections are fitted (`tdq.rounding`).

    Every method leaves the layer's weight on the grid of its `WeightQuantizer` (the weight becomes the dequantized
    codes), so round-to-nearest in the forward pass, saved states and integer backends reproduce the codes exactly.

    Args:
        method (`str`, *optional*, defaults to `"nearest"`):
            `"nearest"` (round to nearest with the observer's range), `"mse"` (per-row clipping search that
            minimises the layer's output error on calibration inputs, then round to nearest) or `"gptq"`
            (second-order column-by-column rounding with each layer's input Hessian from the FP model's
            calibration run through the real sampler) or `"adaround"` (learned up/down rounding per layer that
            minimises the layer's output error against the FP model with the activation quantizers in the loop,
            starting from `adaround_init`; see `tdq.rounding.adaround`) or `"brecq"` (learned rounding of all
            layers of each block, e.g. a `ResnetBlock2D` or transformer block, that minimises the block's output
            error against FP with the activation quantizers in the loop, starting from `adaround_init`; see
            `tdq.rounding.brecq`).
        clip (`str`, *optional*, defaults to `"observer"`):
            Range used by the rounding: `"observer"` (the weight spec's observer), `"weight_mse"` (per-row weight
            MSE search) or `"output_mse"` (per-row output-error search on calibration inputs). `method="mse"` with
            `clip="observer"` searches `"output_mse"`.
        damp (`float`, *optional*, defaults to `0.01`): GPTQ damping, as a fraction of the mean Hessian diagonal.
        act_order (`bool`, *optional*, defaults to `False`): GPTQ: quantize columns in order of decreasing
            Hessian diagonal.
        block_size (`int`, *optional*, defaults to `128`): GPTQ: columns per lazy-update block.
        corrections (`list[str]`, *optional*, defaults to `[]`): output corrections fitted after calibration:
            `"bias"` (per layer, per timestep bucket: remove the mean output error) and `"ptqd"` (at the model
            output, per bucket: divide out the part of the quantization noise correlated with the output and
            remove its mean).
        smooth_first (`bool`, *optional*, defaults to `False`): calibrate the activations before rounding so the
            outlier handling's SmoothQuant smoothing (`outliers.smoothing`) is chosen on the unrounded weights, then
            round the smoothed weights (GPTQ/AdaRound in the smoothed coordinates) and calibrate again keeping that
            smoothing. Without it, smoothing is off for any rounding but `"nearest"`.
        adaround_init (`str`, *optional*, defaults to `"nearest"`): the starting codes of AdaRound and BRECQ,
            `"nearest"` or `"gptq"` (GPTQ with `act_order`, `damp`, `block_size`).
        adaround_iters (`int`, *optional*, defaults to `500`): AdaRound Adam iterations per layer.
        adaround_reg (`float`, *optional*, defaults to `10.0`): AdaRound regulariser weight (relative to the
            starting output error).
        brecq_iters (`int`, *optional*, defaults to `150`): BRECQ Adam iterations per block.
        brecq_reg (`float`, *optional*, defaults to `20.0`): BRECQ regulariser weight (relative to the starting
            block output error).
        brecq_lr (`float`, *optional*, defaults to `0.1`): BRECQ Adam learning rate on the rounding variables.
        brecq_batch (`int`, *optional*, defaults to `8`): BRECQ calibration samples per iteration.
        brecq_samples_per_call (`int`, *optional*, defaults to `2`): batch items kept per block and sampler call
            as BRECQ calibration data (the calls cover every timestep bucket by its step occupancy).
    """

    method: str = "nearest"
    clip: str = "observer"
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    corrections: list[str] = field(default_factory=list)
    smooth_first: bool = False
    adaround_init: str = "nearest"
    adaround_iters: int = 500
    adaround_reg: float = 10.0
    brecq_iters: int = 150
    brecq_reg: float = 20.0
    brecq_lr: float = 0.1
    brecq_batch: int = 8
    brecq_samples_per_call: int = 2

    def validate(self, field_name: str = "weight_rounding") -> None:
        """Raise `ConfigError` naming the field if a value is unsupported."""
        if self.method not in WEIGHT_ROUNDING_METHODS:
            raise ConfigError(
                f"{field_name}.method={self.method!r} is unknown; choose one of {list(WEIGHT_ROUNDING_METHODS)}"
            )
        if self.clip not in WEIGHT_CLIPS:
            raise ConfigError(
                f"{field_name}.clip={self.clip!r} is unknown; choose one of {list(WEIGHT_CLIPS)}"
            )
        if not (isinstance(self.damp, int | float) and 0.0 < float(self.damp) <= 1.0):
            raise ConfigError(f"{field_name}.damp={self.damp!r} must be a number in (0, 1]")
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise ConfigError(f"{field_name}.block_size={self.block_size!r} must be a positive integer")
        if not isinstance(self.smooth_first, bool):
            raise ConfigError(f"{field_name}.smooth_first={self.smooth_first!r} must be true or false")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"{field_name}.act_order={self.act_order!r} must be true or false")
        if self.adaround_init not in ADAROUND_INITS:
            raise ConfigError(
                f"{field_name}.adaround_init={self.adaround_init!r} is unknown; choose one of {list(ADAROUND_INITS)}"
            )
        if (
            isinstance(self.adaround_iters, bool)
            or int(self.adaround_iters) != self.adaround_iters
            or (self.adaround_iters < 1)
        ):
            raise ConfigError(
                f"{field_name}.adaround_iters={self.adaround_iters!r} must be a positive integer"
            )
        if not (isinstance(self.adaround_reg, int | float) and float(self.adaround_reg) >= 0.0):
            raise ConfigError(
                f"{field_name}.adaround_reg={self.adaround_reg!r} must be a non-negative number"
            )
        for name in ("brecq_iters", "brecq_batch", "brecq_samples_per_call"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{field_name}.{name}={v!r} must be a positive integer")
        for name, lo_open in (("brecq_reg", False), ("brecq_lr", True)):
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
            if not ok or (float(v) <= 0.0 if lo_open else float(v) < 0.0):
                raise ConfigError(
                    f"{field_name}.{name}={v!r} must be a finite {'positive' if lo_open else 'non-negative'} number"
                )
        bad = [c for c in self.corrections if c not in CORRECTIONS]
        if bad:
            raise ConfigError(
                f"{field_name}.corrections has unknown entry {bad[0]!r}; choose from {list(CORRECTIONS)}"
            )

    @property
    def active(self) -> bool:
        """Whether anything beyond round-to-nearest with the observer's range is asked for."""
        return self.method != "nearest" or self.clip != "observer" or bool(self.corrections)


@dataclass
class LayerOverride:
    r"""
    Per-layer changes to the global specs; `None` fields keep the global value.

    Args:
        weight_bits (`int`, *optional*): weight bit-width for matching layers.
        act_bits (`int`, *optional*): activation bit-width (all buckets) for matching layers.
        weight (`dict`, *optional*): other `QuantSpec` fields for the weights, e.g. `{"granularity": "per_group"}`.
        activation (`dict`, *optional*): other `QuantSpec` fields for the activations.
        skip (`bool`, *optional*, defaults to `False`): leave matching layers in floating point.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    weight: dict[str, Any] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)
    skip: bool = False

    def validate(self, field_name: str) -> None:
        """Raise `ConfigError` naming `field_name` if a field has the wrong type (values are checked by
        `TDQConfig.layer_specs`)."""
        for name in ("weight", "activation"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(
                    f"{field_name}.{name}={getattr(self, name)!r} must be a mapping of QuantSpec fields"
                )
        check_bool(self.skip, f"{field_name}.skip")


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


@dataclass
class TDQConfig:
    r"""
    Everything `tdq.quantize_` needs: weight and activation specs, the timestep grid, which layers to quantize.

    Layer selection follows torchao's convention: `include`/`exclude` hold module names or `re:` regexes matched
    against the full module name; a layer is quantized when it matches `include` and no `exclude`. `overrides`
    maps a name or `re:` regex to a `LayerOverride`; the first matching key wins.

    Args:
        weight (`QuantSpec`, *optional*): weight spec; defaults to 8-bit symmetric per-channel.
        activation (`QuantSpec`, *optional*): input-activation spec; defaults to 8-bit affine per-tensor, min-max.
        grid (`TimestepGrid`, *optional*): the timestep buckets; defaults to 10 buckets on the adapter's grid.
        include (`list[str]`, *optional*, defaults to `["re:.*"]`): layers to quantize.
        exclude (`list[str]`, *optional*, defaults to `[]`): layers to keep in floating point.
        overrides (`dict[str, LayerOverride]`, *optional*): per-layer changes.
        check_finite (`bool`, *optional*, defaults to `False`):
            Check every quantized layer's input for NaN/inf at run time and raise `NonFiniteActivationError` naming
            the layer (one device sync per layer call). Calibration always checks. Without it, NaN/inf inputs pass
            through the activation quantizer unchanged (never replaced by finite values), so they still show in
            the output as they would in floating point.
        outliers (`OutlierConfig`, *optional*): activation-outlier diagnosis and handling after calibration
            (on by default).
        weight_rounding (`WeightRounding`, *optional*): rounding method and output corrections (`tdq.rounding`);
            defaults to round-to-nearest without corrections.
        attention (`bool`, *optional*, defaults to `False`):
            Also quantize the inputs of the attention matmuls (`Q K^T` and `softmax V`) of selected diffusers
            `Attention` modules: symmetric Q, K, V and unsigned softmax probabilities on `[0, max P]`, one scale per
            timestep bucket, at the activation bit-width (`tdq.quant.attention`).
        boundary_act_bits (`int`, *optional*, defaults to `8`):
            Minimum activation bits of the boundary layers, found after calibration from one recorded call: those
            that read the model input, write its output, or see only the timestep/conditioning (time embedding,
            time projections, text keys/values). A sliver of the MACs; at A6 they cost mnist-ddpm 9 dB
            (`tdq.boundary`). Only layers still at their configured bits are raised (a precision schedule's or an
            explicit override's choice is kept); `None` turns it off.
        qat (`QATConfig`, *optional*): LSQ quantization-aware fine-tuning after calibration (`tdq.qat`); off by
            default.
        version (`int`, *optional*): schema version of this config.

    Every `include`, `exclude` and `overrides` pattern must match at least one quantizable layer of the model
    `quantize_` is given; a pattern that matches nothing (a typo) is an error, not a no-op.
    """

    weight: QuantSpec = field(default_factory=_default_weight_spec)
    activation: QuantSpec = field(default_factory=_default_act_spec)
    grid: TimestepGrid = field(default_factory=TimestepGrid)
    include: list[str] = field(default_factory=lambda: ["re:.*"])
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    check_finite: bool = False
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    weight_rounding: WeightRounding = field(default_factory=WeightRounding)
    attention: bool = False
    boundary_act_bits: int | None = 8
    qat: QATConfig = field(default_factory=QATConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Accept plain dicts (from JSON/Hydra) for the nested fields.
        if isinstance(self.weight, dict):
            self.weight = _spec_from_dict(self.weight, "weight")
        if isinstance(self.activation, dict):
            self.activation = _spec_from_dict(self.activation, "activation")
        if isinstance(self.grid, dict):
            self.grid = _dataclass_from_dict(TimestepGrid, self.grid, "grid")
        if isinstance(self.weight_rounding, dict):
            self.weight_rounding = _dataclass_from_dict(
                WeightRounding, self.weight_rounding, "weight_rounding"
            )
        if isinstance(self.weight_rounding, WeightRounding):
            self.weight_rounding.corrections = list(self.weight_rounding.corrections)
        if isinstance(self.outliers, dict):
            self.outliers = _dataclass_from_dict(OutlierConfig, self.outliers, "outliers")
        if isinstance(self.qat, dict):
            self.qat = _dataclass_from_dict(QATConfig, self.qat, "qat")
        # A string is not split into characters: `validate` names the field instead.
        self.include = list(self.include) if isinstance(self.include, list | tuple) else self.include
        self.exclude = list(self.exclude) if isinstance(self.exclude, list | tuple) else self.exclude
        if isinstance(self.overrides, dict):
            self.overrides = {
                k: v
                if not isinstance(v, dict)
                else _dataclass_from_dict(LayerOverride, dict(v), f"overrides[{k!r}]")
                for k, v in self.overrides.items()
            }

    def validate(self) -> None:
        """Check every field; raise `ConfigError` naming the first bad one."""
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"version={self.version!r} is not readable; this tdq reads version {CONFIG_VERSION}"
            )
        for name in ("weight", "activation"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise ConfigError(
                    f"{name} must be a QuantSpec or a mapping, got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.grid, TimestepGrid):
            raise ConfigError(f"grid must be a TimestepGrid or a mapping, got {type(self.grid).__name__}")
        self.weight.validate("weight", WEIGHT_BITS)
        self.activation.validate("activation", ACT_BITS)
        if self.activation.granularity not in ("per_tensor", "per_token"):
            raise ConfigError(
                f"activation.granularity={self.activation.granularity!r} is not supported; activations are "
                "quantized per tensor with one scale per timestep bucket (or 'per_token', dynamic)"
            )
        if self.weight.granularity == "per_token":
            raise ConfigError("weight.granularity='per_token' is for activations only")
        if self.activation.levels != "uniform":
            raise ConfigError(
                f"activation.levels={self.activation.levels!r} is not supported; non-uniform levels are for "
                "weights only"
            )
        self.grid.validate("grid")
        for list_name in ("include", "exclude"):
            patterns = getattr(self, list_name)
            if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
                raise ConfigError(
                    f"{list_name}={patterns!r} must be a list of layer names or 're:' regexes (non-empty strings)"
                )
        if not self.include:
            raise ConfigError("include=[] selects no layer; use ['re:.*'] for every layer")
        if not isinstance(self.overrides, dict) or not all(isinstance(k, str) and k for k in self.overrides):
            raise ConfigError(
                f"overrides={self.overrides!r} must map layer names or 're:' regexes to LayerOverride entries"
            )
        for key, ov in self.overrides.items():
            if not isinstance(ov, LayerOverride):
                raise ConfigError(
                    f"overrides[{key!r}] must be a LayerOverride or a mapping, got {type(ov).__name__}"
                )
            ov.validate(f"overrides[{key!r}]")
        check_bool(self.check_finite, "check_finite")
        check_bool(self.attention, "attention")
        b = self.boundary_act_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b not in range(2, 17)):
            raise ConfigError(f"boundary_act_bits={b!r} must be null or an integer in 2..16")
        self.outliers.validate("outliers")
        if not isinstance(self.weight_rounding, WeightRounding):
            raise ConfigError(
                f"weight_rounding must be a WeightRounding or a mapping, got {type(self.weight_rounding).__name__}"
            )
        self.weight_rounding.validate("weight_rounding")
        if not isinstance(self.qat, QATConfig):
            raise ConfigError(f"qat must be a QATConfig or a mapping, got {type(self.qat).__name__}")
        self.qat.validate("qat")
        if self.weight.levels != "uniform" and (
            self.weight_rounding.method in ("mse", "adaround", "brecq")
            or self.weight_rounding.clip != "observer"
        ):
            raise ConfigError(
                f"weight.levels={self.weight.levels!r} works with weight_rounding.method 'nearest' or 'gptq' and "
                f"clip 'observer', got method={self.weight_rounding.method!r}, clip={self.weight_rounding.clip!r}"
            )
        if self.weight.levels != "uniform" and self.qat.enabled:
            raise ConfigError(
                f"weight.levels={self.weight.levels!r}: QAT (qat.enabled) learns uniform step sizes; use "
                "weight.levels='uniform' with QAT"
            )
        for pattern in [*self.include, *self.exclude, *self.overrides]:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"bad regex {pattern!r} in include/exclude/overrides: {e}") from e
        for key in self.overrides:
            self.layer_specs(key if not key.startswith("re:") else "", _check_override=key)

    def check_patterns(self, candidates: list[str]) -> None:
        """
        Raise `ConfigError` naming the first `include`/`exclude`/`overrides` pattern that matches none of
        `candidates` (the quantizable layer names of a model): such a pattern would silently do nothing.

        Args:
            candidates (`list[str]`): names of the model's layers of a quantizable type.
        """
        included = [n for n in candidates if any(_name_matches(p, n) for p in self.include)]
        selected = [n for n in included if not any(_name_matches(p, n) for p in self.exclude)]
        checks = [("include", p, candidates) for p in self.include]
        checks += [("exclude", p, included) for p in self.exclude]
        checks += [("overrides", k, selected) for k in self.overrides]
        for field_name, pattern, names in checks:
            if not any(_name_matches(pattern, n) for n in names):
                where = "" if names is candidates else " of the layers it applies to"
                example = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
                raise ConfigError(
                    f"{field_name} pattern {pattern!r} matches no quantizable layer{where} (a typo?); known "
                    f"layers: [{example}]"
                )

    def selects(self, name: str) -> bool:
        """Whether the module called `name` is quantized under this config."""
        if not any(_name_matches(p, name) for p in self.include):
            return False
        if any(_name_matches(p, name) for p in self.exclude):
            return False
        ov = self.override_for(name)
        return not (ov is not None and ov.skip)

    def override_for(self, name: str) -> LayerOverride | None:
        """The first `LayerOverride` whose key matches `name`, or `None`."""
        for key, ov in self.overrides.items():
            if _name_matches(key, name):
                return ov
        return None

    def layer_specs(self, name: str, _check_override: str | None = None) -> tuple[QuantSpec, QuantSpec]:
        """
        The `(weight_spec, act_spec)` for the layer `name`, with its override applied and validated.
        """
        ov = self.overrides[_check_override] if _check_override is not None else self.override_for(name)
        w, a = copy.copy(self.weight), copy.copy(self.activation)
        where = f"overrides[{_check_override or name!r}]"
        if ov is not None:
            w = _spec_from_dict({**dataclasses.asdict(w), **ov.weight}, f"{where}.weight")
            a = _spec_from_dict({**dataclasses.asdict(a), **ov.activation}, f"{where}.activation")
            if ov.weight_bits is not None:
                w.bits = ov.weight_bits
            if ov.act_bits is not None:
                a.bits = ov.act_bits
            w.validate(f"{where}.weight", WEIGHT_BITS)
            a.validate(f"{where}.activation", ACT_BITS)
            if a.levels != "uniform":
                raise ConfigError(
                    f"{where}.activation.levels={a.levels!r} is not supported; non-uniform levels are for weights only"
                )
            if a.granularity != "per_tensor":
                raise ConfigError(
                    f"{where}.activation.granularity={a.granularity!r} is not supported; use per_tensor"
                )
        return w, a

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-safe), the inverse of `from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TDQConfig:
        """Build a config from `to_dict` output (or a Hydra/OmegaConf container); unknown keys are errors."""
        data = _to_plain(data)
        if not isinstance(data, dict):
            raise ConfigError(
                f"TDQConfig.from_dict needs a mapping of config fields, got {type(data).__name__} ({data!r:.60})"
            )
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"version={version!r} is not readable; this tdq reads version {CONFIG_VERSION}")
        cfg = _dataclass_from_dict(cls, data, "TDQConfig")
        cfg.validate()
        return cfg


def _to_plain(data: Any) -> Any:
    # An OmegaConf container exists only once omegaconf is imported: do not import it here (it costs ~3 MB resident
    # in a process that only loads a saved quantization).
    omegaconf = sys.modules.get("omegaconf")
    if omegaconf is not None and isinstance(data, omegaconf.DictConfig | omegaconf.ListConfig):
        return omegaconf.OmegaConf.to_container(data, resolve=True)
    return data


def _dataclass_from_dict(cls, data: dict[str, Any], where: str):
    data = _to_plain(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    return cls(**data)


def _spec_from_dict(data: dict[str, Any], where: str) -> QuantSpec:
    return _dataclass_from_dict(QuantSpec, data, where)


def register_configs() -> None:
    """Register `TDQConfig` as the Hydra structured-config schema `tdq_quant_schema` (group-free)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="tdq_quant_schema", node=TDQConfig)


def check_field(
    value: Any,
    field_name: str,
    kind: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple | None = None,
    optional: bool = False,
) -> None:
    r"""
    Raise `ConfigError` naming `field_name` and what is allowed unless `value` fits.

    Args:
        value (`Any`): the value.
        field_name (`str`): its dotted name, e.g. `"eval.num_inference_steps"`.
        kind (`str`): `"int"`, `"real"` (finite), `"bool"`, `"str"`, `"choice"` (one of `choices`), `"int_list"` or
            `"str_list"`.
        lo (`float`, *optional*): smallest allowed number (for lists: of each element).
        hi (`float`, *optional*): largest allowed number.
        choices (`tuple`, *optional*): allowed values for `"choice"` (and for each element of a `"str_list"`).
        optional (`bool`, *optional*, defaults to `False`): `None` is allowed.
    """
    if value is None and optional:
        return
    rng = ""
    if lo is not None or hi is not None:
        rng = f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    null = " or null" if optional else ""

    def fail(allowed: str) -> ConfigError:
        return ConfigError(f"{field_name}={value!r} is not allowed; it must be {allowed}{null}")

    def in_range(v) -> bool:
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
    elif kind in ("int", "real"):
        ok = is_int(value) if kind == "int" else is_real(value)
        if not ok or not in_range(value):
            raise fail(("an integer" if kind == "int" else "a finite number") + rng)
    elif kind == "str":
        if not isinstance(value, str):
            raise fail("a string")
    elif kind == "choice":
        if not isinstance(value, str) or value not in choices:
            raise fail(f"one of {list(choices)}")
    elif kind == "int_list":
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(is_int(v) and in_range(v) for v in value)
        ):
            raise fail(f"a non-empty list of integers{rng}")
    elif kind == "str_list":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and (choices is None or v in choices) for v in value
        ):
            raise fail("a list of strings" + (f" from {list(choices)}" if choices else ""))
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown kind {kind!r}")
