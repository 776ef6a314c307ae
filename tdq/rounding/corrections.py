"""Diffusion-specific corrections of the quantization error, per timestep bucket.

- **Per-layer bias correction** (`fit_bias_correction_`): for every quantized layer and bucket `k`, the mean output
  error of its quantized weight on the FP model's calibration inputs of that bucket, `(W_q - W) E_k[x]`, is removed
  by a per-bucket output bias (buffer `bucket_bias` of shape `[K, C_out]` on the layer, added by a forward hook).
- **PTQD-style output correction** (`fit_output_correction`): at the denoiser output, per bucket `k`, the quantized
  prediction is modelled as `eps_q = (1 + k_k) eps_fp + b_k + noise` on the calibration trajectories (least
  squares over every element of the bucket's calls, `b_k` per output channel); the correction divides the
  correlated part out and removes the mean bias: `eps = (eps_q - b_k) / (1 + k_k)`.

Both run only while the model's timestep hook is active (quantized mode); `tdq.disabled(model)` is unaffected.
Both are part of the saved state (`tdq.serialization.save_quantization`): the per-layer biases as the layers'
`bucket_bias` buffers, the output correction as `OUTPUT_CORRECTION_KEY.gain` / `.bias` tensors; loading installs
them again (`install_bias_correction`, `install_output_correction`), also on the integer backends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tdq.api import get_quantization, iter_quant_layers
from tdq.rounding.calib_stats import LayerStats


def _bucket_index(ctx, n: int, device) -> torch.Tensor | int | None:
    if not ctx.active:
        return None
    if ctx.bucket is not None:
        return ctx.bucket
    if ctx.buckets is None:
        return None
    b = ctx.buckets.to(device)
    return b.repeat_interleave(n // b.shape[0]) if n != b.shape[0] else b


OUTPUT_CORRECTION_ATTR = "_tdq_output_correction"
OUTPUT_CORRECTION_KEY = "_tdq_output_correction"  # tensor name prefix in saved states


def _bias_hook(module, args, output):
    k = _bucket_index(module.context, output.shape[0], output.device)
    if k is None:
        return output
    bias = module.bucket_bias[k].to(output.dtype)  # [C] or [B, C]
    is_conv = getattr(module, "is_conv", isinstance(module, nn.Conv2d))  # integer-backend modules say is_conv
    if output.dim() > 2 and is_conv:  # channels at dim 1
        shape = (-1, bias.shape[-1]) + (1,) * (output.dim() - 2)
        return output + bias.reshape(shape if bias.dim() == 2 else shape[1:])
    if bias.dim() == 2 and output.dim() > 2:  # per-sample bias, linear over [B, ..., C]
        return output + bias.reshape(bias.shape[0], *([1] * (output.dim() - 2)), bias.shape[1])
    return output + bias


@torch.no_grad()
def fit_bias_correction_(
    model: nn.Module, stats: dict[str, LayerStats], fp_weights: dict[str, torch.Tensor]
) -> dict[str, float]:
    """
    Fit and install the per-layer, per-bucket output bias correction.

    Args:
        model (`nn.Module`): the quantized model (weights already rounded).
        stats (`dict[str, LayerStats]`): FP-model input statistics (per-bucket mean input rows).
        fp_weights (`dict[str, torch.Tensor]`): each layer's weight before rounding.

    Returns:
        `dict[str, float]`: per corrected layer, the largest absolute bias.
    """
    out = {}
    for name, m in iter_quant_layers(model):
        st = stats.get(name)
        if st is None or name not in fp_weights:
            continue
        w_fp = fp_weights[name].reshape(fp_weights[name].shape[0], -1).double()
        w_q = m.weight_quantizer(m.weight.detach()).reshape(w_fp.shape).double()
        bias = -(st.bucket_means().to(w_fp.device) @ (w_q - w_fp).T)  # [K, C_out]
        install_bias_correction(m, bias.to(m.weight.dtype))
        out[name] = float(bias.abs().max())
    return out


@torch.no_grad()
def install_bias_correction(module: nn.Module, bias: torch.Tensor) -> None:
    """
    Set a quantized layer's per-bucket output bias correction (buffer `bucket_bias` `[K, C_out]` plus its forward
    hook), replacing any previous one.

    Raises `ValueError` naming the layer if the shape does not match its buckets and output channels or a value is
    not finite.
    """
    k = module.act_quantizer.num_buckets
    c = module.weight_shape[0] if hasattr(module, "weight_shape") else module.weight.shape[0]
    name = getattr(module, "layer_name", "")
    if tuple(bias.shape) != (k, c):
        raise ValueError(f"layer {name!r}: bucket_bias must have shape [{k}, {c}], got {list(bias.shape)}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"layer {name!r}: bucket_bias holds NaN/inf")
    if module._buffers.get("bucket_bias") is not None:
        module.bucket_bias = bias.to(module.bucket_bias.device).clone()
    else:
        module.register_buffer("bucket_bias", bias.clone())
    if not any(h is _bias_hook for h in module._forward_hooks.values()):
        module.register_forward_hook(_bias_hook)


def remove_bias_correction(module: nn.Module) -> None:
    """Remove a layer's per-bucket output bias correction (buffer and hook), if any."""
    module._buffers.pop("bucket_bias", None)
    for hid in [i for i, h in module._forward_hooks.items() if h is _bias_hook]:
        del module._forward_hooks[hid]


