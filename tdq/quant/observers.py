"""Range observers used during calibration; `TimestepActQuantizer` keeps one per timestep bucket."""

from __future__ import annotations

import torch

from tdq.quant import functional as F


class Observer:
    r"""
    Base class: accumulates statistics of the tensors it sees and returns a clipping range.

    Args:
        max_samples (`int`, *optional*, defaults to `16384`):
            Size of the random subsample kept by observers that need the value distribution.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the subsampling, so calibration is deterministic.
    """

    needs_samples = False

    def __init__(self, max_samples: int = 16384, seed: int = 0):
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.count = 0
        self.max_samples = max_samples
        self._samples: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def has_data(self) -> bool:
        """Whether any tensor was observed."""
        return self.count > 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Observe a tensor (non-finite values are ignored)."""
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        mn, mx = torch.aminmax(x)
        if not bool(torch.isfinite(mn) & torch.isfinite(mx)):  # rare: drop NaN/inf (a masked copy)
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return
            mn, mx = torch.aminmax(x)
        mn, mx = mn.float().cpu(), mx.float().cpu()
        self.min_val = mn if self.min_val is None else torch.minimum(self.min_val, mn)
        self.max_val = mx if self.max_val is None else torch.maximum(self.max_val, mx)
        self.count += 1
        if self.needs_samples:
            self._add_samples(x.float())

    def _add_samples(self, x: torch.Tensor) -> None:
        # Keep a fixed-size uniform subsample of everything seen (reservoir over batches, weighted by batch size).
        per_batch = min(x.numel(), self.max_samples)
        idx = torch.randint(0, x.numel(), (per_batch,), generator=self._gen)
        new = x.cpu()[idx]
        if self._samples is None:
            self._samples = new
            return
        merged = torch.cat([self._samples, new])
        if merged.numel() > self.max_samples:
            keep = torch.randperm(merged.numel(), generator=self._gen)[: self.max_samples]
            merged = merged[keep]
        self._samples = merged

    def compute_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the `(min, max)` clipping range for `bits`."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    def compute_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class PercentileObserver(Observer):
    r"""
    Clips at a percentile of the observed values (and the complementary lower percentile).

    Args:
        percentile (`float`, *optional*, defaults to `99.99`): upper percentile in (0, 100].
    """

    needs_samples = True

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        self.percentile = percentile

    def compute_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        s = self._samples
        lo = torch.quantile(s, 1.0 - q)
        hi = torch.quantile(s, q)
        return torch.minimum(lo, self.max_val), torch.maximum(hi, self.min_val)


class MSEObserver(Observer):
    r"""
    MSE-optimal clipping: searches shrink factors of the min-max range for the one that minimises the
    quantization MSE on the observed subsample.

    Args:
        num_candidates (`int`, *optional*, defaults to `80`): number of shrink factors tried in `[0.2, 1.0]`.
    """

    needs_samples = True

    def __init__(self, num_candidates: int = 80, **kwargs):
        super().__init__(**kwargs)
        self.num_candidates = num_candidates

    def compute_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._samples
        ratios = torch.linspace(0.2, 1.0, self.num_candidates)
        mins = self.min_val * ratios
        maxs = self.max_val * ratios
        scale, zp = F.scale_zero_point(mins, maxs, bits, symmetric)
        qmin, qmax = F.qrange(bits, symmetric)
        xq = F.dequantize(
            F.quantize(s[None, :], scale[:, None], zp[:, None], qmin, qmax), scale[:, None], zp[:, None]
        )
        err = (xq - s[None, :]).pow(2).mean(dim=1)
        best = int(torch.argmin(err))
        return mins[best], maxs[best]


def make_observer(kind: str, percentile: float = 99.99, seed: int = 0) -> Observer:
    """
    Build an observer by name.

    Args:
        kind (`str`): `"minmax"`, `"percentile"` or `"mse"`.
        percentile (`float`, *optional*, defaults to `99.99`): for `"percentile"`.
        seed (`int`, *optional*, defaults to `0`): subsampling seed.
    """
    if kind == "minmax":
        return MinMaxObserver(seed=seed)
    if kind == "percentile":
        return PercentileObserver(percentile=percentile, seed=seed)
    if kind == "mse":
        return MSEObserver(seed=seed)
    raise ValueError(f"unknown observer {kind!r}; choose 'minmax', 'percentile' or 'mse'")
