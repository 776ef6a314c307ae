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
        """Raise `ConfigError` naming the field if a value is unusable (wrong type, out of range)."""
        from tdq.errors import ConfigError
        from tdq.grid import is_int, is_real

        def fail(name: str, allowed: str) -> ConfigError:
            return ConfigError(
                f"{field_name}.{name}={getattr(self, name)!r} is not allowed; it must be {allowed}"
            )

        for name in ("enabled", "handle", "smoothing", "split", "fallback"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, "true or false")
        if self.clip_search not in (True, False, "auto") or not isinstance(self.clip_search, bool | str):
            raise fail("clip_search", "true, false or 'auto'")
        for name in ("alphas", "clip_ratios"):
            v = getattr(self, name)
            if not isinstance(v, list | tuple) or not v or not all(is_real(a) and 0.0 < a <= 1.0 for a in v):
                raise fail(name, "a non-empty list of numbers in (0, 1]")
        if isinstance(self.clip_methods, str) or any(c not in CLIP_METHODS for c in self.clip_methods):
            raise fail("clip_methods", f"a list drawn from {list(CLIP_METHODS)}")
        v = self.clip_percentiles
        if not isinstance(v, list | tuple) or not all(is_real(x) and 50.0 <= x < 100.0 for x in v):
            raise fail("clip_percentiles", "a list of numbers in [50, 100)")
        if not is_real(self.smooth_floor) or not 0.0 < self.smooth_floor < 1.0:
            raise fail("smooth_floor", "a number in (0, 1)")
        if not is_real(self.min_gain) or not 0.0 < self.min_gain <= 1.0:
            raise fail("min_gain", "a number in (0, 1]")
        if not is_real(self.max_fallback_fraction) or not 0.0 <= self.max_fallback_fraction <= 1.0:
            raise fail("max_fallback_fraction", "a number in [0, 1]")
        for name in ("fallback_error", "warn_error"):
            if not is_real(getattr(self, name)) or not getattr(self, name) > 0:
                raise fail(name, "a positive finite number")
        for name in ("snapshot_elems", "snapshots"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise fail(name, "a positive integer")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-safe)."""
        return dataclasses.asdict(self)
