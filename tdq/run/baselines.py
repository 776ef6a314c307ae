"""Baseline quantizers from other libraries as `tdq run` / `tdq.evaluate` plug-ins (the optional `[baselines]` extra).

- optimum-quanto (`quantize` → `Calibration` on the run's calibration sampler → `freeze`): `quanto-w8a8`,
  `quanto-w4a8` (int8 / int4 weights, int8 activations with one running absmax scale per module across all
  timesteps, quanto's default momentum 0.9) and `quanto-w4` (int4 weights only). Conv and Linear layers.
- torchao (`quantize_` with its configs; they touch `nn.Linear` only, so on a convolutional UNet they quantize a
  small share of the MACs, stated in every report): `torchao-int8-dyn` (int8 weights, dynamic per-token int8
  activations), `torchao-int8-wo` (int8 weights), `torchao-int4-wo` (`Int4WeightOnlyConfig`: its kernels are
  CUDA-only in torchao 0.18, so it fails on the CPU with a message) and `torchao-intx-int4-wo`
  (`IntxWeightOnlyConfig` with int4 per-group weights, which runs on the CPU).

This module imports neither library: each plug-in imports it when called, and the registry checks that it is
installed before a run loads anything (`pip install "tdq[baselines]"` or `make baselines`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tdq.run.quantizers import QuantizerContext, QuantizerUnavailableError, register_quantizer

logger = logging.getLogger(__name__)

INSTALL = 'install the optional extra: pip install --no-deps "tdq[baselines]" (or `make baselines`)'


# ----------------------------------------------------------------------------------------------------
# optimum-quanto


def _quanto(model: nn.Module, ctx: QuantizerContext, weights: str, activations: str | None) -> nn.Module:
    import optimum.quanto as oq

    opts = ctx.take_options(exclude=[], momentum=0.9)
    qtypes = {"qint8": oq.qint8, "qint4": oq.qint4}
    oq.quantize(
        model,
        weights=qtypes[weights],
        activations=qtypes[activations] if activations else None,
        exclude=list(opts["exclude"]) or None,
    )
    if activations:
        with oq.Calibration(momentum=float(opts["momentum"])):
            ctx.calibrate(model)
    oq.freeze(model)
    ctx.notes["library"] = {"optimum-quanto": _version("optimum-quanto")}
    ctx.notes["scheme"] = f"weights {weights} per output channel (int4: groups of up to 128 inputs)" + (
        f", activations {activations} per tensor, one absmax scale per module for all timesteps"
        if activations
        else ""
    )
    return model


@register_quantizer("quanto-w8a8", requires=("optimum.quanto",), install=INSTALL)
def quanto_w8a8(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """optimum-quanto: int8 weights, int8 activations (one calibrated scale per module for all timesteps)."""
    return _quanto(model, ctx, "qint8", "qint8")


@register_quantizer("quanto-w4a8", requires=("optimum.quanto",), install=INSTALL)
def quanto_w4a8(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """optimum-quanto: int4 weights, int8 activations (one calibrated scale per module for all timesteps)."""
    return _quanto(model, ctx, "qint4", "qint8")


@register_quantizer("quanto-w4", requires=("optimum.quanto",), install=INSTALL)
def quanto_w4(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """optimum-quanto: int4 weights only (activations in floating point)."""
    return _quanto(model, ctx, "qint4", None)


# ----------------------------------------------------------------------------------------------------
# torchao


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _torchao(model: nn.Module, ctx: QuantizerContext, config: Any, label: str) -> nn.Module:
    from torchao.quantization import quantize_

    quantize_(model, config)
    ctx.notes["library"] = {"torchao": _version("torchao")}
    ctx.notes["scheme"] = f"{label}; torchao configs quantize nn.Linear layers only"
    return model


@register_quantizer("torchao-int8-dyn", requires=("torchao",), install=INSTALL, quantizes_activations=True)
def torchao_int8_dyn(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """torchao Int8DynamicActivationInt8WeightConfig: int8 weights, dynamic per-token int8 inputs (Linear only)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    ctx.take_options()
    return _torchao(
        model, ctx, Int8DynamicActivationInt8WeightConfig(), "int8 per-channel weights, dynamic int8 inputs"
    )


