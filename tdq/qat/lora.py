"""Float LoRA adapters for QAT: `y = qlayer(x) + B(A(x))` on a quantized Conv2d/Linear, kept in floating point.

LoRA is simulated only: the adapters run in float beside the quantized layer while fine-tuning and, after
`finetune_qat`, stay attached through `attach_lora` (a forward wrapper). They are saved with the QAT state
(`lora.safetensors` + JSON by `save_lora`), not by `tdq.save_quantization`, and the integer backends cannot run
them: `check_no_lora` raises naming the layer.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch import nn

LORA_ATTR = "_qat_lora"


class LoRA(nn.Module):
    r"""
    A rank-`r` float adapter `B(A(x))` with `B` initialised to zero (the adapted layer starts unchanged).

    Args:
        a (`nn.Module`): down projection (Linear `in -> r`, or a Conv2d with the layer's kernel, stride, padding).
        b (`nn.Module`): up projection (Linear `r -> out`, or a 1x1 Conv2d).
    """

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    @classmethod
    def for_layer(cls, layer: nn.Module, rank: int) -> LoRA:
        """The adapter of `layer` (a Conv2d with `groups=1` or a Linear) at `rank` (fixed init, seed 0)."""
        g = torch.Generator().manual_seed(0)
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"layer {getattr(layer, 'layer_name', '')!r}: LoRA needs groups=1")
            a = nn.Conv2d(
                layer.in_channels,
                rank,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                bias=False,
            )
            b = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            a = nn.Linear(layer.in_features, rank, bias=False)
            b = nn.Linear(rank, layer.out_features, bias=False)
        with torch.no_grad():
            fan_in = a.weight[0].numel()
            a.weight.copy_(torch.randn(a.weight.shape, generator=g) / fan_in**0.5)
            b.weight.zero_()
        return cls(a, b).to(layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`B(A(x))`."""
        return self.b(self.a(x))


def _lora_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = type(self).forward(self, x)
    if not self.context.active:
        return y
    return y + self.__dict__[LORA_ATTR](x)


def attach_lora(model: nn.Module, adapters: dict[str, LoRA]) -> None:
    """Keep `adapters` (layer name -> LoRA) running beside their quantized layers (when quantization is active)."""
    mods = dict(model.named_modules())
    for name, lora in adapters.items():
        if name not in mods:
            raise KeyError(f"LoRA adapter for unknown layer {name!r}")
        m = mods[name]
        m.__dict__[LORA_ATTR] = lora
        m.forward = types.MethodType(_lora_forward, m)


def lora_adapters(model: nn.Module) -> dict[str, LoRA]:
    """The LoRA adapters attached to `model`'s layers, by layer name."""
    return {n: m.__dict__[LORA_ATTR] for n, m in model.named_modules() if LORA_ATTR in m.__dict__}


def check_no_lora(model: nn.Module, what: str = "this operation") -> None:
    """Raise `NotImplementedError` naming the first layer with a LoRA adapter (simulated only)."""
    names = list(lora_adapters(model))
    if names:
        raise NotImplementedError(
            f"layer {names[0]!r} has a float LoRA adapter from QAT (qat.lora_rank > 0); LoRA is simulated only and "
            f"{what} cannot run it; fine-tune with qat.lora_rank=0 for saved states and integer backends"
        )


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write the attached adapters to `directory/lora.safetensors` + `lora.json` (rank and layer kinds)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ads = lora_adapters(model)
    tensors = {
        f"{n}.{k}": v.detach().contiguous().cpu() for n, lo in ads.items() for k, v in lo.state_dict().items()
    }
    save_file(tensors, str(d / "lora.safetensors"))
    meta = {n: {"rank": int(lo.a.weight.shape[0]), "kind": type(lo.a).__name__} for n, lo in ads.items()}
    (d / "lora.json").write_text(json.dumps(meta, indent=1))


def load_lora(model: nn.Module, directory: str | Path) -> None:
    """Rebuild and attach the adapters saved by `save_lora` on `model` (a quantized model with the same layers)."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / "lora.json").read_text())
    tensors = load_file(str(d / "lora.safetensors"))
    mods = dict(model.named_modules())
    adapters = {}
    for name, info in meta.items():
        if name not in mods:
            raise KeyError(f"{d / 'lora.json'}: LoRA adapter for unknown layer {name!r}")
        lo = LoRA.for_layer(mods[name], int(info["rank"])).to(mods[name].weight.device)
        lo.load_state_dict({k: tensors[f"{name}.{k}"] for k in lo.state_dict()})
        adapters[name] = lo
    attach_lora(model, adapters)
