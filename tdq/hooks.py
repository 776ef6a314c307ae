"""The sampler hook: reads the timestep of every denoiser call and publishes its bucket to the quantizers.

It reads the argument the sampler actually passed (never counts calls), so classifier-free guidance batched in one
call, pipelines that call the denoiser twice per step, and any solver or step count all see the right bucket.

On a diffusers `ModelMixin` the hook is a named diffusers `ModelHook` (`"tdq_timestep"`) in the model's
`HookRegistry`, so it composes with diffusers' own cache and offload hooks and can be found and removed by name;
on any other module it is a torch forward pre-hook.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import numbers

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from tdq.adapters import TimestepAdapter, TimestepArgumentError
from tdq.grid import TimestepGrid
from tdq.quant.quantizers import TimestepContext

logger = logging.getLogger(__name__)

HOOK_NAME = "tdq_timestep"


def check_timestep(value, arg_name: str = "timestep", model_name: str = "denoiser"):
    """
    Check the type of a raw timestep argument; return it as a Python number or a real-valued tensor.

    Accepted: a real Python or numpy number (not `bool`), a non-empty integer or floating-point `torch.Tensor` or
    numpy array of any shape. Everything else (lists, strings, `bool`/complex values or tensors, empty tensors) raises
    `TimestepArgumentError` naming the argument.

    Args:
        value: the raw timestep as passed to the denoiser.
        arg_name (`str`, *optional*): the argument's name, for the message.
        model_name (`str`, *optional*): the denoiser's class name, for the message.
    """
    allowed = "a real number, or a non-empty integer or floating-point tensor / numpy array"
    where = f"{model_name}: timestep argument {arg_name!r}"
    if isinstance(value, np.ndarray | np.generic) and not isinstance(value, np.bool_):
        if value.dtype.kind not in "iuf":
            raise TimestepArgumentError(f"{where} has numpy dtype {value.dtype}; it must be {allowed}")
        value = torch.from_numpy(np.asarray(value))
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TimestepArgumentError(f"{where} has dtype {value.dtype}; it must be {allowed}")
        if value.numel() == 0:
            raise TimestepArgumentError(f"{where} is an empty tensor; it must be {allowed}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TimestepArgumentError(
            f"{where} is a {type(value).__name__} ({value!r:.60}); it must be {allowed}"
        )
    return value


def _batch_size(args, kwargs, timestep) -> int | None:
    """The batch size of a denoiser call: the first dimension of its first tensor input besides the timestep."""
    for value in (*args, *(kwargs.get(k) for k in ("sample", "hidden_states", "x")), *kwargs.values()):
        if isinstance(value, torch.Tensor) and value is not timestep and value.ndim >= 2:
            return int(value.shape[0])
    return None


def _diffusers_registry(model: nn.Module):
    """The diffusers `HookRegistry` of `model` if it is a diffusers `ModelMixin`, else `None`."""
    if not isinstance(model, ModelMixin):
        return None
    return HookRegistry.check_if_exists_or_initialize(model)


class _DiffusersTimestepHook(ModelHook):
    """The `TimestepHook` as a named diffusers `ModelHook`: `pre_forward` publishes the call's bucket."""

    _is_stateful = False

    def __init__(self, hook: TimestepHook):
        super().__init__()
        self.hook = hook

    def pre_forward(self, module, *args, **kwargs):
        self.hook._pre_forward(module, args, kwargs)
        return args, kwargs