@register_quantizer("torchao-int8-wo", requires=("torchao",), install=INSTALL)
def torchao_int8_wo(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """torchao Int8WeightOnlyConfig: int8 per-channel weights (Linear only)."""
    from torchao.quantization import Int8WeightOnlyConfig

    ctx.take_options()
    return _torchao(model, ctx, Int8WeightOnlyConfig(), "int8 per-channel weights only")


class _Bf16Linear:
    """Forward hooks: run a bfloat16-weight Linear on float32 inputs (cast in, cast the output back)."""

    @staticmethod
    def install(module: nn.Linear) -> None:
        def pre(mod, args):
            return (args[0].to(torch.bfloat16), *args[1:])

        def post(mod, args, out):
            return out.to(torch.float32)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


@register_quantizer("torchao-int4-wo", requires=("torchao",), install=INSTALL)
def torchao_int4_wo(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """torchao Int4WeightOnlyConfig: int4 weights in groups of 128 inputs (Linear only; CUDA kernels only)."""
    from torchao.quantization import Int4WeightOnlyConfig

    opts = ctx.take_options(group_size=128)
    if ctx.device.type != "cuda":
        raise QuantizerUnavailableError(
            f"quantizer 'torchao-int4-wo' cannot run on {ctx.device}: torchao {_version('torchao')}'s "
            "Int4WeightOnlyConfig has no CPU kernel (packing 'plain'/'preshuffled' need the mslk CUDA kernels, "
            "'tile_packed_to_4d' needs CUDA and bfloat16, 'plain_int32' has no CPU path). Run it with device=cuda, "
            "or use quantizer=torchao-intx-int4-wo (IntxWeightOnlyConfig, int4 per-group weights, runs on the CPU)."
        )
    # tinygemm's int4 kernel (tile_packed_to_4d) takes bfloat16 weights and inputs: the quantized Linear layers
    # get bfloat16 weights and cast their float32 inputs and outputs. Not run here (no GPU on the build machine).
    linears = [
        m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features % opts["group_size"] == 0
    ]
    for m in linears:
        m.to(torch.bfloat16)
    out = _torchao(
        model,
        ctx,
        Int4WeightOnlyConfig(group_size=int(opts["group_size"]), int4_packing_format="tile_packed_to_4d"),
        f"int4 weights in groups of {opts['group_size']} (tinygemm, bfloat16)",
    )
    for m in linears:
        _Bf16Linear.install(m)
    return out


@register_quantizer("torchao-intx-int4-wo", requires=("torchao",), install=INSTALL)
def torchao_intx_int4_wo(model: nn.Module, ctx: QuantizerContext) -> nn.Module:
    """torchao IntxWeightOnlyConfig(int4): int4 symmetric weights in groups of 32 inputs (Linear only; runs on CPU)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    opts = ctx.take_options(group_size=32)
    g = int(opts["group_size"])
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % g]
    if skipped:  # torchao would fail on them: keep them in floating point (reported as not quantized)
        logger.warning(
            "torchao-intx-int4-wo: %d Linear layers have in_features not divisible by %d", len(skipped), g
        )
    cfg = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g))
    from torchao.quantization import quantize_

    quantize_(model, cfg, filter_fn=lambda m, name: isinstance(m, nn.Linear) and m.in_features % g == 0)
    ctx.notes["library"] = {"torchao": _version("torchao")}
    ctx.notes["scheme"] = (
        f"int4 symmetric weights in groups of {g} (IntxWeightOnlyConfig); Linear layers only"
    )
    return model
