"""Activation-outlier diagnosis and handling after calibration (issue #11).

`tdq.prepare` attaches a `ChannelStats` to every activation quantizer (per-bucket per-channel ranges plus a few
input crops, from the same calibration data as the ranges); `tdq.convert` calls [`after_calibration`], which

1. diagnoses every layer and bucket: range, max/p99.9 ratio, channel and token concentration, and the layer's
   relative output error ``‖Y_q − Y‖² / ‖Y‖²`` at its bits on the calibration crops;
2. handles outliers (`TDQConfig.outliers`): SmoothQuant migration with α searched per layer (one `s` for all
   buckets; α = 1 is a per-input-channel activation scale folded into the weight), a two-segment `s` (shortcut
   splitting for concatenations), per-bucket clipping search, and a 16-bit fallback for the (layer, bucket)
   cells whose error stays large — each kept only where it lowers the reconstruction error;
3. logs a warning naming the layers whose error is large and saying what to do, and stores an
   [`OutlierDiagnosis`] on the model (``tdq.get_quantization(model).outliers``) for the run report
   ([`OutlierDiagnosis.markdown`]).

Run-time counters ([`runtime_counters`]): denoiser calls whose timestep lay outside the calibrated grid, and, per
layer and bucket, sampled quantized calls whose input exceeded the calibrated range.

Calibrate on the conditioning space, not just on seeds: a model's activation ranges can grow with its label,
prompt or guidance scale, and inputs beyond the calibrated range are clipped. Pass calibration runs that span
labels/prompts/guidance (e.g. with [`spread_conditions`]) and check ``clipped_calls`` in the report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

from tdq.quant import functional as F
from tdq.quant.quantizers import WeightQuantizer
from tdq.quant.stats import ChannelStats

logger = logging.getLogger(__name__)

__all__ = [
    "BucketDiagnosis",
    "LayerDiagnosis",
    "OutlierDiagnosis",
    "attach_stats",
    "after_calibration",
    "runtime_counters",
    "reset_runtime_counters",
    "spread_conditions",
]


@dataclass
class BucketDiagnosis:
    r"""
    One (layer, bucket) cell.

    Args:
        bucket (`int`): bucket index.
        min, max (`float`): calibrated input range (before smoothing).
        p999_ratio (`float`): max |x| / 99.9th percentile of |x| (large: a few extreme values).
        channel_ratio (`float`): largest per-channel max |x| / median one (large: a few outlier channels).
        token_ratio (`float`): largest per-token (per-pixel) max |x| / median one (large: a few outlier tokens).
        error_raw (`float`): relative output MSE at the configured bits before handling.
        error (`float`): relative output MSE after handling (as the model now runs).
        clip (`float`): width of the clipped range / the calibrated one (1 = no clipping).
        act_bits (`int`): activation bits now (16 after a fallback).
        clip_method (`str`): which candidate gave `clip`: `"none"`, `"ratio"`, `"percentile"` or `"kl"`.
    """

    bucket: int
    min: float
    max: float
    p999_ratio: float
    channel_ratio: float
    token_ratio: float
    error_raw: float
    error: float
    clip: float = 1.0
    act_bits: int = 8
    clip_method: str = "none"


@dataclass
class LayerDiagnosis:
    r"""
    One layer.

    Args:
        name (`str`): module name.
        kind (`str`): `"conv"` or `"linear"`.
        concentration (`str`): `"channels"`, `"tokens"` or `"spread"` (where the largest values sit).
        smoothing (`str` or `None`): chosen smoothing (`"alpha=0.75"`, `"split@64"`) or `None`.
        error_raw (`float`): max over buckets of the raw relative output error.
        error (`float`): max over buckets after handling.
        fallback_buckets (`list[int]`): buckets that run at 16-bit activations.
        buckets (`list[BucketDiagnosis]`): per bucket.
        advice (`str`): what to do when the error is large.
    """

    name: str
    kind: str
    concentration: str
    smoothing: str | None
    error_raw: float
    error: float
    fallback_buckets: list[int] = field(default_factory=list)
    buckets: list[BucketDiagnosis] = field(default_factory=list)
    advice: str = ""


@dataclass
class OutlierDiagnosis:
    r"""
    The outlier diagnosis of a calibrated model (``tdq.get_quantization(model).outliers``).

    Args:
        warn_error (`float`): threshold of a "large" relative output error.
        handled (`bool`): whether handling ran.
        layers (`list[LayerDiagnosis]`): per layer, in model order.
    """

    warn_error: float
    handled: bool
    layers: list[LayerDiagnosis] = field(default_factory=list)

    @property
    def flagged_raw(self) -> list[str]:
        """Layers whose raw error exceeded `warn_error`."""
        return [d.name for d in self.layers if d.error_raw > self.warn_error]

    @property
    def still_large(self) -> list[str]:
        """Layers whose error after handling still exceeds `warn_error` in some bucket that is not in fallback."""
        return [d.name for d in self.layers if d.error > self.warn_error]

    @property
    def smoothed(self) -> list[str]:
        """Layers that were smoothed."""
        return [d.name for d in self.layers if d.smoothing]

    @property
    def fallback(self) -> dict[str, list[int]]:
        """Layers with 16-bit fallback buckets."""
        return {d.name: d.fallback_buckets for d in self.layers if d.fallback_buckets}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, with a summary."""
        return {
            "warn_error": self.warn_error,
            "handled": self.handled,
            "summary": {
                "layers": len(self.layers),
                "flagged_raw": self.flagged_raw,
                "still_large": self.still_large,
                "smoothed": self.smoothed,
                "fallback": self.fallback,
            },
            "layers": [asdict(d) for d in self.layers],
        }

    def markdown(self, top: int = 15) -> str:
        """The report section: a summary, the worst layers, and what to do."""
        lines = ["## Activation outliers", ""]
        n = len(self.layers)
        lines.append(
            f"{len(self.flagged_raw)} of {n} layers had a relative output error above {self.warn_error:g} at their "
            f"bits before handling; {len(self.still_large)} still do after handling"
            + ("" if self.handled else " (handling is off: `outliers.handle=false`)")
            + f". Smoothed: {len(self.smoothed)}; 16-bit fallback: "
            f"{sum(len(v) for v in self.fallback.values())} (layer, bucket) cells in {len(self.fallback)} layers."
        )
        lines.append("")
        worst = sorted(self.layers, key=lambda d: -d.error_raw)[:top]
        lines.append(
            "| layer | where | max\\|x\\| | max/p99.9 | chan ratio | token ratio | err raw | err now | fix |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for d in worst:
            b = max(d.buckets, key=lambda c: c.error_raw)
            fix = ", ".join(
                x
                for x in (
                    d.smoothing,
                    "clip" if any(c.clip < 1 for c in d.buckets) else None,
                    f"A16 in buckets {d.fallback_buckets}" if d.fallback_buckets else None,
                )
                if x
            )
            lines.append(
                f"| `{d.name}` | {d.concentration} | {max(abs(b.min), abs(b.max)):.3g} | {b.p999_ratio:.3g} | "
                f"{b.channel_ratio:.3g} | {b.token_ratio:.3g} | {d.error_raw:.3g} | {d.error:.3g} | {fix or '-'} |"
            )
        bad = [d for d in self.layers if d.error > self.warn_error]
        if bad:
            lines += ["", "**Still large after handling** — what to do:", ""]
            for d in bad[:top]:
                lines.append(f"- `{d.name}` (error {d.error:.3g}): {d.advice}")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ calibration


def attach_stats(model: nn.Module, seed: int = 0) -> None:
    """
    Attach fresh `ChannelStats` to every activation quantizer (called by `tdq.prepare`). When smoothing will be
    chosen again (`outliers.enabled`, `handle` and `smoothing`), any previous smoothing is undone first, so the
    statistics describe the layer's raw input; otherwise a smoothing set by hand is kept.
    """
    from tdq.api import get_quantization as get_state
    from tdq.api import iter_quant_layers

    cfg = get_state(model).config.outliers
    rechoose = cfg.enabled and cfg.handle and cfg.smoothing
    for i, (_, m) in enumerate(iter_quant_layers(model)):
        if rechoose and m._buffers.get("act_smooth") is not None:
            m.set_act_smooth(None)
        aq = m.act_quantizer
        if not cfg.enabled or not aq.spec.enabled:
            aq.stats = None
            continue
        k = m.kernel_size if isinstance(m, nn.Conv2d) else (1,)
        aq.stats = ChannelStats(
            aq.num_buckets,
            m.channel_dim,
            min_spatial=max(k) if isinstance(k, tuple) else int(k),
            max_elems=cfg.snapshot_elems,
            max_snapshots=cfg.snapshots,
            seed=seed + 7919 * i,
        )


def _op(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return TF.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
    return TF.linear(x, w, m.bias)


def _cview(m: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2) if m.channel_dim == 1 and x.dim() > 2 else (-1,)


class _LayerEval:
    """Reconstruction error of one layer on its calibration crops under candidate smoothing/ranges/bits."""

    def __init__(self, m: nn.Module, stats: ChannelStats):
        self.m = m
        self.stats = stats
        self.w = m.weight.detach().float().clone()  # unsmoothed (prepare removed smoothing)
        self.aspec = m.act_quantizer.spec
        self.wspec = m.weight_quantizer.spec
        self.wbits = int(m.weight_quantizer.bits)
        self.snaps = [[s.to(self.w.device) for s in stats.snapshots[k]] for k in range(stats.num_buckets)]
        with torch.no_grad():
            self.refs = [[_op(m, s, self.w) for s in ss] for ss in self.snaps]
        self._wq_cache: dict[int, torch.Tensor] = {}

    def qweight(self, s: torch.Tensor | None, key: int) -> torch.Tensor:
        if key in self._wq_cache:
            return self._wq_cache[key]
        w = self.w if s is None else self.w * s.view((1, -1) + (1,) * (self.w.dim() - 2))
        if self.wspec.enabled:
            wq = WeightQuantizer(self.wspec, w)
            if int(wq.bits) != self.wbits:
                wq.set_bits(self.wbits)
            w = wq(w)
        self._wq_cache[key] = w
        return w

    def smoothed_range(self, k: int, s: torch.Tensor | None) -> tuple[float, float]:
        k = self.stats.nearest_seen(k)
        mn, mx = self.stats.cmin[k], self.stats.cmax[k]
        if s is not None:
            mn, mx = mn / s.cpu(), mx / s.cpu()
        return float(mn.min()), float(mx.max())

    @torch.no_grad()
    def error(
        self, k: int, s: torch.Tensor | None, lo: float, hi: float, bits: int, wq: torch.Tensor
    ) -> float:
        k = self.stats.nearest_seen(k)
        num = den = 0.0
        scale, zp = F.scale_zero_point(torch.tensor(lo), torch.tensor(hi), bits, self.aspec.symmetric)
        qmin, qmax = F.qrange(bits, self.aspec.symmetric)
        for x, y in zip(self.snaps[k], self.refs[k], strict=True):
            xs = x if s is None else x / s.view(_cview(self.m, x))
            if bits < 16:
                xs = F.fake_quantize(xs, scale.to(xs.device), zp.to(xs.device), qmin, qmax)
            yq = _op(self.m, xs, wq)
            num += float((yq - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
        if not math.isfinite(num):
            return float("inf")
        return num / max(den, 1e-30)


def _pow2(s: torch.Tensor, floor: float) -> torch.Tensor:
    """Floor the factors (rounding them to powers of two was measured: mnist-ddpm W8A8 34.6 -> 28.8 dB)."""
    return s.clamp(min=floor)


def _smooth_candidates(ev: _LayerEval, cfg) -> list[tuple[str, torch.Tensor]]:
    a = ev.stats.channel_absmax().to(ev.w.device).float()
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
    a = a.clamp(min=float(a.max()) * cfg.smooth_floor + 1e-30)
    wabs = ev.w.abs().transpose(0, 1).reshape(ev.w.shape[1], -1).amax(dim=1)
    wabs = wabs.clamp(min=float(wabs.max()) * cfg.smooth_floor + 1e-30)
    out = []
    for alpha in cfg.alphas:
        s = a.pow(alpha) / wabs.pow(1 - alpha)
        s = _pow2(s / s.max(), cfg.smooth_floor)  # only ratios matter
        if bool(torch.isfinite(s).all()):
            out.append((f"alpha={alpha:g}", s))
    c = a.numel()
    if cfg.split and c >= 2:
        la = a.log()
        best, cut = None, None
        for j in range(1, c):  # two segments minimising the larger within-segment log-range
            spread = max(float(la[:j].max() - la[:j].min()), float(la[j:].max() - la[j:].min()))
            if best is None or spread < best:
                best, cut = spread, j
        whole = float(la.max() - la.min())
        if cut is not None and whole - best > math.log(8.0):
            s = torch.empty_like(a)
            s[:cut] = a[:cut].max()
            s[cut:] = a[cut:].max()
            out.append((f"split@{cut}", _pow2(s / s.max(), cfg.smooth_floor)))
    return out


def _ratio(a: torch.Tensor) -> float:
    a = a.float().flatten()
    if a.numel() == 0:
        return 1.0
    med = float(a.median())
    return float(a.max()) / med if med > 0 else float("inf") if float(a.max()) > 0 else 1.0


def _describe(ev: _LayerEval, k: int) -> tuple[float, float, float]:
    """(max/p99.9, channel ratio, token ratio) of bucket k from the crops and per-channel ranges."""
    kk = ev.stats.nearest_seen(k)
    snaps = ev.snaps[kk]
    cabs = torch.maximum(ev.stats.cmin[kk].abs(), ev.stats.cmax[kk].abs())
    if not snaps:
        return 1.0, _ratio(cabs), 1.0
    flat = torch.cat([s.abs().reshape(-1) for s in snaps])
    if flat.numel() > 100_000:
        flat = flat[:: flat.numel() // 100_000 + 1]
    p = float(torch.quantile(flat.float(), 0.999))
    p999 = float(flat.max()) / p if p > 0 else 1.0
    cd = 1 if ev.m.channel_dim == 1 and snaps[0].dim() > 2 else -1
    tok = torch.cat([s.abs().amax(dim=cd).reshape(-1) for s in snaps])
    return p999, _ratio(cabs), _ratio(tok)


def _advice(d: LayerDiagnosis, bits: int) -> str:
    if d.concentration == "channels":
        return (
            "a few channels dominate: keep smoothing on (outliers.smoothing) or raise outliers.alphas; else keep the "
            f"layer at higher precision (overrides={{'{d.name}': {{'act_bits': 16}}}})"
        )
    if d.concentration == "tokens":
        return (
            "a few tokens/pixels dominate: try activation.granularity='per_token' (dynamic) or clipping "
            f"(activation.observer='mse'); else overrides={{'{d.name}': {{'act_bits': 16}}}}"
        )
    return (
        f"range is wide but not concentrated: {bits} bits are too few here; raise this layer's bits "
        f"(overrides={{'{d.name}': {{'act_bits': {min(bits + 2, 16)}}}}}) or let the fallback keep it at 16-bit"
    )


@torch.no_grad()
def kl_clip_ratio(x: torch.Tensor, bits: int, bins: int = 2048, steps: int = 128) -> float:
    r"""
    Entropy (KL) calibration threshold of |x| (TensorRT's method) as a fraction of max |x|.

    The histogram of |x| is clipped at each candidate threshold (the tail folded into the last bin) and merged
    into ``2**(bits-1)`` levels; the threshold whose quantized histogram has the least KL divergence from the
    clipped one wins.

    Args:
        x (`torch.Tensor`): sample of activations (any shape; must be finite).
        bits (`int`): activation bits.
        bins (`int`, *optional*, defaults to `2048`): histogram bins.
        steps (`int`, *optional*, defaults to `128`): thresholds tried (evenly spaced over the bins).

    Returns:
        `float` in (0, 1]: the threshold divided by max |x| (1.0 when x is all zero).
    """
    a = x.detach().abs().flatten().double()
    amax = float(a.max()) if a.numel() else 0.0
    if not math.isfinite(amax) or amax <= 0.0:
        return 1.0
    hist = torch.histc(a, bins=bins, min=0.0, max=amax)
    levels = max(2 ** (int(bits) - 1), 2)
    best, best_i = float("inf"), bins
    for i in torch.linspace(levels, bins, steps).round().long().unique().tolist():
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        if p.sum() <= 0:
            continue
        # merge hist[:i] into `levels` chunks; spread each chunk's mass over its non-empty bins
        edges = torch.linspace(0, i, levels + 1).round().long()
        q = torch.zeros_like(p)
        src = hist[:i]
        for j in range(levels):
            lo, hi = int(edges[j]), int(edges[j + 1])
            if hi <= lo:
                continue
            chunk = src[lo:hi]
            nz = chunk > 0
            n = int(nz.sum())
            if n:
                q[lo:hi][nz] = float(chunk.sum()) / n
        mask = p > 0
        pn, qn = p / p.sum(), q / max(float(q.sum()), 1e-300)
        qm = qn[mask]
        if bool((qm <= 0).any()):
            kl = float("inf")
        else:
            kl = float((pn[mask] * (pn[mask] / qm).log()).sum())
        if kl < best:
            best, best_i = kl, i
    return min(1.0, best_i / bins)


def _clip_candidates(
    ev: _LayerEval, k: int, s: torch.Tensor | None, lo: float, hi: float, bits: int, cfg
) -> list[tuple[str, float, float]]:
    """
    Clipped ranges ``(family, lo, hi)`` to try for one bucket: the range shrunk by each of `clip_ratios`, and
    [-T, T] ∩ [lo, hi] for thresholds T of |x| from percentiles and KL (so a one-sided range stays one-sided).
    """
    cands = [("ratio", lo * float(r), hi * float(r)) for r in cfg.clip_ratios if r < 1.0]
    methods = set(cfg.clip_methods)
    if not ({"percentile", "kl"} & methods):
        return cands
    kk = ev.stats.nearest_seen(k)
    xs = [x if s is None else x / s.view(_cview(ev.m, x)) for x in ev.snaps[kk]]
    if not xs:
        return cands
    a = torch.cat([x.detach().flatten().float() for x in xs]).abs()
    amax = float(a.max())
    if not math.isfinite(amax) or amax <= 0.0:
        return cands
    thresholds = []
    if "percentile" in methods:
        qs = torch.tensor([p / 100.0 for p in cfg.clip_percentiles], dtype=torch.float32)
        vals = torch.quantile(a[: 1 << 24], qs).tolist()
        thresholds += [(f"percentile{p:g}", v) for p, v in zip(cfg.clip_percentiles, vals, strict=True)]
    if "kl" in methods:
        thresholds.append(("kl", kl_clip_ratio(a, bits) * amax))
    for name, t in thresholds:
        if 0.0 < t < max(abs(lo), abs(hi)):
            clo, chi = max(lo, -t), min(hi, t)
            if chi > clo:
                cands.append((name, clo, chi))
    return cands


def after_calibration(model: nn.Module) -> OutlierDiagnosis | None:
    r"""
    Diagnose and (per `TDQConfig.outliers`) handle activation outliers of a model whose observers just froze
    their ranges; called by `tdq.convert`. Stores and returns the [`OutlierDiagnosis`].

    Args:
        model (`nn.Module`): a quantized model right after `finish_observing` (its quantizers carry `stats`).

    Returns:
        [`OutlierDiagnosis`], or `None` when diagnosis is disabled or no statistics were collected.
    """
    from tdq.api import get_quantization as get_state
    from tdq.api import iter_quant_layers

    state = get_state(model)
    cfg = state.config.outliers
    if not cfg.enabled:
        return None
    handle = cfg.handle
    # Smoothing rescales the weights (W·s) and re-rounds them to nearest: that would undo a weight rounding such as
    # GPTQ, whose codes were fitted to the unsmoothed inputs. With one, layers are diagnosed (and may fall back to
    # 16 bits) but not smoothed.
    wr = getattr(state.config, "weight_rounding", None)
    rounding = getattr(wr, "method", "nearest")
    # `weight_rounding.smooth_first`: this calibration runs before the rounding, which then works on the smoothed
    # weights (tdq.rounding.calibrate_with_rounding)
    may_smooth = cfg.smoothing and (rounding == "nearest" or bool(getattr(wr, "smooth_first", False)))
    if cfg.smoothing and not may_smooth:
        logger.info(
            "outlier smoothing is off: weight_rounding.method=%r keeps its own weight codes", rounding
        )
    diag = OutlierDiagnosis(warn_error=cfg.warn_error, handled=handle)
    cells: list[tuple[float, str, int]] = []
    layers: dict[str, tuple[nn.Module, _LayerEval, LayerDiagnosis]] = {}
    for name, m in iter_quant_layers(model):
        aq = m.act_quantizer
        stats, aq.stats = aq.stats, None
        if stats is None or not stats.seen:
            continue
        ev = _LayerEval(m, stats)
        K = aq.num_buckets
        bits = [int(b) for b in aq.bits]
        wq0 = ev.qweight(None, 0)
        raw = [ev.error(k, None, float(aq.min_val[k]), float(aq.max_val[k]), bits[k], wq0) for k in range(K)]
        dynamic = aq.spec.granularity == "per_token"
        smoothing, s = None, None
        los = [float(aq.min_val[k]) for k in range(K)]
        his = [float(aq.max_val[k]) for k in range(K)]
        errs = list(raw)
        clips = [1.0] * K
        clip_methods = ["none"] * K
        can_smooth = getattr(m, "groups", 1) == 1 and not dynamic
        if handle and may_smooth and can_smooth:
            best = sum(raw) / K
            for i, (label, cand) in enumerate(_smooth_candidates(ev, cfg)):
                wq = ev.qweight(cand, i + 1)
                rng = [ev.smoothed_range(k, cand) for k in range(K)]
                e = [ev.error(k, cand, *rng[k], bits[k], wq) for k in range(K)]
                if sum(e) / K < cfg.min_gain * best:
                    best, smoothing, s = sum(e) / K, label, cand
                    los, his, errs = [r[0] for r in rng], [r[1] for r in rng], e
        if handle and cfg.clip_search and not dynamic:
            wq = ev.qweight(s, -1) if s is not None else wq0
            for k in range(K):
                if bits[k] >= (8 if cfg.clip_search == "auto" else 16):
                    continue
                base, lo0, hi0 = errs[k], los[k], his[k]
                for method, clo, chi in _clip_candidates(ev, k, s, lo0, hi0, bits[k], cfg):
                    e = ev.error(k, s, clo, chi, bits[k], wq)
                    if e < cfg.min_gain * base and e < errs[k]:
                        errs[k], clip_methods[k] = e, method
                        clips[k] = (chi - clo) / max(hi0 - lo0, 1e-30)
                        los[k], his[k] = clo, chi
        # apply
        if s is not None:
            m.set_act_smooth(s)
        if smoothing is not None or any(c < 1 for c in clips):
            aq.min_val.copy_(torch.tensor(los, dtype=aq.min_val.dtype))
            aq.max_val.copy_(torch.tensor(his, dtype=aq.max_val.dtype))
            aq._update_scales()
        buckets = []
        for k in range(K):
            p999, cr, tr = _describe(ev, k)
            kk = stats.nearest_seen(k)
            buckets.append(
                BucketDiagnosis(
                    bucket=k,
                    min=float(stats.cmin[kk].min()),
                    max=float(stats.cmax[kk].max()),
                    p999_ratio=p999,
                    channel_ratio=cr,
                    token_ratio=tr,
                    error_raw=raw[k],
                    error=errs[k],
                    clip=clips[k],
                    act_bits=bits[k],
                    clip_method=clip_methods[k],
                )
            )
        worst = max(buckets, key=lambda b: b.error_raw)
        conc = "channels" if worst.channel_ratio > 20 else "tokens" if worst.token_ratio > 20 else "spread"
        d = LayerDiagnosis(
            name=name,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            concentration=conc,
            smoothing=smoothing,
            error_raw=max(raw),
            error=max(errs),
            buckets=buckets,
        )
        d.advice = _advice(d, max(bits))
        diag.layers.append(d)
        layers[name] = (m, ev, d)
        cells += [(errs[k], name, k) for k in range(K) if bits[k] < 16]
    # 16-bit fallback of the worst remaining cells
    if handle and cfg.fallback and cells:
        cap = int(cfg.max_fallback_fraction * len(cells))
        bad = sorted((c for c in cells if c[0] > cfg.fallback_error), reverse=True)[:cap]
        for _, name, k in bad:
            m, _, d = layers[name]
            bits = m.act_quantizer.bits.clone()
            bits[k] = 16
            m.act_quantizer.set_bits(bits)
            d.fallback_buckets.append(k)
            d.buckets[k].act_bits = 16
            d.buckets[k].error = 0.0
        for _m, _, d in layers.values():
            if d.fallback_buckets:
                d.fallback_buckets.sort()
                d.error = max(b.error for b in d.buckets)
    state.outliers = diag
    _log(diag)
    return diag


def _log(diag: OutlierDiagnosis) -> None:
    if diag.handled and diag.flagged_raw:
        logger.info(
            "outliers: %d layer(s) had large quantization error (%s); smoothed %d, 16-bit fallback in %d layer(s)",
            len(diag.flagged_raw),
            ", ".join(diag.flagged_raw[:8]) + (" ..." if len(diag.flagged_raw) > 8 else ""),
            len(diag.smoothed),
            len(diag.fallback),
        )
    bad = [d for d in diag.layers if d.error > diag.warn_error]
    if bad:
        bad.sort(key=lambda d: -d.error)
        names = ", ".join(f"{d.name} ({d.error:.2g})" for d in bad[:10]) + (" ..." if len(bad) > 10 else "")
        logger.warning(
            "activation outliers: %d layer(s) have a large quantization error (relative output MSE > %g): %s. %s",
            len(bad),
            diag.warn_error,
            names,
            "Outlier handling is off: enable it (TDQConfig(outliers={'handle': True}), the default)."
            if not diag.handled
            else "Keep them at higher precision (overrides={name: {'act_bits': 16}}), raise "
            "outliers.max_fallback_fraction, or calibrate on inputs that cover the conditioning range. "
            f"First layer: {bad[0].advice}",
        )


# ------------------------------------------------------------------------------------------------ run time


def runtime_counters(model: nn.Module) -> dict[str, Any]:
    r"""
    Run-time range counters of a quantized model (since quantization or [`reset_runtime_counters`]).

    Returns:
        `dict`: ``calls`` (denoiser calls seen by the hook), ``out_of_range_timesteps`` (calls whose timestep lay
        outside the calibrated grid), ``clipped`` (per layer with any: per bucket ``[clipped, checked]`` sampled
        calls whose input exceeded the calibrated range by more than 1 % of its width), ``clipped_layers``.
    """
    from tdq.api import get_quantization as get_state
    from tdq.api import iter_quant_layers

    ctx = get_state(model).context
    clipped = {}
    checked = 0
    for name, m in iter_quant_layers(model):
        aq = m.act_quantizer
        checked += sum(aq.checked_calls)
        if any(aq.clipped_calls):
            clipped[name] = {
                k: [aq.clipped_calls[k], aq.checked_calls[k]]
                for k in range(aq.num_buckets)
                if aq.clipped_calls[k]
            }
    return {
        "calls": int(ctx.calls),
        "out_of_range_timesteps": int(ctx.out_of_range_calls),
        "checked_layer_calls": checked,
        "clipped_layers": len(clipped),
        "clipped": clipped,
    }


def reset_runtime_counters(model: nn.Module) -> None:
    """Zero the counters reported by [`runtime_counters`]."""
    from tdq.api import get_quantization as get_state
    from tdq.api import iter_quant_layers

    ctx = get_state(model).context
    ctx.calls = 0
    ctx.out_of_range_calls = 0
    ctx.out_of_range_warned = False
    for _, m in iter_quant_layers(model):
        aq = m.act_quantizer
        aq.checked_calls = [0] * aq.num_buckets
        aq.clipped_calls = [0] * aq.num_buckets


def runtime_markdown(counters: dict[str, Any]) -> str:
    """Report lines for [`runtime_counters`]."""
    lines = [
        f"- denoiser calls: {counters['calls']}; timesteps outside the calibrated grid: "
        f"{counters['out_of_range_timesteps']}",
        f"- layers whose inputs exceeded the calibrated range at run time (sampled calls): "
        f"{counters['clipped_layers']}",
    ]
    worst = sorted(counters["clipped"].items(), key=lambda kv: -sum(v[0] for v in kv[1].values()))[:10]
    for name, per in worst:
        c = sum(v[0] for v in per.values())
        n = sum(v[1] for v in per.values())
        lines.append(f"  - `{name}`: {c}/{n} checked calls clipped (buckets {sorted(per)})")
    if counters["clipped_layers"]:
        lines.append(
            "  - calibrate on inputs that span the conditioning space (labels, prompts, guidance): see "
            "`tdq.outliers.spread_conditions`"
        )
    return "\n".join(lines) + "\n"


def spread_conditions(values: list, n: int, seed: int = 0) -> list:
    r"""
    `n` calibration conditions spread evenly over `values` (labels, prompts, guidance scales, ...), in a seeded
    shuffled order, so calibration covers the conditioning space rather than only seeds.

    Args:
        values (`list`): the conditioning values to cover.
        n (`int`): number of calibration samples.
        seed (`int`, *optional*, defaults to `0`): shuffle seed.

    Returns:
        `list`: `n` values, each of `values` used ⌊n/len⌋ or ⌈n/len⌉ times.
    """
    if not values:
        raise ValueError("spread_conditions needs at least one value")
    out = [values[i % len(values)] for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [out[i] for i in perm]


def report_section(model: nn.Module) -> dict[str, Any] | None:
    r"""
    The run report's outlier section of a calibrated (and sampled) model: the diagnosis, the run-time counters
    and their markdown (``"markdown"``), or `None` when the model has no diagnosis and saw no out-of-range input.

    Args:
        model (`nn.Module`): a model quantized by tdq and calibrated.
    """
    from tdq.api import get_quantization as get_state

    diag = get_state(model).outliers
    counters = runtime_counters(model)
    if diag is None and not counters["out_of_range_timesteps"] and not counters["clipped_layers"]:
        return None
    md = diag.markdown() if diag is not None else "## Activation outliers\n\n"
    section = diag.to_dict() if diag is not None else {}
    section["runtime"] = counters
    section["markdown"] = md + "\nRun time:\n\n" + runtime_markdown(counters)
    return section
