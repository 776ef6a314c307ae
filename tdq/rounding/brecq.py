"""BRECQ-style block reconstruction: learned AdaRound rounding of all layers of a block against the block's FP output.

The denoiser is cut into units by module type (`block_types`: diffusers' `ResnetBlock2D`, `BasicTransformerBlock`,
`Attention`, `Downsample2D`, `Upsample2D` by default; the outermost match wins), and every quantized layer outside
those blocks is a unit by itself. For each unit, the calibration data are the unit's inputs and outputs in the FP
model on the real sampler's calls over the calibration seeds (FP weights, FP trajectory: every timestep bucket, in
proportion to its step occupancy), `samples_per_call` batch items per call, with each item's timestep bucket.

The rounding of every weight of the unit's layers is learned as in AdaRound (Li et al., 2021 for the block
granularity): `W~ = scale * (base + h(V) - zero_point)` with the rectified sigmoid `h`, Adam on

    L = E ||f_q(x) - f(x)||^2 / E_start  +  lambda * mean(1 - |2 h - 1|^beta)

where `f` is the FP unit, `f_q` the unit with the soft weights and its timestep-aware activation quantizers in the
loop (each sample at its own bucket, straight-through gradients), `E_start` the error of the starting codes (nearest
or GPTQ); `beta` anneals from 20 to 2 after a warm-up, so the `h` end binary and the codes are `base + (h >= 0.5)`.
A unit whose learned codes do not beat its starting codes on the calibration data keeps the starting codes. The
weights stay on their quantizers' grids (scales unchanged), so saved states and integer backends see ordinary codes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdq.api import iter_quant_layers
from tdq.quant.modules import is_quant_module
from tdq.rounding.adaround import _inv_rect_sigmoid, _rect_sigmoid
from tdq.rounding.calib_stats import fp_run_buckets
from tdq.rounding.gptq import column_grid, nearest_codes, set_weight_codes_, weight_matrix

logger = logging.getLogger(__name__)


def default_block_types() -> tuple[type, ...]:
    """The diffusers module types reconstructed as one block (those this diffusers version has)."""
    found = []
    for mod, names in (
        ("diffusers.models.resnet", ("ResnetBlock2D", "ResnetBlockCondNorm2D")),
        ("diffusers.models.attention", ("BasicTransformerBlock",)),
        ("diffusers.models.attention_processor", ("Attention",)),
        ("diffusers.models.downsampling", ("Downsample2D",)),
        ("diffusers.models.upsampling", ("Upsample2D",)),
    ):
        try:
            m = __import__(mod, fromlist=list(names))
        except ImportError:  # pragma: no cover - older/newer diffusers layouts
            continue
        found += [getattr(m, n) for n in names if hasattr(m, n)]
    return tuple(found)


def find_units(
    model: nn.Module, block_types: Iterable[type] | None = None
) -> list[tuple[str, nn.Module, list[str]]]:
    """
    The reconstruction units of a quantized model, in module order.

    Args:
        model (`nn.Module`): a model quantized by `tdq.quantize_`.
        block_types (`Iterable[type]`, *optional*): module types reconstructed as one block; defaults to
            `default_block_types()`.

    Returns:
        `list[tuple[str, nn.Module, list[str]]]`: `(unit name, unit module, names of its weight-quantized layers)`;
        the outermost module of a block type that holds quantized layers, and each remaining quantized layer alone.
    """
    types = tuple(default_block_types() if block_types is None else block_types)
    qnames = {id(m): n for n, m in iter_quant_layers(model) if m.weight_quantizer.spec.enabled}
    units: list[tuple[str, nn.Module, list[str]]] = []
    taken: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in taken:
            continue
        if types and isinstance(mod, types) and not is_quant_module(mod):
            inner = [qnames[id(m)] for m in mod.modules() if id(m) in qnames]
            taken.update(id(m) for m in mod.modules())
            if inner:
                units.append((name, mod, inner))
        elif id(mod) in qnames:
            taken.add(id(mod))
            units.append((name, mod, [qnames[id(mod)]]))
    return units


@dataclass
class UnitData:
    """Calibration data of one unit: its FP inputs (batch-sliced args/kwargs), FP outputs and per-sample buckets."""

    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    buckets: list = field(default_factory=list)
    batch_keys: tuple = ()

    def finish(self) -> None:
        """Concatenate the per-call pieces along the batch."""
        self.args = _cat(self.args)
        self.kwargs = _cat(self.kwargs)
        self.outputs = torch.cat(self.outputs)
        self.buckets = torch.cat(self.buckets)

    def __len__(self) -> int:
        return int(self.outputs.shape[0]) if isinstance(self.outputs, torch.Tensor) else 0

    def take(self, idx: torch.Tensor) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
        """Samples `idx`: `(args, kwargs, fp outputs, buckets)`."""
        args = tuple(_index(a, idx) for a in self.args)
        kwargs = {k: _index(v, idx) for k, v in self.kwargs.items()}
        return args, kwargs, self.outputs[idx], self.buckets[idx]


class _Batched:
    """A tensor with a batch dimension (sliced and concatenated); other values are passed as they are."""

    def __init__(self, t: torch.Tensor):
        self.t = t


def _slice(v, n: int, idx: torch.Tensor):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
        return _Batched(v.detach()[idx].clone())
    return v


def _index(v, idx: torch.Tensor):
    return v.t[idx] if isinstance(v, _Batched) else v


def _cat(pieces: list):
    first = pieces[0]
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in pieces]) for k in first}
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in pieces]) for i in range(len(first)))
    if isinstance(first, _Batched):
        return _Batched(torch.cat([p.t for p in pieces]))
    return first


def _out_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"block output of type {type(out).__name__} has no tensor")


@torch.no_grad()
def collect_unit_data(
    model: nn.Module,
    run: Callable[[], object],
    units: list[tuple[str, nn.Module, list[str]]],
    fp_weights: dict[str, torch.Tensor],
    *,
    samples_per_call: int = 2,
    seed: int = 0,
) -> dict[str, UnitData]:
    """
    Run the sampler over the FP model and keep, per unit and call, `samples_per_call` random batch items of its
    inputs and FP outputs with their timestep buckets.
    """
    gen = torch.Generator().manual_seed(seed)
    data = {name: UnitData() for name, _, _ in units}
    handles = []
    pending: dict[str, torch.Tensor] = {}
    try:
        with fp_run_buckets(model, fp_weights) as ctx:

            def pre(name: str):
                def hook(mod, args, kwargs):
                    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                    n = x.shape[0]
                    idx = torch.randperm(n, generator=gen)[: min(n, samples_per_call)].to(x.device)
                    pending[name] = idx
                    d = data[name]
                    d.args.append(tuple(_slice(a, n, idx) for a in args))
                    d.kwargs.append({k: _slice(v, n, idx) for k, v in kwargs.items()})
                    if ctx.bucket is not None:
                        b = torch.full((idx.numel(),), int(ctx.bucket), dtype=torch.long)
                    else:
                        b = ctx.buckets.to("cpu")[idx.cpu()]
                    d.buckets.append(b)
                    return None

                return hook

            def post(name: str):
                def hook(mod, args, kwargs, out):
                    idx = pending.pop(name)
                    data[name].outputs.append(_out_tensor(out).detach()[idx].clone())
                    return None

                return hook

            for name, mod, _ in units:
                handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
                handles.append(mod.register_forward_hook(post(name), with_kwargs=True))
            run()
    finally:
        for h in handles:
            h.remove()
    for name in list(data):
        if data[name].outputs:
            data[name].finish()
        else:
            del data[name]
    return data


class _SoftLayer:
    """The AdaRound variables of one layer: `W~ = (base + h(V) - z) * s` where free, the fixed code elsewhere."""

    def __init__(self, module: nn.Module, w_fp: torch.Tensor):
        self.module = module
        wq = module.weight_quantizer
        w = w_fp.reshape(w_fp.shape[0], -1).float()
        out, cols = w.shape
        s, z = column_grid(wq, out, cols)
        qmin, qmax = wq.qrange()
        self.s, self.z, self.qmin, self.qmax = s, z, qmin, qmax
        rtn = nearest_codes(w, s, z, qmin, qmax)
        self.init = nearest_codes(weight_matrix(module).float(), s, z, qmin, qmax)  # the current codes
        fl = torch.floor(w / s) + z
        self.base = torch.minimum(torch.maximum(fl, self.init - 1), self.init)
        self.free = (self.base >= qmin) & (self.base <= qmax - 1)
        self.fixed = torch.where(self.free, self.base, self.init)
        if bool(torch.equal(self.init, rtn)):
            h0 = (w / s + z - self.base).clamp(0, 1)
        else:
            h0 = 0.25 + 0.5 * (self.init - self.base)
        self.v = _inv_rect_sigmoid(h0).requires_grad_(True)
        self.shape = module.weight.shape

    def soft_weight(self) -> torch.Tensor:
        h = _rect_sigmoid(self.v)
        w = torch.where(self.free, (self.base + h - self.z) * self.s, (self.fixed - self.z) * self.s)
        return w.reshape(self.shape).to(self.module.weight.dtype)

    def reg(self, beta: float) -> torch.Tensor:
        h = _rect_sigmoid(self.v)[self.free]
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        h = _rect_sigmoid(self.v)
        return torch.where(self.free, self.base + (h >= 0.5).float(), self.fixed).clamp(self.qmin, self.qmax)

    @torch.no_grad()
    def binary_fraction(self) -> float:
        h = _rect_sigmoid(self.v)[self.free]
        return float(((h < 1e-3) | (h > 1 - 1e-3)).float().mean()) if h.numel() else 1.0


class _QuantLoop:
    """Run a unit quantized (activation quantizers active, each sample at its bucket), optionally with soft weights."""

    def __init__(self, unit: nn.Module, layers: list[_SoftLayer]):
        self.unit, self.layers = unit, layers
        self.ctx = layers[0].module.context

    def __call__(self, args, kwargs, buckets, soft: bool) -> torch.Tensor:
        ctx = self.ctx
        old = ctx.active, ctx.bucket, ctx.buckets
        ctx.active = True
        if bool((buckets == buckets[0]).all()):
            ctx.set(int(buckets[0]), None)
        else:
            ctx.set(None, buckets)
        try:
            if soft:
                for sl in self.layers:
                    w = sl.soft_weight()
                    sl.module.quantized_weight = lambda w=w: w  # shadows the method for this call
            return _out_tensor(self.unit(*args, **kwargs))
        finally:
            if soft:
                for sl in self.layers:
                    sl.module.__dict__.pop("quantized_weight", None)
            ctx.active = old[0]
            ctx.set(old[1], old[2])


@torch.no_grad()
def _unit_error(loop: _QuantLoop, data: UnitData, batch: int) -> float:
    err = 0.0
    n = len(data)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch))
        args, kwargs, ref, b = data.take(idx)
        err += float(((loop(args, kwargs, b, soft=False) - ref).double() ** 2).sum())
    return err


def reconstruct_unit_(
    unit: nn.Module,
    layers: dict[str, nn.Module],
    fp_weights: dict[str, torch.Tensor],
    data: UnitData,
    *,
    iters: int = 150,
    reg_weight: float = 20.0,
    lr: float = 0.1,
    batch: int = 8,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    seed: int = 0,
) -> dict:
    """
    Learn the rounding of `layers` (all inside `unit`) to minimise the unit's output error against FP on `data`.

    The layers' weights must be on their grids (nearest or GPTQ codes: the start) and their activation quantizers
    calibrated. In place: the layers end with the learned codes, or keep the start when those are not better on
    `data`.

    Args:
        unit (`nn.Module`): the block (or a single quantized layer).
        layers (`dict[str, nn.Module]`): its weight-quantized layers by name.
        fp_weights (`dict[str, torch.Tensor]`): their FP weights (the grids' reference for `floor`).
        data (`UnitData`): calibration inputs and FP outputs (`collect_unit_data`).
        iters (`int`, *optional*, defaults to `150`): Adam iterations.
        reg_weight (`float`, *optional*, defaults to `20.0`): regulariser weight (the error term is normalised by the
            start's error, the regulariser is a mean over the free weights).
        lr (`float`, *optional*, defaults to `0.1`): Adam learning rate on the rounding variables.
        batch (`int`, *optional*, defaults to `8`): samples per iteration.
        warmup (`float`, *optional*, defaults to `0.2`): fraction of iterations without the regulariser.
        beta (`tuple[float, float]`, *optional*, defaults to `(20, 2)`): regulariser exponent, annealed.
        seed (`int`, *optional*, defaults to `0`): minibatch seed.

    Returns:
        `dict`: `method` (`"brecq"` or `"start kept (brecq worse)"`), the summed squared output error on `data` of the
        start (`error_start`) and of the result (`error`), both relative to the FP output energy, `binary_fraction`,
        `samples`, `seconds`.
    """
    t0 = time.perf_counter()
    soft = [_SoftLayer(m, fp_weights[n]) for n, m in layers.items()]
    loop = _QuantLoop(unit, soft)
    energy = max(float((data.outputs.double() ** 2).sum()), 1e-30)
    err_start = _unit_error(loop, data, max(batch, 32))
    n = len(data)
    norm = max(err_start / n, 1e-30)  # mean per-sample error of the start
    params = [p for p in unit.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([sl.v for sl in soft], lr=lr)
    n_free = max(1, sum(int(sl.free.sum()) for sl in soft))
    warm = int(warmup * iters)
    try:
        with torch.enable_grad():
            for it in range(iters):
                idx = torch.randperm(n, generator=gen)[: min(batch, n)]
                args, kwargs, ref, b = data.take(idx)
                out = loop(args, kwargs, b, soft=True)
                loss = ((out - ref) ** 2).sum() / (idx.numel() * norm)
                if it >= warm:
                    frac = (it - warm) / max(1, iters - warm - 1)
                    bt = beta[0] + (beta[1] - beta[0]) * frac
                    loss = loss + (reg_weight / n_free) * sum(sl.reg(bt) for sl in soft)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    codes = {name: sl.codes() for name, sl in zip(layers, soft, strict=True)}
    for name, sl in zip(layers, soft, strict=True):
        set_weight_codes_(sl.module, codes[name])
    err = _unit_error(loop, data, max(batch, 32))
    method = "brecq"
    if not err <= err_start:
        for sl in soft:
            set_weight_codes_(sl.module, sl.init)
        method = "start kept (brecq worse)"
    fr = [sl.binary_fraction() for sl in soft]
    return {
        "method": method,
        "layers": list(layers),
        "error_start": err_start / energy,
        "error": min(err, err_start) / energy,
        "binary_fraction": sum(fr) / len(fr),
        "samples": n,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def brecq_reconstruct_(
    model: nn.Module,
    run: Callable[[], object],
    fp_weights: dict[str, torch.Tensor],
    *,
    iters: int = 150,
    reg_weight: float = 20.0,
    lr: float = 0.1,
    batch: int = 8,
    samples_per_call: int = 2,
    block_types: Iterable[type] | None = None,
    seed: int = 0,
) -> dict:
    """
    BRECQ on a rounded (nearest or GPTQ codes), activation-calibrated model: every unit of `find_units` in turn.

    Args:
        model (`nn.Module`): the quantized model.
        run (`Callable[[], object]`): runs the real sampler over `model` on the calibration seeds.
        fp_weights (`dict[str, torch.Tensor]`): each layer's weight before rounding.
        iters, reg_weight, lr, batch: see `reconstruct_unit_`.
        samples_per_call (`int`, *optional*, defaults to `2`): batch items kept per unit and denoiser call.
        block_types (`Iterable[type]`, *optional*): see `find_units`.
        seed (`int`, *optional*, defaults to `0`): sampling and minibatch seed.

    Returns:
        `dict`: settings, seconds of data collection and optimisation, `units` (per unit the `reconstruct_unit_`
        report), `layers` (per layer its unit and method), `mean_binary_fraction`.
    """
    t0 = time.perf_counter()
    units = find_units(model, block_types)
    units = [(n, m, [q for q in qs if q in fp_weights]) for n, m, qs in units]
    units = [u for u in units if u[2]]
    data = collect_unit_data(model, run, units, fp_weights, samples_per_call=samples_per_call, seed=seed)
    t_data = time.perf_counter() - t0
    mods = dict(iter_quant_layers(model))
    reports: dict[str, dict] = {}
    layers: dict[str, dict] = {}
    for i, (name, unit, qs) in enumerate(units):
        if name not in data:
            continue
        rep = reconstruct_unit_(
            unit, {q: mods[q] for q in qs}, fp_weights, data.pop(name), iters=iters, reg_weight=reg_weight,
            lr=lr, batch=batch, seed=seed + i,
        )  # fmt: skip
        reports[name or "<model>"] = rep
        for q in qs:
            layers[q] = {"unit": name, "method": rep["method"]}
        logger.info("brecq %s: error %.4g -> %.4g", name, rep["error_start"], rep["error"])
    fr = [r["binary_fraction"] for r in reports.values()]
    return {
        "iters": iters,
        "reg_weight": reg_weight,
        "lr": lr,
        "batch": batch,
        "samples_per_call": samples_per_call,
        "seconds_data": round(t_data, 3),
        "seconds_optimisation": round(time.perf_counter() - t0 - t_data, 3),
        "mean_binary_fraction": sum(fr) / len(fr) if fr else math.nan,
        "units": reports,
        "layers": layers,
    }
