"""Seed-survey analyses: ablation curves, error propagation, Hutchinson Hessian trace, rank correlation."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from tdq.eval.analysis import (
    layer_ablation,
    predicted_ablation,
    quantize_layer,
    rank_correlation,
    step_error_propagation,
)
from tdq.eval.analysis_plots import plot_ablation, plot_prediction_scatter, plot_propagation
from tdq.mixed_precision.hutchinson import hutchinson_sensitivity, hutchinson_trace
from tdq.sampling import DiffusionSampler
from tdq.testing import tiny_unet2d


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(_one_thread):
    torch.manual_seed(0)
    unet = tiny_unet2d().eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    sampler = DiffusionSampler(unet, sched, shape, num_inference_steps=4, batch_size=2, progress=False)
    return unet, sampler


def _convs(unet):
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_ablation_error_decreases_with_bits(setup, tmp_path):
    unet, sampler = setup
    layers = _convs(unet)[:2]
    res = layer_ablation(unet, sampler, layers, [3, 5, 8], [0, 1])
    for row in res["mse"]:
        # more bits, less error, by a clear factor each time (rounding noise shrinks ~4x per bit)
        assert row[0] > 2 * row[1] > 0
        assert row[1] > 2 * row[2] > 0
    # the layer is restored exactly: FP samples are unchanged after the ablation
    before = sampler([0]).images
    with quantize_layer(unet.get_submodule(layers[0]), 4):
        assert not torch.equal(sampler([0]).images, before)
    torch.testing.assert_close(sampler([0]).images, before, rtol=0, atol=0)
    png = plot_ablation(res, tmp_path / "ablation.png")
    from PIL import Image

    assert Image.open(png).size[0] > 300
    with pytest.raises(ValueError, match="bits"):
        layer_ablation(unet, sampler, layers, [1], [0])
    with pytest.raises(KeyError, match="nope"):
        layer_ablation(unet, sampler, ["nope"], [4], [0])


def test_injected_perturbation_is_linear(setup, tmp_path):
    unet, sampler = setup
    layer = unet.get_submodule(_convs(unet)[1])
    small = step_error_propagation(sampler, [0, 1], lambda: quantize_layer(layer, 3), inject_scale=0.05)
    double = step_error_propagation(sampler, [0, 1], lambda: quantize_layer(layer, 3), inject_scale=0.1)
    # J_t e_t = effect / alpha: doubling the injection doubles the effect, so the gains agree
    for a, b in zip(small["propagated"], double["propagated"], strict=True):
        assert a > 0
        assert b == pytest.approx(a, rel=0.01)
    # the first-order sum predicts the measured drift of the quantized run (measured: 0.050 vs 0.051, cosine 0.97)
    assert small["cosine"] > 0.9
    assert small["accumulated"] == pytest.approx(small["measured_drift"], rel=0.25)
    assert small["bound"] >= small["accumulated"] * (1 - 1e-9)
    plot_propagation(small, tmp_path / "prop.png")


def test_hutchinson_converges_to_exact_trace():
    torch.manual_seed(0)
    a = torch.randn(6, 6)
    h = a @ a.T + torch.diag(torch.arange(6.0))  # Hessian of the quadratic 0.5 xᵀ H x
    x = torch.randn(6, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    m = torch.randn(12, 12)
    hw = m @ m.T

    def loss():
        return 0.5 * x @ h @ x + 0.5 * w.reshape(-1) @ hw @ w.reshape(-1) + (x[:3] * w[:, 0]).sum()

    est = hutchinson_trace(loss, [x, w], probes=1000, seed=1)
    exact = torch.tensor([h.trace(), hw.trace()], dtype=torch.float64)
    torch.testing.assert_close(est, exact, rtol=0.08, atol=0)
    few = hutchinson_trace(loss, [x, w], probes=2, seed=1)
    # the error shrinks with probes
    assert (est - exact).abs().sum() < (few - exact).abs().sum()
    with pytest.raises(ValueError, match="probes"):
        hutchinson_trace(loss, [x], probes=0)


def test_hutchinson_profile_of_a_layer_matches_exact_hessian():
    # one linear layer and an x0-predicting family: the loss is quadratic in the weight, its Hessian is exact
    torch.manual_seed(0)
    lin = nn.Linear(4, 4, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, t):
            return self.lin(x)

    net = Net()
    x0 = torch.randn(4, 4)
    grid = {"units": "train_timestep", "num_buckets": 1, "t_min": 0.0, "t_max": 999.0}
    prof = hutchinson_sensitivity(
        net, DDPMScheduler(), x0, grid, samples_per_bucket=4, batch_size=4, probes=800, seed=0
    )
    assert prof.layers == ["lin"] and prof.meta["estimator"] == "hutchinson"
    # epsilon loss per sample mean_j (W x_t − ε)_j²: its Hessian in the layer input x_t is (2/4) WᵀW, so the
    # per-sample trace is ‖W‖_F² / 2 whatever noise level was drawn
    exact_act = 0.5 * float(lin.weight.detach().pow(2).sum())
    assert float(prof.act_fisher[0, 0]) == pytest.approx(exact_act, rel=0.1)


def test_rank_correlation():
    same = rank_correlation([1, 2, 3, 4, 5], [1, 4, 9, 100, 1000])  # same ranking, not linear
    assert same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["n"] == 5
    rev = rank_correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert rev["spearman"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="measured has 2"):
        rank_correlation([1, 2, 3], [1, 2])


def test_predicted_ablation_and_scatter(setup, tmp_path):
    unet, sampler = setup
    from tdq.mixed_precision.fisher import profile_sensitivity

    x0 = torch.rand(2, *sampler.model_shape) * 2 - 1
    grid = {"units": "train_timestep", "num_buckets": 2, "t_min": 0.0, "t_max": 999.0}
    prof = profile_sensitivity(
        unet, DDPMScheduler(), x0, grid, layers=_convs(unet)[:3], samples_per_bucket=2, progress=False
    )
    pred = predicted_ablation(prof, [4, 8])
    for row in pred["predicted"]:
        assert row[0] == pytest.approx(row[1] * (255 / 15) ** 2)  # the noise model: (2^b − 1)^-2
    plot_prediction_scatter([1, 2, 3], [1, 3, 2], tmp_path / "s.png", labels=["a", "b", "c"])
