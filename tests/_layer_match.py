"""Checks that an integer-backend model computes what the simulator computes, layer by layer (shared by the backend,
QAT and rounding tests)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from tdq.quant.backends import backend_info
from tdq.testing import output_tensor


def close(out, ref):
    """Equal up to accumulation order (int32 sums are exact; the float epilogue rounds differently)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def assert_layers_match(real: nn.Module, sim: nn.Module, inputs: dict) -> None:
    """
    Every converted layer of `real`, run inside the model, equals the simulated layer of `sim` fed the same input.

    Whole-model outputs cannot be compared at the accumulation-order tolerance: a 1e-6 difference in one layer's input
    can move one activation code across a rounding boundary, and that one-LSB step cascades. On the random tiny UNet
    the correct backend differs from the simulator by up to 1.8 % (relative L2, t=480, AMX Xeon) while a zero point off
    by one differs by 2.1 %, so a whole-output bound cannot tell them apart. Feeding each simulated layer the input that
    its real twin saw removes the cascade and leaves the kernel's own difference.
    """
    names = set(backend_info(real)["layers"])
    seen = defaultdict(list)
    hooks = [
        m.register_forward_hook(
            lambda m, a, o, n=n: seen[n].append((a[0].detach().clone(), o.detach().clone()))
        )
        for n, m in real.named_modules()
        if n in names
    ]
    try:
        with torch.no_grad():
            output_tensor(real(**inputs))
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == names  # every converted layer ran

    used = defaultdict(int)

    def feed(m, args, n):
        return (seen[n][used[n]][0], *args[1:])

    def check(m, args, out, n):
        try:
            close(seen[n][used[n]][1], out)
        except AssertionError as e:
            raise AssertionError(
                f"layer {n!r} (call {used[n]}): real kernel != simulator on the same input"
            ) from e
        used[n] += 1

    sim_mods = dict(sim.named_modules())
    hooks = []
    for n in names:
        hooks.append(sim_mods[n].register_forward_pre_hook(lambda m, a, n=n: feed(m, a, n)))
        hooks.append(sim_mods[n].register_forward_hook(lambda m, a, o, n=n: check(m, a, o, n)))
    try:
        with torch.no_grad():
            output_tensor(sim(**inputs))
    finally:
        for h in hooks:
            h.remove()
    assert {n: used[n] for n in names} == {n: len(v) for n, v in seen.items()}
