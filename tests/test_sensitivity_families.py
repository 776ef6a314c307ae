"""Fisher profiles for every scheduler family: DDPM-type, EDM/σ (scheduler or plain f(x, sigma)), flow matching."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

import tdq
from tdq import testing as T
from tdq.mixed_precision import PrecisionBudget, plan_precision, profile_sensitivity
from tdq.mixed_precision.families import DDPMFamily, EDMFamily, FlowMatchingFamily


class Recorder:
    """forward_fn that records what the model was called with."""

    def __init__(self, call):
        self.call = call
        self.seen = []

    def __call__(self, model, x_t, t):
        self.seen.append((x_t.detach().clone(), torch.as_tensor(t).detach().clone()))
        return self.call(model, x_t, t)


def _plan(profile):
    schedule = plan_precision(profile, PrecisionBudget(avg_act_bits=6, avg_weight_bits=6))
    assert schedule.act_bits.shape == (len(profile.layers), profile.num_buckets)
    return schedule


def test_plain_sigma_model_edm_family():
    model = T.ToySigmaDenoiser()
    grid = tdq.TimestepGrid(units="sigma", t_min=0.01, t_max=80.0, num_buckets=4, spacing="log")
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    rec = Recorder(lambda m, x, s: m(x, s))
    profile = profile_sensitivity(model, None, x0, grid, samples_per_bucket=4, forward_fn=rec, progress=False)
    assert profile.meta["noise_family"]["family"] == "edm"
    edges = grid.edges().tolist()
    for k, (lo, hi) in enumerate(profile.meta["timestep_ranges"]):
        assert edges[k] <= lo <= hi <= edges[k + 1]
    # x = x0 + σ ε: at the largest σ the input is dominated by noise of std σ
    x_t, sigma = rec.seen[-1]
    assert float(sigma.min()) > edges[-2]
    assert x_t.std().item() == pytest.approx(float(sigma.mean()), rel=0.5)
    assert torch.isfinite(profile.act_fisher).all() and (profile.act_fisher > 0).all()
    _plan(profile)


def test_edm_scheduler_preconditions_the_raw_network():
    unet = T.tiny_unet2d()
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0)
    x0 = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    x0 = torch.nn.functional.interpolate(x0, size=unet.config.sample_size)
    rec = Recorder(lambda m, x, t: m(x, t).sample)
    grid = tdq.TimestepGrid(units="sigma", num_buckets=3, spacing="log")
    profile = profile_sensitivity(unet, sched, x0, grid, samples_per_bucket=2, forward_fn=rec, progress=False)
    assert profile.grid["t_min"] == pytest.approx(0.002) and profile.grid["t_max"] == pytest.approx(80.0)
    assert profile.meta["noise_family"] == {"family": "edm", "sigma_data": 0.5, "preconditioned": True}
    # the raw network gets c_in·x (unit variance) and c_noise = log(σ)/4, not σ itself
    x_in, c_noise = rec.seen[-1]
    assert float(c_noise.max()) <= math.log(80.0) / 4 + 1e-5
    assert x_in.std().item() < 2.0
    _plan(profile)


def test_flow_matching_sd3():
    model = T.tiny_sd3()
    sched = FlowMatchEulerDiscreteScheduler()
    inputs = T.denoiser_inputs(model, batch=2)
    x0 = inputs["hidden_states"]

    def call(m, x, t):
        return m(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=inputs["encoder_hidden_states"][: x.shape[0]],
            pooled_projections=inputs["pooled_projections"][: x.shape[0]],
        ).sample

    rec = Recorder(call)
    grid = tdq.TimestepGrid(num_buckets=4)  # auto: the SD3 adapter's t in [0, 1]
    profile = profile_sensitivity(
        model, sched, x0, grid, samples_per_bucket=2, forward_fn=rec, progress=False
    )
    assert profile.meta["noise_family"]["family"] == "flow_matching"
    assert profile.grid["units"] == "t"
    # SD3 takes t × 1000 (the adapter's scale): the last bucket's timesteps are in [750, 1000]
    _, t_raw = rec.seen[-1]
    assert 750 <= float(t_raw.min()) <= float(t_raw.max()) <= 1000
    assert torch.isfinite(profile.act_fisher).all() and (profile.act_fisher > 0).any()
    _plan(profile)


def test_family_selection_and_forward_processes():
    ddim = DDIMScheduler(num_train_timesteps=1000)
    fam = tdq.mixed_precision.families.noise_family(ddim, "train_timestep", lambda: torch.arange(1000.0))
    assert isinstance(fam, DDPMFamily)
    assert isinstance(
        tdq.mixed_precision.families.noise_family(FlowMatchEulerDiscreteScheduler(), "t"), FlowMatchingFamily
    )
    assert isinstance(tdq.mixed_precision.families.noise_family(EDMEulerScheduler(), "sigma"), EDMFamily)
    with pytest.raises(ValueError, match="grid units 'sigma'"):
        tdq.mixed_precision.families.noise_family(None, "train_timestep")
    x0, eps = torch.ones(3, 2), torch.full((3, 2), 2.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(FlowMatchingFamily().noised(x0, eps, t)[:, 0], torch.tensor([1.0, 1.5, 2.0]))
    torch.testing.assert_close(EDMFamily().noised(x0, eps, t)[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    w = EDMFamily(sigma_data=0.5).weight(torch.tensor([0.5]))
    assert float(w) == pytest.approx((0.25 + 0.25) / (0.25 * 0.25))


def test_step_occupancy_weights_buckets():
    model = T.ToySigmaDenoiser()
    grid = tdq.TimestepGrid(units="sigma", t_min=0.01, t_max=80.0, num_buckets=4, spacing="log")
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    kw = dict(samples_per_bucket=2, progress=False, forward_fn=lambda m, x, s: m(x, s))
    plain = profile_sensitivity(model, None, x0, grid, **kw)
    edges = grid.edges().tolist()
    steps = [edges[3] * 1.01] * 3 + [
        edges[1] * 1.01
    ]  # 3 steps in the top bucket, 1 in bucket 1, none elsewhere
    weighted = profile_sensitivity(model, None, x0, grid, step_timesteps=steps, **kw)
    assert weighted.meta["bucket_weights"] == pytest.approx([0.0, 1.0, 0.0, 3.0])
    torch.testing.assert_close(weighted.act_fisher[:, 3], plain.act_fisher[:, 3] * 3)
    assert (weighted.act_fisher[:, 0] == 0).all()