class TimestepHook:
    r"""
    A forward pre-hook on the denoiser that maps the call's timestep to a bucket of `grid`.

    Args:
        model (`nn.Module`): the denoiser.
        adapter (`TimestepAdapter`): where its timestep is and in which units.
        grid (`TimestepGrid`): the resolved grid.
        context (`TimestepContext`): written before every call.
    """

    def __init__(
        self, model: nn.Module, adapter: TimestepAdapter, grid: TimestepGrid, context: TimestepContext
    ):
        if not grid.resolved:
            raise ValueError("TimestepHook needs a resolved grid (units, t_min, t_max)")
        self.adapter = adapter
        self.grid = grid
        self.context = context
        self.model_name = type(model).__name__
        edges = grid.edges()
        self._inner = edges[1:-1].tolist()
        self._inner_t = edges[1:-1]
        self._lo, self._hi = float(edges[0]), float(edges[-1])
        self._tol = 1e-6 * max(abs(self._hi), 1.0)
        self.last_value: float | None = None
        self._model = model
        self._registry = _diffusers_registry(model)
        if self._registry is not None:
            self._register_diffusers()
            self._handle = None
        else:
            self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        context.active = True

    def _register_diffusers(self) -> None:
        self._registry.register_hook(_DiffusersTimestepHook(self), HOOK_NAME)
        # diffusers' rewritten `forward` closes over the original module, so a plain `copy.deepcopy` of the model
        # would run the *original* model; `copy.deepcopy` looks `__deepcopy__` up on the instance first.
        self._model.__dict__["__deepcopy__"] = self._deepcopy_model

    def _unregister_diffusers(self) -> None:
        self._model.__dict__.pop("__deepcopy__", None)
        self._registry.remove_hook(HOOK_NAME, recurse=False)

    def _deepcopy_model(self, memo: dict) -> nn.Module:
        """Deep-copy the hooked diffusers model: copy it without the hook, then hook the copy with its own state."""
        model = self._model
        self._unregister_diffusers()
        try:
            new = copy.deepcopy(model, memo)
        finally:
            self._register_diffusers()
        new_hook = memo.get(id(self))
        if isinstance(new_hook, TimestepHook) and new_hook._model is new:
            new_hook._registry = HookRegistry.check_if_exists_or_initialize(new)
            new_hook._register_diffusers()
        return new

    def _check(self, lo: float, hi: float) -> None:
        if lo >= self._lo - self._tol and hi <= self._hi + self._tol:
            return
        # counted (on the model's context, which outlives the hook) and warned about once, whatever the policy
        ctx = self.context
        ctx.out_of_range_calls = getattr(ctx, "out_of_range_calls", 0) + 1
        bad = lo if lo < self._lo - self._tol else hi
        if self.grid.out_of_range == "error":
            raise ValueError(
                f"{self.model_name}: timestep {bad:g} ({self.grid.units}) lies outside the calibrated grid "
                f"[{self._lo:g}, {self._hi:g}]; set grid.out_of_range='nearest' to use the nearest bucket"
            )
        if not getattr(ctx, "out_of_range_warned", False):
            ctx.out_of_range_warned = True
            logger.warning(
                "%s: timestep %g (%s) lies outside the calibrated grid [%g, %g]; it uses the nearest bucket's "
                "scales (warned once; the count is in the run report)",
                self.model_name,
                bad,
                self.grid.units,
                self._lo,
                self._hi,
            )

    def bucket_of(self, raw) -> tuple[int | None, torch.Tensor | None]:
        """Return `(bucket, None)` if every sample shares one bucket, else `(None, per_sample_buckets)`."""
        value = self.adapter.to_grid(check_timestep(raw, self.adapter.arg_name, self.model_name))
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            flat = value.reshape(-1)
            if bool((flat == flat[0]).all()):
                value = float(flat[0])
            else:
                v = flat.to(torch.float64).cpu()
                if not bool(v.isfinite().all()):
                    raise self._nan_error(float(v[~v.isfinite()][0]))
                self._check(float(v.min()), float(v.max()))
                self.last_value = None
                return None, torch.bucketize(v, self._inner_t, right=True)
        value = float(value)
        if not math.isfinite(value):
            raise self._nan_error(value)
        self._check(value, value)
        self.last_value = value
        return bisect.bisect_right(self._inner, value), None

    def _nan_error(self, value: float = math.nan) -> ValueError:
        what = "NaN" if math.isnan(value) else f"{value:g}"
        return ValueError(
            f"{self.model_name}: timestep argument {self.adapter.arg_name!r} is {what}; every timestep must be a "
            "finite number"
        )

    def _pre_forward(self, module, args, kwargs):
        raw = self.adapter.read(args, kwargs, self.model_name)
        self.context.calls += 1
        bucket, buckets = self.bucket_of(raw)
        if buckets is not None:
            batch = _batch_size(args, kwargs, raw)
            if batch is not None and buckets.numel() != batch:
                raise TimestepArgumentError(
                    f"{self.model_name}: timestep argument {self.adapter.arg_name!r} holds {buckets.numel()} "
                    f"different timesteps for a batch of {batch}; pass one timestep, or one per sample"
                )
        self.context.set(bucket, buckets)
        return None

    def remove(self) -> None:
        """Remove the hook; the model's quantized layers then compute in floating point."""
        if self._registry is not None:
            self._unregister_diffusers()
        else:
            self._handle.remove()
        self.context.active = False
        self.context.clear()
