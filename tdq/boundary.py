"""Boundary layers: the layers that read the model input, write its output, or see only the conditioning.

They are a sliver of a denoiser's multiply-accumulates but carry errors that nothing downstream can average out: the
input layer quantizes x_t itself (at 6 bits a per-tensor grid of 64 levels over the noisy sample), the output layer
quantizes the features of the predicted noise, and the timestep / conditioning path (time embedding, every
ResBlock's time projection, cross-attention keys and values of the text) feeds every block. Measured on the bundled
mnist-ddpm (W8A6, DDIM 20, 16 seeds): 20.9 dB PSNR to FP with every layer at A6, 28.1 dB with only `conv_in` and
`conv_out` at A8, 30.4 dB with the time-embedding path at A8 as well; any other layer group at A8 gained < 0.5 dB.
The BRECQ / AdaRound / Q-Diffusion protocols keep the first and last layers at 8 bits for the same reason.

The layers are found from the model's behaviour on one recorded call, not from their names: with quantization off,
the call runs twice, with the sample input `x` and with a perturbed `x`:
- *input* layers receive `x` itself, or a rearrangement of it (patchified or permuted: the same values);
- the *output* layer produces the model output (up to a rearrangement), else it is the last quantized layer to run;
- *conditioning* layers receive identical inputs in both runs although `x` changed (timestep and text paths).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["find_boundary_layers", "promote_boundary_layers", "record_first_call"]

_SAMPLE_KWARGS = ("sample", "hidden_states", "x")


def _sample_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The sample tensor of a denoiser call and a function that rebuilds the call with another sample."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    for key in _SAMPLE_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], lambda new, key=key: (args, {**kwargs, key: new})
    raise ValueError(
        "boundary layers: the recorded denoiser call has no sample tensor (first positional argument or one of "
        f"{list(_SAMPLE_KWARGS)})"
    )


def _output_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` is a rearrangement of `b` (same multiset of values)."""
    if a.numel() != b.numel() or a.dtype != b.dtype:
        return False
    return torch.equal(a.detach().reshape(-1).sort().values, b.detach().reshape(-1).sort().values)


def _recorded_run(model: nn.Module, layers: dict[str, nn.Module], args: tuple, kwargs: dict):
    """One call of `model`: every layer's inputs (per call), last output, the order layers first ran, the output."""
    seen: dict[str, list[torch.Tensor]] = {}
    last_out: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def hook(m, a, o, name):
        if a and isinstance(a[0], torch.Tensor):
            seen.setdefault(name, []).append(a[0].detach().clone())
        if isinstance(o, torch.Tensor):
            last_out[name] = o.detach()
        if name not in order:
            order.append(name)

    handles = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            out = _output_tensor(model(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return seen, last_out, order, out


def find_boundary_layers(
    model: nn.Module, args: tuple, kwargs: dict, layers: dict[str, nn.Module], seed: int = 0
) -> dict[str, str]:
    r"""
    Classify the boundary layers of `model` on one call (see the module docstring).

    Args:
        model (`nn.Module`): the denoiser; run as given (call this with quantization off).
        args (`tuple`), kwargs (`dict`): a recorded denoiser call.
        layers (`dict[str, nn.Module]`): the candidate layers by name.
        seed (`int`, *optional*, defaults to `0`): seed of the perturbation of the sample.

    Returns:
        `dict[str, str]`: layer name -> `"input"`, `"output"` or `"conditioning"` (layers that are none are absent).
    """
    x, rebuild = _sample_of(args, kwargs)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    x2 = x + noise * (x.detach().float().std().clamp_min(1e-3).to(x.dtype))
    first, outs, order, out = _recorded_run(model, layers, *rebuild(x))
    second = _recorded_run(model, layers, *rebuild(x2))[0]
    roles: dict[str, str] = {}
    for name, inputs in first.items():
        if any(_same_values(t, x) for t in inputs):
            roles[name] = "input"
        elif name in second and len(second[name]) == len(inputs):
            if all(torch.equal(a, b) for a, b in zip(inputs, second[name], strict=True)):
                roles[name] = "conditioning"
    output = None
    if out is not None:
        output = next((n for n, o in outs.items() if _same_values(o, out)), None)
    if output is None and order:
        output = order[-1]
    if output is not None:
        roles.setdefault(output, "output")
    return roles


def record_first_call(model: nn.Module, store: dict) -> Any:
    """
    Record the first call of `model` into `store["call"]` (`(args, kwargs)`, tensors detached and cloned).

    Returns:
        The hook handle (the hook removes itself after the first call; `remove()` it if no call came).
    """

    def pre(module, args, kwargs):
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        store["call"] = (tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()})
        handle.remove()

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    return handle


def _explicit_override(config, name: str) -> bool:
    from tdq.config import _name_matches

    return any(
        _name_matches(pat, name) and (ov.act_bits is not None or "bits" in (ov.activation or {}))
        for pat, ov in config.overrides.items()
    )


def promote_boundary_layers(model: nn.Module, call: tuple | None) -> dict[str, dict]:
    r"""
    Raise the activation bits of the boundary layers to `config.boundary_act_bits` (after calibration; scales follow
    from the calibrated ranges, as `set_bits` does).

    Only layers still at their configured bit-width in every bucket are raised: a precision schedule's choice and an
    explicit per-layer override (`overrides.<layer>.act_bits`) are kept. A module whose every layer is a boundary
    layer (one or two layers) is left as configured.

    Args:
        model (`nn.Module`): a quantized denoiser whose activations were just calibrated.
        call (`tuple`, *optional*): `(args, kwargs)` of one denoiser call; `None` (no call was seen) skips.

    Returns:
        `dict[str, dict]`: per boundary layer, its `role`, `bits_before` and `bits_after` (also kept in
        `get_quantization(model).boundary`).
    """
    from tdq.api import disabled, get_quantization, iter_quant_layers

    state = get_quantization(model)
    target = state.config.boundary_act_bits
    if not target or call is None:
        return {}
    layers = dict(iter_quant_layers(model))
    try:
        _sample_of(*call)
    except ValueError as e:
        logger.info("%s; boundary layers not raised", e)
        return {}
    ctx = state.context
    saved = dict(
        vars(ctx)
    )  # the probe calls must leave the context (bucket, call counters) as calibration left it
    try:
        with disabled(model):
            roles = find_boundary_layers(model, call[0], call[1], layers)
    finally:
        vars(ctx).update(saved)
    if len(roles) == len(layers):  # e.g. a one- or two-layer module: no interior to protect them from
        logger.info("every quantized layer is a boundary layer; boundary_act_bits not applied")
        roles = {}
    out = {}
    for name, role in roles.items():
        q = layers[name].act_quantizer
        bits = q.bits.tolist()
        configured = int(q.spec.bits)
        promote = (
            all(b == configured for b in bits)
            and configured < target
            and not _explicit_override(state.config, name)
        )
        if promote:
            layers[name].set_bits(act_bits=int(target))
        out[name] = {"role": role, "bits_before": bits, "bits_after": q.bits.tolist()}
    raised = [n for n, d in out.items() if d["bits_before"] != d["bits_after"]]
    if raised:
        logger.info(
            "boundary layers kept at %d activation bits (boundary_act_bits): %s", target, ", ".join(raised)
        )
    state.boundary = out
    return out
