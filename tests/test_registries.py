"""Class-keyed registries: adapters and quantized modules follow the class hierarchy (MRO), never class names."""

import logging

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

import tdq
from tdq import testing as T
from tdq.adapters import register_adapter


class MyFlux(FluxTransformer2DModel):
    """A user's subclass of a registered diffusers model."""


def test_subclassed_flux_gets_flux_adapter_and_real_buckets():
    base = T.tiny_flux()
    model = MyFlux.from_config(base.config)
    model.load_state_dict(base.state_dict())
    adapter = tdq.get_adapter(model)
    assert (adapter.units, adapter.t_min, adapter.t_max, adapter.scale) == ("t", 0.0, 1.0, 1.0)

    tdq.quantize_(model, tdq.TDQConfig(grid=tdq.TimestepGrid(num_buckets=4)))
    hook = tdq.get_quantization(model).hook
    seen = []
    for t in (0.05, 0.4, 0.6, 0.95):  # the pipeline passes t in [0, 1]
        bucket, _ = hook.bucket_of(torch.full((2,), t))
        seen.append(bucket)
    assert seen == [0, 1, 2, 3]


def test_registered_adapter_is_inherited():
    class Base(nn.Module):
        def forward(self, x, noise_std):
            return x

    class Child(Base):
        pass

    register_adapter(Base, "noise_std", "sigma", 0.01, 10.0, "log")
    adapter = tdq.get_adapter(Child())
    assert (adapter.arg_name, adapter.units, adapter.t_max, adapter.spacing) == (
        "noise_std",
        "sigma",
        10.0,
        "log",
    )


class ScaledLinear(nn.Linear):
    """A user's subclass of nn.Linear that keeps Linear's forward."""


class LoggingLinear(nn.Linear):
    """A subclass that overrides forward."""

    def forward(self, x):
        return super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ScaledLinear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = LoggingLinear(8, 8)

    def forward(self, x, timestep):
        return self.c(self.b(self.a(x)))


def test_subclassed_linear_is_quantized_and_override_is_logged(caplog):
    torch.manual_seed(0)
    net = Net()
    with caplog.at_level(logging.WARNING, logger="tdq.quant.modules"):
        tdq.quantize_(net, tdq.TDQConfig())
    assert isinstance(net.a, tdq.QuantLinear) and isinstance(net.b, tdq.QuantLinear)
    assert isinstance(net.c, tdq.QuantLinear)
    assert "'c'" in caplog.text and "overrides Linear.forward" in caplog.text
    assert "'a'" not in caplog.text


def test_filter_fn_narrows_selection_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    net = Net()
    tdq.quantize_(net, tdq.TDQConfig(), filter_fn=lambda m, name: name != "b")
    assert [n for n, _ in tdq.iter_quant_layers(net)] == ["a", "c"]
    x = torch.randn(4, 8)
    with torch.no_grad(), tdq.calibration(net):
        for t in (100, 500, 900):
            net(x, t)
    ref = net(x, 500)

    from tdq.serialization import load_quantization, save_quantization

    save_quantization(net, tmp_path)
    fresh = Net()
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if "_quantizer" not in k}, strict=False)
    load_quantization(fresh, tmp_path)
    assert [n for n, _ in tdq.iter_quant_layers(fresh)] == ["a", "c"]
    torch.testing.assert_close(fresh(x, 500), ref, rtol=0, atol=0)
