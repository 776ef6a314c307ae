"""Sensitivity profiling sharded across the processes of a `torch.distributed` group (e.g. `accelerate launch`).

A profile is a sum over deterministic *units*: one unit is one batch of one timestep bucket, numbered in the order a
single process runs them (bucket by bucket, batches in order; `profile_units`). Units are dealt round-robin to the
ranks (`shard_plan`); each rank computes the sums of its own units only, with exactly the inputs one process would
use for them: the bucket's noise levels, noise and `x0` rows come from the bucket's own generator (`BucketStream`,
drawn whole and sliced, so a unit's inputs do not depend on which units ran before it on that rank), per-unit
random streams (Hutchinson probes) are seeded from the unit's number, and a `forward_fn` that follows the row order
(`tdq.sampling.ConditionedForward`) is moved to the unit's first row by its `seek(row)` method (`seek_forward`).

The per-unit sums are then gathered to every rank (`gather_unit_results`) and added up in unit order by the same
code that adds them up in one process, so a sharded profile equals the single-process one bit for bit (for the same
device, thread count and kernels). `check_same_inputs` first makes sure every rank profiles the same model, layers,
grid, settings and clean samples, and names the field that differs otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BucketStream",
    "ProfileUnit",
    "ShardPlan",
    "check_same_inputs",
    "gather_unit_results",
    "input_fingerprints",
    "bucket_levels",
    "iter_unit_inputs",
    "profile_fingerprints",
    "profile_units",
    "seek_forward",
    "shard_plan",
]


@dataclass(frozen=True)
class ProfileUnit:
    """
    One batch of one bucket: the unit of work that is assigned to a process.

    Args:
        index (`int`): position in the single-process order (bucket-major, then batch).
        bucket (`int`): the timestep bucket.
        batch (`int`): the batch's number inside its bucket.
        start (`int`): the bucket's first sample of the batch (its row in the bucket's stream).
        stop (`int`): one past the bucket's last sample of the batch.
    """

    index: int
    bucket: int
    batch: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """The batch size of the unit."""
        return self.stop - self.start


def profile_units(num_buckets: int, samples_per_bucket: int, batch_size: int) -> list[ProfileUnit]:
    """
    Every unit of a profile, in the order one process runs them: each (bucket, batch) exactly once.

    Args:
        num_buckets (`int`): timestep buckets of the grid.
        samples_per_bucket (`int`): noised samples per bucket.
        batch_size (`int`): samples per forward/backward pass (the bucket's last batch may be smaller).

    Returns:
        `list[ProfileUnit]`.
    """
    units = []
    for k in range(int(num_buckets)):
        for j, start in enumerate(range(0, int(samples_per_bucket), int(batch_size))):
            stop = min(start + int(batch_size), int(samples_per_bucket))
            units.append(ProfileUnit(len(units), k, j, start, stop))
    return units


@dataclass
class ShardPlan:
    """
    Which units this process computes.

    Args:
        rank (`int`): this process's rank (0 in one process).
        world_size (`int`): the number of processes sharing the units.
        units (`list[ProfileUnit]`): all units, in single-process order.
        local (`list[ProfileUnit]`): this rank's units (`units[rank::world_size]`), in order.
    """

    rank: int
    world_size: int
    units: list[ProfileUnit]
    local: list[ProfileUnit]

    @property
    def sharded(self) -> bool:
        """Whether units are split across more than one process."""
        return self.world_size > 1

    def meta(self) -> dict[str, Any]:
        """The profile's `meta["distribution"]`: process count, assignment and units per rank."""
        return {
            "sharded": self.sharded,
            "world_size": self.world_size,
            "assignment": "round_robin",
            "num_units": len(self.units),
            "units_per_rank": [len(self.units[r :: self.world_size]) for r in range(self.world_size)],
        }


def _dist():
    import torch.distributed as dist

    return dist


def shard_plan(units: Sequence[ProfileUnit], shard: bool | None) -> ShardPlan:
    """
    Deal `units` round-robin to the ranks of the default `torch.distributed` group.

    Args:
        units (`Sequence[ProfileUnit]`): all units (`profile_units`).
        shard (`bool`, *optional*): `None`: shard when a process group with more than one process is initialized;
            `True`: shard (a process group must be initialized); `False`: compute every unit here.

    Returns:
        `ShardPlan`.

    Raises:
        `ValueError` for `shard=True` without an initialized process group.
    """
    units = list(units)
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if shard is True and not ready:
        raise ValueError(
            "shard=True needs an initialized torch.distributed process group (e.g. under accelerate launch)"
        )
    if shard is False or not ready or dist.get_world_size() == 1:
        return ShardPlan(0, 1, units, units)
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardPlan(rank, world, units, units[rank::world])


# ----------------------------------------------------------------------------------------------------------------
# The input stream, seekable to a unit
# ----------------------------------------------------------------------------------------------------------------


class BucketStream:
    r"""
    The noised-sample inputs of one bucket, as one process draws them: `samples_per_bucket` noise levels inside the
    bucket and as many noise tensors from the bucket's own generator (seed `seed · 1 000 003 + k`), and `x0` rows
    cycled in order. A unit's inputs are a slice of it (`unit_inputs`), whatever units ran before.

    Args:
        family (`NoiseFamily`): draws the noise levels.
        edges (`list[float]`): the grid's bucket edges.
        bucket (`int`): the bucket `k`.
        samples_per_bucket (`int`): samples drawn.
        sample_shape (`tuple[int, ...]`): the shape of one `x0` row.
        num_rows (`int`): rows of `x0` (cycled).
        seed (`int`): the profile's seed.
    """

    def __init__(
        self, family, edges, bucket: int, samples_per_bucket: int, sample_shape, num_rows: int, seed: int
    ):
        k, n = int(bucket), int(samples_per_bucket)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        self.bucket = k
        self.levels, self.empty = family.draw(edges[k], edges[k + 1], k == len(edges) - 2, n, gen)
        self.noise = torch.randn((n, *sample_shape), generator=gen, dtype=torch.float32)
        self.rows = torch.arange(n) % int(num_rows)

    def unit_inputs(
        self, unit: ProfileUnit, x0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(x0 rows, noise, noise levels)` of `unit` (`x0` and noise on `x0`'s device and dtype)."""
        sl = slice(unit.start, unit.stop)
        xb = x0[self.rows[sl].to(x0.device)]
        return xb, self.noise[sl].to(device=x0.device, dtype=x0.dtype), self.levels[sl]


def seek_forward(forward_fn: Any, unit: ProfileUnit) -> None:
    """Move a `forward_fn` that follows the `x0` row order (has `seek(row)`) to `unit`'s first row in its bucket."""
    seek = getattr(forward_fn, "seek", None)
    if callable(seek):
        seek(unit.start)


# ----------------------------------------------------------------------------------------------------------------
# Same inputs on every rank; gathering
# ----------------------------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _digest(parts: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(_tensor_bytes(p) if isinstance(p, torch.Tensor) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


def input_fingerprints(denoiser: nn.Module, x0: torch.Tensor, **settings: Any) -> dict[str, str]:
    """
    What must be equal on every rank for a sharded profile to equal one process's: a short text per field.

    Args:
        denoiser (`nn.Module`): hashed over its class and `state_dict` (names, dtypes, shapes, bytes).
        x0 (`torch.Tensor`): the clean samples (the calibration data), hashed.
        **settings: further fields; tensors are hashed, mappings give one field per entry (`"name.key"`, entries
            starting with `_` left out), other values are compared by their `repr`.

    Returns:
        `dict[str, str]`: field → value (`"sha256:…"` for hashed fields).
    """
    sd = denoiser.state_dict()
    model = [type(denoiser).__qualname__]
    for name, t in sd.items():
        model += [name, str(t.dtype), tuple(t.shape), t]
    out = {
        "model": "sha256:" + _digest(model),
        "x0": "sha256:" + _digest([tuple(x0.shape), str(x0.dtype), x0]),
    }
    for key, value in settings.items():
        if isinstance(value, Mapping):  # one field per entry, so the error names the entry that differs
            for sub in sorted(value):
                if not str(sub).startswith("_"):  # private entries (diffusers' `_use_default_values`: a set)
                    out[f"{key}.{sub}"] = repr(value[sub])
        else:
            out[key] = "sha256:" + _digest([value]) if isinstance(value, torch.Tensor) else repr(value)
    return out


def check_same_inputs(fields: Mapping[str, str], plan: ShardPlan) -> None:
    """
    Check that every rank of `plan` profiles the same inputs (a collective call: every rank must make it).

    Args:
        fields (`Mapping[str, str]`): this rank's `input_fingerprints`.
        plan (`ShardPlan`): the sharding; nothing is checked in one process.

    Raises:
        `ValueError` naming every field that differs, with each rank's value, on every rank.
    """
    if not plan.sharded:
        return
    parts: list = [None] * plan.world_size
    _dist().all_gather_object(parts, dict(fields))
    keys = sorted(set().union(*(p.keys() for p in parts)))
    bad = []
    for key in keys:
        values = [p.get(key, "<missing>") for p in parts]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            bad.append(f"{key} ({shown})")
    if bad:
        raise ValueError(
            "sharded sensitivity profiling needs the same inputs on every process; they differ in "
            + "; ".join(bad)
        )


def _short(value: str) -> str:
    return (
        value[:19] + "…" if value.startswith("sha256:") else value if len(value) <= 80 else value[:77] + "..."
    )


def gather_unit_results(plan: ShardPlan, local: Mapping[int, Any]) -> list[Any]:
    """
    Every unit's result on every rank, in unit order (a collective call under a sharded plan).

    Args:
        plan (`ShardPlan`): the sharding.
        local (`Mapping[int, Any]`): this rank's results keyed on `ProfileUnit.index` (CPU tensors and plain values).

    Returns:
        `list`: the result of unit `i` at position `i`.

    Raises:
        `RuntimeError` when a unit has no result or more than one.
    """
    parts = [dict(local)]
    if plan.sharded:
        parts = [None] * plan.world_size
        _dist().all_gather_object(parts, dict(local))
    merged: dict[int, Any] = {}
    for part in parts:
        for index, result in part.items():
            if index in merged:
                raise RuntimeError(f"profile unit {index} was computed by more than one process")
            merged[index] = result
    missing = [u.index for u in plan.units if u.index not in merged]
    if missing or len(merged) != len(plan.units):
        raise RuntimeError(f"profile units {missing[:8]} have no result (of {len(plan.units)})")
    return [merged[u.index] for u in plan.units]


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the estimators' unit loops
# ----------------------------------------------------------------------------------------------------------------


def iter_unit_inputs(plan: ShardPlan, family, grid, x0: torch.Tensor, seed: int, progress: bool):
    """
    Yield `(unit, (x0 rows, noise, noise levels))` for this rank's units, in order (one bucket's stream at a time).

    Args:
        plan (`ShardPlan`): the sharding.
        family (`NoiseFamily`): draws the noise levels.
        grid (`TimestepGrid`): the resolved grid.
        x0 (`torch.Tensor`): the clean samples on the denoiser's device.
        seed (`int`): the profile's seed.
        progress (`bool`): show a tqdm bar over this rank's units.
    """
    edges = grid.edges().tolist()
    samples = max((u.stop for u in plan.units), default=0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.local), desc="sensitivity", leave=False)
    stream = None
    try:
        for unit in plan.local:
            if stream is None or stream.bucket != unit.bucket:
                stream = BucketStream(family, edges, unit.bucket, samples, x0.shape[1:], x0.shape[0], seed)
            yield unit, stream.unit_inputs(unit, x0)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def bucket_levels(family, grid, samples_per_bucket: int, seed: int) -> tuple[list[list[float]], list[int]]:
    """Every bucket's `[lowest, highest]` drawn noise level and the buckets whose range holds no draw ("empty")."""
    edges = grid.edges().tolist()
    ranges, empty = [], []
    for k in range(grid.num_buckets):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        levels, is_empty = family.draw(
            edges[k], edges[k + 1], k == grid.num_buckets - 1, int(samples_per_bucket), gen
        )
        ranges.append([levels.min().item(), levels.max().item()])
        if is_empty:
            empty.append(k)
    return ranges, empty


def profile_fingerprints(
    setup, denoiser, x0, forward_fn, estimator: str, seed, samples_per_bucket, batch_size, **extra
) -> dict[str, str]:
    """`input_fingerprints` of a profile call: model, x0, layers, grid, noise family, estimator and its settings."""
    fp = getattr(forward_fn, "fingerprint", None)
    return input_fingerprints(
        denoiser,
        x0,
        layers=list(setup.names),
        grid=setup.grid.to_dict(),
        noise_family=setup.family.describe(),
        estimator=estimator,
        seed=int(seed),
        samples_per_bucket=int(samples_per_bucket),
        batch_size=int(batch_size),
        forward_fn=fp()
        if callable(fp)
        else getattr(forward_fn, "__qualname__", type(forward_fn).__qualname__),
        scheduler=dict(setup.scheduler_config),
        **{k: _setting(v) for k, v in extra.items()},
    )


def _setting(value: Any) -> Any:
    """A plain value as it is; a sequence or tensor (e.g. step timesteps) as a float64 tensor, to be hashed."""
    if value is None or isinstance(value, int | float | str | bool):
        return value
    return torch.as_tensor(value, dtype=torch.float64)
