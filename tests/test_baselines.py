"""The optional `[baselines]` plug-ins (optimum-quanto, torchao) through `tdq.evaluate`; skipped without the extra."""

from __future__ import annotations

import pytest
import torch
from test_evaluate import SMALL
from torch import nn

import tdq
from tdq.run import quantizers

pytestmark = pytest.mark.usefixtures("one_thread")


def _fp_linear_share() -> tuple[float, list[str]]:
    """Share of the run's tiny UNet's Conv/Linear MACs in nn.Linear layers (counted here, not by tdq), and the
    Linear layers whose in_features are not a multiple of 32."""
    from tdq.testing import tiny_unet2d

    model = tiny_unet2d(sample_size=16)
    macs = {}

    def hook(mod, args, out):
        per_output = (
            mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels * 9
        )  # 3x3 convs, groups 1
        macs[mod] = (out.numel() * per_output, isinstance(mod, nn.Linear))

    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            assert isinstance(m, nn.Linear) or (m.kernel_size in ((3, 3), (1, 1)) and m.groups == 1)
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
                m.register_forward_hook(
                    lambda mod, a, out: macs.__setitem__(mod, (out.numel() * mod.in_channels, False))
                )
            else:
                m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16), torch.tensor([500]))
    total = sum(v for v, _ in macs.values())
    odd = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % 32]
    return sum(v for v, lin in macs.values() if lin) / total, odd


@pytest.mark.parametrize("name", ["quanto-w8a8", "quanto-w4a8", "quanto-w4"])
def test_quanto(name, tmp_path):
    pytest.importorskip("optimum.quanto")
    out = tdq.evaluate(name, config=SMALL, run_dir=tmp_path)
    q = out["quantizer"]
    assert q["mac_share_weights"] == 1.0 and q["layers_quantized"] == q["layers_total"]
    assert q["mac_share_activations"] == (0.0 if name == "quanto-w4" else 1.0)
    assert all(how.startswith("quanto Q") for how in q["quantized_as"])
    assert q["library"]["optimum-quanto"] and q["nonfinite_samples"] == 0
    # quantized, not a no-op, and the 8-bit weights lose less than the 4-bit ones (measured: 38.5 vs 18 dB)
    assert 0 < out["psnr"] < 60 and out["drift"][-1] > 0
    assert (out["psnr"] > 30) == (name == "quanto-w8a8")


@pytest.mark.parametrize("name", ["torchao-int8-dyn", "torchao-int8-wo", "torchao-intx-int4-wo"])
def test_torchao_quantizes_linear_layers_only(name, tmp_path):
    pytest.importorskip("torchao")
    out = tdq.evaluate(name, config=SMALL, run_dir=tmp_path)
    q = out["quantizer"]
    share, odd = _fp_linear_share()
    assert 0 < share < 0.5 and odd
    linear_layers = q["layers_total"] - sum("conv" in n for n in q["layers_not_quantized"])
    if name == "torchao-intx-int4-wo":  # groups of 32 inputs: Linear layers with other widths stay in float
        assert 0 < q["mac_share_weights"] < share and set(odd) <= set(q["layers_not_quantized"])
    else:
        assert q["mac_share_weights"] == pytest.approx(share) and q["layers_quantized"] == linear_layers
    assert q["mac_share_activations"] == (q["mac_share_weights"] if name == "torchao-int8-dyn" else 0.0)
    assert 0 < out["psnr"] < 80 and out["drift"][-1] > 0


def test_torchao_int4_fails_on_cpu_with_a_message():
    pytest.importorskip("torchao")
    with pytest.raises(quantizers.QuantizerUnavailableError, match="cannot run on cpu.*torchao-intx-int4-wo"):
        tdq.evaluate("torchao-int4-wo", config=SMALL)