class OutputCorrection:
    r"""
    PTQD-style correction at the denoiser output, one `(1 + k, b)` per timestep bucket (a forward hook).

    Attributes:
        gain (`torch.Tensor`): `1 + k` per bucket, `[K]`.
        bias (`torch.Tensor`): mean bias per bucket and output channel, `[K, C]`.
    """

    def __init__(self, model: nn.Module, gain: torch.Tensor, bias: torch.Tensor):
        self.context = get_quantization(model).context
        self.gain = gain
        self.bias = bias
        self._model = model
        self._handle = model.register_forward_hook(self._hook)
        object.__setattr__(model, OUTPUT_CORRECTION_ATTR, self)

    def _hook(self, module, args, output):
        eps = (
            output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
        )
        k = _bucket_index(self.context, eps.shape[0], eps.device)
        if k is None:
            return output
        shape = (-1, eps.shape[1]) + (1,) * (eps.dim() - 2)
        g = self.gain[k].to(eps.dtype)
        b = self.bias[k].to(eps.dtype)
        corrected = (eps - b.reshape(shape if b.dim() == 2 else shape[1:])) / (
            g.reshape(-1, *([1] * (eps.dim() - 1))) if g.dim() == 1 else g
        )
        if hasattr(output, "sample"):
            output.sample = corrected
            return output
        if isinstance(output, tuple):
            return (corrected, *output[1:])
        return corrected

    def remove(self) -> None:
        """Remove the correction."""
        self._handle.remove()
        if getattr(self._model, OUTPUT_CORRECTION_ATTR, None) is self:
            object.__delattr__(self._model, OUTPUT_CORRECTION_ATTR)


def get_output_correction(model: nn.Module) -> OutputCorrection | None:
    """The PTQD-style output correction installed on `model`, or `None`."""
    return getattr(model, OUTPUT_CORRECTION_ATTR, None)


def install_output_correction(model: nn.Module, gain: torch.Tensor, bias: torch.Tensor) -> OutputCorrection:
    """
    Install a PTQD-style output correction with the given per-bucket `gain` `[K]` and `bias` `[K, C]` (e.g. from a
    saved state), replacing any installed one.

    Raises `ValueError` if the shapes do not match the model's buckets or a value is not finite or a gain is not
    positive.
    """
    k = get_quantization(model).grid.num_buckets
    if gain.dim() != 1 or gain.shape[0] != k or bias.dim() != 2 or bias.shape[0] != k:
        raise ValueError(
            f"output correction: gain must be [{k}] and bias [{k}, C], got {list(gain.shape)} and {list(bias.shape)}"
        )
    if not (bool(torch.isfinite(gain).all()) and bool(torch.isfinite(bias).all()) and bool((gain > 0).all())):
        raise ValueError("output correction: gains must be finite and positive, biases finite")
    old = get_output_correction(model)
    if old is not None:
        old.remove()
    return OutputCorrection(model, gain.float().clone(), bias.float().clone())


