"""`OutlierConfig`: how tdq diagnoses and handles activation outliers after calibration (a field of `TDQConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CLIP_METHODS = ("ratio", "percentile", "kl")


@dataclass
class OutlierConfig:
    r"""
    Activation-outlier diagnosis and handling, run by `tdq.convert` right after calibration.

    Diagnosis is always cheap and on by default: per layer and bucket, ranges, percentile ratios, channel/token
    concentration and the layer's relative output error at its bits on calibration inputs; layers above
    `warn_error` are logged (`logging.warning`, naming them) and listed in the run report.

    Handling (when `handle=True`), per layer, each step kept only where it lowers the layer's reconstruction error
    on the calibration inputs:

    1. smoothing (SmoothQuant migration ``x·diag(s)⁻¹, diag(s)·W``): `s = a^α / w^(1-α)` with `a` the per-channel
       max |x| over all buckets (one `s` shared by all buckets) and `w` the per-input-channel max |W|; α searched
       in `alphas` (α = 1 is a per-input-channel activation scale folded into the weight); plus a two-segment
       piecewise-constant `s` (shortcut splitting for concatenated inputs of different scale);
    2. clipping search per bucket: shrink factors `clip_ratios` of the range, chosen on reconstruction error;
    3. precision fallback: (layer, bucket) cells whose error stays above `fallback_error` run at 16-bit
       activations (numerically float), worst first, at most `max_fallback_fraction` of all cells.

    Args:
        enabled (`bool`, *optional*, defaults to `True`): collect statistics and diagnose.
        handle (`bool`, *optional*, defaults to `True`): run the handling steps (each can be switched off below).
        smoothing (`bool`, *optional*, defaults to `True`): step 1.
        alphas (`list[float]`, *optional*): migration strengths tried.
        split (`bool`, *optional*, defaults to `True`): also try the two-segment (shortcut-splitting) `s`.
        smooth_floor (`float`, *optional*, defaults to `1e-5`): per-channel maxima below `smooth_floor` × the
            largest one (dead channels, e.g. 1e-21) are raised to it, so `x / s` cannot explode.
        min_gain (`float`, *optional*, defaults to `0.8`): a step is kept only if its error is below `min_gain` ×
            the error without it.
        clip_search (`bool` or `"auto"`, *optional*, defaults to `False`): step 2; `"auto"` searches only buckets
            with fewer than 8 activation bits. Off by default because a lower per-layer error did not give better
            samples: on mnist-ddpm W8A6 (64 seeds) final-sample PSNR fell from 21.1 to 20.3 dB with it, and at A8
            on the EDM fixture from 40.4 to 34.5 dB (errors propagate through the sampler).
        clip_ratios (`list[float]`, *optional*): range shrink factors tried per bucket.
        clip_methods (`list[str]`, *optional*, defaults to `["ratio", "percentile", "kl"]`): candidate families of
            the clipping search: `"ratio"` (the `clip_ratios`), `"percentile"` (the `clip_percentiles` of |x|) and
            `"kl"` (TensorRT's entropy threshold at the bucket's bits); the candidate with the least
            reconstruction error wins.
        clip_percentiles (`list[float]`, *optional*): percentiles of |x| tried by the `"percentile"` family.
        fallback (`bool`, *optional*, defaults to `True`): step 3.
        fallback_error (`float`, *optional*, defaults to `0.01`): relative output MSE above which a (layer,
            bucket) falls back to 16-bit activations.
        max_fallback_fraction (`float`, *optional*, defaults to `0.05`): cap on the fallback cells.
        warn_error (`float`, *optional*, defaults to `0.01`): relative output MSE (‖ΔY‖²/‖Y‖²) above which a
            layer is reported as badly quantized.
        snapshot_elems (`int`, *optional*, defaults to `8192`): elements per stored calibration input crop.
        snapshots (`int`, *optional*, defaults to `4`): crops kept per (layer, bucket).
    """

    enabled: bool = True
    handle: bool = True
    smoothing: bool = True
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9, 1.0])
    split: bool = True
    smooth_floor: float = 1e-5
    min_gain: float = 0.8
    clip_search: bool | str = False
    clip_ratios: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    clip_methods: list[str] = field(default_factory=lambda: ["ratio", "percentile", "kl"])
    clip_percentiles: list[float] = field(default_factory=lambda: [99.9, 99.99])
    fallback: bool = True
    fallback_error: float = 0.01
    max_fallback_fraction: float = 0.05
    warn_error: float = 0.01
    snapshot_elems: int = 8192
    snapshots: int = 4

    def validate(self, field_name: str = "outliers") -> None:
        """Raise `ConfigError` naming the field if a value is unusable."""
        from tdq.errors import ConfigError

        for a in self.alphas:
            if not 0.0 < float(a) <= 1.0:
                raise ConfigError(f"{field_name}.alphas: {a!r} is not in (0, 1]")
        for r in self.clip_ratios:
            if not 0.0 < float(r) <= 1.0:
                raise ConfigError(f"{field_name}.clip_ratios: {r!r} is not in (0, 1]")
        if self.clip_search not in (True, False, "auto"):
            raise ConfigError(f"{field_name}.clip_search={self.clip_search!r} must be true, false or 'auto'")
        if isinstance(self.clip_methods, str) or any(c not in CLIP_METHODS for c in self.clip_methods):
            raise ConfigError(
                f"{field_name}.clip_methods: {self.clip_methods!r} must be a list drawn from {list(CLIP_METHODS)}"
            )
        for p in self.clip_percentiles:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 <= float(p) < 100.0:
                raise ConfigError(f"{field_name}.clip_percentiles: {p!r} is not a number in [50, 100)")
        if not 0.0 < self.smooth_floor < 1.0:
            raise ConfigError(f"{field_name}.smooth_floor={self.smooth_floor!r} must be in (0, 1)")
        if not 0.0 < self.min_gain <= 1.0:
            raise ConfigError(f"{field_name}.min_gain={self.min_gain!r} must be in (0, 1]")
        if not 0.0 <= self.max_fallback_fraction <= 1.0:
            raise ConfigError(
                f"{field_name}.max_fallback_fraction={self.max_fallback_fraction!r} must be in [0, 1]"
            )
        for name in ("fallback_error", "warn_error"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{field_name}.{name}={getattr(self, name)!r} must be positive")
        for name in ("snapshot_elems", "snapshots"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ConfigError(f"{field_name}.{name}={v!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-safe)."""
        return dataclasses.asdict(self)
