"""Per-channel activation statistics collected during calibration, for outlier diagnosis and handling.

`ChannelStats` keeps, per timestep bucket, the per-input-channel minimum and maximum of everything the layer saw
(the same data the range observers see) and a few small input snapshots (random spatial crops of one image for a
conv, random tokens for a linear) on which a layer's output error can be measured.
"""

from __future__ import annotations

import math

import torch


class ChannelStats:
    r"""
    Per-bucket per-channel ranges and input snapshots of one quantized layer.

    Args:
        num_buckets (`int`): K.
        channel_dim (`int`): input-channel dim (1 for conv, -1 for linear).
        min_spatial (`int`, *optional*, defaults to `1`): smallest crop side (a conv's kernel size).
        max_elems (`int`, *optional*, defaults to `8192`): elements per snapshot.
        max_snapshots (`int`, *optional*, defaults to `4`): snapshots kept per bucket (reservoir over calls).
        seed (`int`, *optional*, defaults to `0`): seed of the crops and the reservoir.
    """

    def __init__(
        self,
        num_buckets: int,
        channel_dim: int,
        min_spatial: int = 1,
        max_elems: int = 8192,
        max_snapshots: int = 4,
        seed: int = 0,
    ):
        self.num_buckets = num_buckets
        self.channel_dim = channel_dim
        self.min_spatial = min_spatial
        self.max_elems = max_elems
        self.max_snapshots = max_snapshots
        self.cmin: list[torch.Tensor | None] = [None] * num_buckets
        self.cmax: list[torch.Tensor | None] = [None] * num_buckets
        self.snapshots: list[list[torch.Tensor]] = [[] for _ in range(num_buckets)]
        self.calls = [0] * num_buckets
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def seen(self) -> list[int]:
        """Buckets that saw data."""
        return [k for k in range(self.num_buckets) if self.cmax[k] is not None]

    @torch.no_grad()
    def update(self, x: torch.Tensor, bucket: int) -> None:
        """Add one input tensor seen in `bucket` (non-finite values are ignored in the ranges)."""
        x = x.detach()
        if x.numel() == 0:
            return
        if self.channel_dim == 1 and x.dim() > 2:
            dims = (0,) + tuple(range(2, x.dim()))
        else:
            dims = tuple(range(x.dim() - 1))
        xf = x.float()
        if not bool(torch.isfinite(xf).all()):
            xf = torch.nan_to_num(xf, nan=0.0, posinf=0.0, neginf=0.0)
        mn, mx = xf.amin(dim=dims).cpu(), xf.amax(dim=dims).cpu()
        k = bucket
        self.cmin[k] = mn if self.cmin[k] is None else torch.minimum(self.cmin[k], mn)
        self.cmax[k] = mx if self.cmax[k] is None else torch.maximum(self.cmax[k], mx)
        self.calls[k] += 1
        n = self.calls[k]
        if len(self.snapshots[k]) < self.max_snapshots:
            self.snapshots[k].append(self._snapshot(xf))
        else:
            j = int(torch.randint(0, n, (1,), generator=self._gen))
            if j < self.max_snapshots:
                self.snapshots[k][j] = self._snapshot(xf)

    def _snapshot(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == 1 and x.dim() == 4:
            b = int(torch.randint(0, x.shape[0], (1,), generator=self._gen))
            c, h, w = x.shape[1:]
            side = max(self.min_spatial, int(math.sqrt(self.max_elems / max(c, 1))))
            ch, cw = min(h, side), min(w, side)
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=self._gen))
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=self._gen))
            return x[b : b + 1, :, y0 : y0 + ch, x0 : x0 + cw].clone().cpu()
        if self.channel_dim == 1 and x.dim() > 2:  # other conv ranks: one whole image
            return x[:1].clone().cpu()
        tokens = x.reshape(-1, x.shape[-1])
        n = max(1, min(tokens.shape[0], self.max_elems // max(x.shape[-1], 1)))
        idx = torch.randperm(tokens.shape[0], generator=self._gen)[:n]
        return tokens[idx].clone().cpu()

    def channel_absmax(self, bucket: int | None = None) -> torch.Tensor:
        """Per-channel max |x| in one bucket, or over all buckets (`None`)."""
        ks = self.seen if bucket is None else [bucket]
        out = None
        for k in ks:
            a = torch.maximum(self.cmin[k].abs(), self.cmax[k].abs())
            out = a if out is None else torch.maximum(out, a)
        return out

    def nearest_seen(self, k: int) -> int:
        """`k` if it saw data, else the nearest bucket that did."""
        seen = self.seen
        return k if k in seen else min(seen, key=lambda j: (abs(j - k), j))