@torch.no_grad()
def fit_output_correction(
    model: nn.Module,
    run: Callable[[], object],
    fp_weights: dict[str, torch.Tensor],
    min_gain: float = 0.5,
) -> tuple[OutputCorrection, dict]:
    """
    Fit the PTQD-style output correction on the quantized model's calibration trajectories and install it.

    Every denoiser call of `run()` is computed twice on the same input: quantized, and in floating point with the
    weights before rounding (`fp_weights`).

    Args:
        model (`nn.Module`): the quantized, calibrated model.
        run (`Callable[[], object]`): runs the real sampler over `model` (calibration seeds).
        fp_weights (`dict[str, torch.Tensor]`): each layer's weight before rounding.
        min_gain (`float`, *optional*, defaults to `0.5`): gains are clamped to `[min_gain, 1 / min_gain]`.

    Returns:
        `(OutputCorrection, dict)`: the installed correction and per bucket `gain`, mean `|bias|`, calls.
    """
    state = get_quantization(model)
    ctx = state.context
    kk = state.grid.num_buckets
    layers = dict(iter_quant_layers(model))
    acc = {}
    busy = [False]

    def hook(module, args, kwargs, output):
        if busy[0] or not ctx.active or ctx.bucket is None:
            return None
        eps_q = (output.sample if hasattr(output, "sample") else output).detach().double()
        bucket = ctx.bucket
        busy[0] = True
        saved = {n: layers[n].weight.data for n in fp_weights}
        try:
            for n, w in fp_weights.items():
                layers[n].weight.data = w
            ctx.active = False
            out_fp = module(*args, **kwargs)
        finally:
            ctx.active = True
            for n, w in saved.items():
                layers[n].weight.data = w
                layers[n]._wq_cache = None
            busy[0] = False
        eps_f = (out_fp.sample if hasattr(out_fp, "sample") else out_fp).detach().double()
        c = eps_q.shape[1]
        a = acc.setdefault(
            bucket,
            {
                "n": 0,
                "qf": 0.0,
                "ff": 0.0,
                "q": torch.zeros(c, dtype=torch.float64),
                "f": torch.zeros(c, dtype=torch.float64),
                "calls": 0,
            },
        )
        dims = [d for d in range(eps_q.dim()) if d != 1]
        per_c = eps_q.numel() // c
        # centre per channel later: keep sums
        a["qf"] += float((eps_q * eps_f).sum())
        a["ff"] += float((eps_f * eps_f).sum())
        a["q"] += eps_q.sum(dims).cpu()
        a["f"] += eps_f.sum(dims).cpu()
        a["n"] += per_c
        a["calls"] += 1
        return None

    h = model.register_forward_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        h.remove()
    c = next(iter(acc.values()))["q"].shape[0] if acc else 1
    gain = torch.ones(kk, dtype=torch.float64)
    bias = torch.zeros(kk, c, dtype=torch.float64)
    for k, a in acc.items():
        n = a["n"]
        mq, mf = a["q"] / n, a["f"] / n
        # least squares with a per-channel intercept: slope from the channel-centred cross moments
        cov = a["qf"] - float((mq * mf).sum() * n)
        var = a["ff"] - float((mf * mf).sum() * n)
        g = cov / var if var > 0 else 1.0
        gain[k] = min(max(g, min_gain), 1.0 / min_gain)
        bias[k] = mq - gain[k] * mf
    seen = sorted(acc)
    for k in range(kk):  # buckets without calls take the nearest seen bucket's correction
        if k not in acc and seen:
            j = min(seen, key=lambda s: (abs(s - k), s))
            gain[k], bias[k] = gain[j], bias[j]
    report = {
        "gain": [round(float(g), 5) for g in gain],
        "mean_abs_bias": [round(float(b.abs().mean()), 6) for b in bias],
        "calls": [acc[k]["calls"] if k in acc else 0 for k in range(kk)],
    }
    old = get_output_correction(model)
    if old is not None:  # fitted on top of an installed correction: compose the two into one
        g_old, b_old = old.gain.double(), old.bias.double()
        bias = b_old + g_old.unsqueeze(1) * bias
        gain = g_old * gain
        report["composed_with_previous"] = True
    corr = install_output_correction(model, gain.float(), bias.float())
    return corr, report
