"""The sampler hook: reads the timestep the sampler passed, never counts calls."""

import pytest
import torch

import tdq
from tdq import TDQConfig, TimestepAdapter, TimestepGrid
from tdq import testing as T


def _calibrated_growing(num_buckets=10, out_of_range="nearest"):
    model = T.GrowingActivationDenoiser()
    tdq.quantize_(model, TDQConfig(grid=TimestepGrid(num_buckets=num_buckets, out_of_range=out_of_range)))
    with torch.no_grad(), tdq.calibration(model):
        for t in range(0, 1000, 50):
            model(torch.randn(4, 16), torch.tensor(float(t)))
    return model


def test_positional_keyword_scalar_and_tensor():
    model = _calibrated_growing()
    hook = tdq.get_quantization(model).hook
    x = torch.randn(2, 16)
    for call in [
        lambda: model(x, 730),
        lambda: model(x, timestep=730.0),
        lambda: model(x, torch.tensor(730)),
        lambda: model(x, timestep=torch.tensor([730, 730])),
    ]:
        call()
        assert hook.last_value == 730.0
        assert tdq.get_quantization(model).context.bucket == 7


def test_cfg_batch_and_two_calls_per_step():
    """Classifier-free guidance batches cond/uncond in one call; some pipelines call twice per step. Both see the
    real timestep, whatever the number of calls."""
    model = _calibrated_growing()
    state = tdq.get_quantization(model)
    seen = []
    model.register_forward_hook(lambda *a: seen.append(state.context.bucket))
    x = torch.randn(1, 16)
    for t in [950, 650, 250]:
        model(torch.cat([x, x]), torch.tensor(t))  # CFG: one batched call
        model(x, torch.tensor(t))  # second call in the same step
        model(x, torch.tensor(t))
    assert seen == [9, 9, 9, 6, 6, 6, 2, 2, 2]


def test_per_sample_timesteps_use_their_own_bucket():
    model = _calibrated_growing()
    x = torch.randn(2, 16)
    mixed = model(x, torch.tensor([900.0, 100.0]))
    assert tdq.get_quantization(model).context.buckets.tolist() == [9, 1]
    a = model(x[:1], torch.tensor(900.0))
    b = model(x[1:], torch.tensor(100.0))
    torch.testing.assert_close(mixed, torch.cat([a, b]))


def test_remove_hook_restores_fp_and_reinstall():
    model = _calibrated_growing()
    x = torch.randn(3, 16)
    q = model(x, 500)
    tdq.remove_hook(model)
    fp = model(x, 500)
    ref = torch.nn.functional.linear(x * 6, model.proj.weight, model.proj.bias)
    torch.testing.assert_close(fp, ref)
    assert not torch.equal(q, fp)
    tdq.install_hook(model)
    torch.testing.assert_close(model(x, 500), q)


def test_out_of_grid_nearest_and_error():
    model = _calibrated_growing()
    model(torch.randn(1, 16), 5000)
    assert tdq.get_quantization(model).context.bucket == 9
    strict = _calibrated_growing(out_of_range="error")
    with pytest.raises(ValueError, match="outside the calibrated grid"):
        strict(torch.randn(1, 16), 5000)


def test_missing_timestep_argument_is_a_clear_error():
    class NoTime(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, cond):
            return self.lin(x)

    with pytest.raises(tdq.TimestepArgumentError, match="cannot find the timestep argument of NoTime"):
        tdq.quantize_(NoTime())
    # An explicit adapter makes it work.
    model = NoTime()
    tdq.quantize_(model, adapter=TimestepAdapter("cond", 1, "t", 0.0, 1.0))
    with torch.no_grad(), tdq.calibration(model):
        model(torch.randn(2, 4), 0.35)
    assert tdq.get_quantization(model).context.bucket == 3


def test_call_without_timestep_is_a_clear_error():
    model = T.GrowingActivationDenoiser()
    tdq.quantize_(model)
    with pytest.raises(tdq.TimestepArgumentError, match="without its timestep argument 'timestep'"):
        model(torch.randn(1, 16), timestep=None)


def test_uncalibrated_use_names_the_layer():
    model = T.GrowingActivationDenoiser()
    tdq.quantize_(model)
    with pytest.raises(tdq.NotCalibratedError, match="layer 'proj'.*before calibration"):
        model(torch.randn(1, 16), 10)


def test_unreached_buckets_take_nearest_calibrated_range():
    model = T.GrowingActivationDenoiser()
    tdq.quantize_(model)
    with torch.no_grad(), tdq.calibration(model):
        model(torch.randn(4, 16), 950)
        model(torch.randn(4, 16), 50)
    aq = model.proj.act_quantizer
    assert aq.calibrated.all()
    assert aq.max_val[8] == aq.max_val[9] and aq.max_val[2] == aq.max_val[0]
    assert torch.isfinite(model(torch.randn(1, 16), 450)).all()


def test_deepcopy_of_a_quantized_diffusers_model_runs_the_copy():
    """diffusers' hook rewrites `forward` as a closure over the module: a plain deep copy would run the original."""
    import copy

    torch.manual_seed(0)
    m = T.tiny_unet2d()
    tdq.quantize_(m, TDQConfig(grid={"num_buckets": 4}))
    x = torch.randn(2, m.config.in_channels, m.config.sample_size, m.config.sample_size)
    with tdq.calibration(m):
        for t in (10, 400, 900):
            m(x, t)
    ref = m(x, 400).sample
    c = copy.deepcopy(m)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(0.5)  # the copy's own weights must be the ones that run
    calls = tdq.get_quantization(m).context.calls
    out = c(x, 400).sample
    assert not torch.allclose(out, ref)
    assert tdq.get_quantization(m).context.calls == calls  # the original's hook did not run
    assert tdq.get_quantization(c).context.calls > 0
    torch.testing.assert_close(m(x, 400).sample, ref)  # the original still quantizes as before
    with tdq.disabled(c):  # the copy's hook is its own: removing it leaves the original hooked
        c(x, 400)
    assert tdq.get_quantization(m).hook is not None and tdq.get_quantization(c).hook is not None
    torch.testing.assert_close(copy.deepcopy(m)(x, 400).sample, ref)
