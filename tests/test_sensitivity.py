import json

import pytest
import torch
from _figures import png_size, record_figures
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from tdq.config import TDQConfig
from tdq.grid import TimestepGrid
from tdq.mixed_precision.fisher import SensitivityProfile, profile_sensitivity
from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform, schedule_objective

GRID = TimestepGrid(units="train_timestep", t_min=0, t_max=999, num_buckets=3)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def profiled_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.fixture(scope="module")
def setup():
    model = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    profile = profile_sensitivity(
        model, scheduler, x0, GRID, samples_per_bucket=4, batch_size=4, progress=False
    )
    return model, scheduler, x0, profile


def test_profile_shapes_and_values(setup):
    model, _, _, profile = setup
    names = profiled_layers(model)
    num_layers, k = len(names), 3
    assert profile.layers == names
    assert profile.grid == GRID.to_dict()
    for name in ("act_fisher", "act_range", "weight_fisher"):
        t = getattr(profile, name)
        assert t.shape == (num_layers, k) and t.dtype == torch.float64
        assert torch.isfinite(t).all() and (t >= 0).all()
    assert (
        (profile.act_fisher > 0).all() and (profile.weight_fisher > 0).all() and (profile.act_range > 0).all()
    )
    assert profile.weight_range.shape == (num_layers,) and (profile.weight_range > 0).all()
    assert profile.num_samples.tolist() == [4, 4, 4]
    macs = dict(zip(profile.layers, profile.macs.tolist(), strict=True))
    assert macs["conv_in"] == 8 * 8 * 8 * (1 * 3 * 3)
    assert macs["time_embedding.linear_1"] == 32 * 8
    edges = GRID.edges()
    for k, (lo, hi) in enumerate(profile.meta["timestep_ranges"]):
        assert edges[k] <= lo <= hi <= edges[k + 1]


def test_profile_is_deterministic_and_restores_model(setup):
    model, scheduler, x0, profile = setup
    model.train()
    model.conv_in.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    again = profile_sensitivity(
        model, scheduler, x0, GRID, samples_per_bucket=4, batch_size=4, progress=False
    )
    for name in ("act_fisher", "act_range", "weight_fisher", "weight_range", "macs", "num_samples"):
        assert torch.equal(getattr(again, name), getattr(profile, name)), name
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    model.conv_in.weight.requires_grad_(True)
    model.eval()

    other = profile_sensitivity(
        model,
        scheduler,
        x0,
        GRID,
        layers=["conv_in"],
        samples_per_bucket=4,
        batch_size=4,
        seed=1,
        progress=False,
    )
    assert not torch.equal(other.act_fisher[0], profile.act_fisher[0])
    # Same seed, different batching: same timesteps and noise, activation Fisher is per-sample exact.
    split = profile_sensitivity(
        model, scheduler, x0, GRID, layers=["conv_in"], samples_per_bucket=4, batch_size=2, progress=False
    )
    torch.testing.assert_close(split.act_fisher[0], profile.act_fisher[0], rtol=1e-4, atol=0)


def test_layer_selection(setup):
    model, scheduler, x0, _ = setup
    config = TDQConfig(exclude=["re:.*time_emb.*", "conv_in"])
    profile = profile_sensitivity(
        model, scheduler, x0, GRID, config=config, samples_per_bucket=2, batch_size=2, progress=False
    )
    expected = [n for n in profiled_layers(model) if "time_emb" not in n and n != "conv_in"]
    assert profile.layers == expected
    with pytest.raises(KeyError, match="nope"):
        profile_sensitivity(model, scheduler, x0, GRID, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="GroupNorm"):
        profile_sensitivity(model, scheduler, x0, GRID, layers=["conv_norm_out"], progress=False)


class TwoHeads(nn.Module):
    """x -> tanh(lin1(x)) -> a(h) + b(h): `a` and `b` share their input tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x, t):
        h = torch.tanh(self.lin1(x))
        return self.a(h) + self.b(h)


def test_fisher_matches_manual_computation():
    model = TwoHeads()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    x0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def forward_fn(m, x_t, t):
        seen.append(x_t.detach().clone())
        return m(x_t, t)

    grid = TimestepGrid(units="train_timestep", t_min=400, t_max=600, num_buckets=1)
    profile = profile_sensitivity(
        model, scheduler, x0, grid, samples_per_bucket=6, batch_size=6, forward_fn=forward_fn, progress=False
    )
    x_t = seen[0]
    h = torch.tanh(model.lin1(x_t))
    h_a = h.detach().requires_grad_(True)
    out = model.a(h_a) + model.b(h)
    loss = (out - x0).pow(2).mean(1).sum()
    g_in, g_w = torch.autograd.grad(loss, [h_a, model.a.weight])
    i = profile.layers.index("a")
    assert profile.act_fisher[i, 0].item() == pytest.approx(g_in.pow(2).sum().item() / 6, rel=1e-5)
    assert profile.weight_fisher[i, 0].item() == pytest.approx(g_w.pow(2).sum().item() / 6, rel=1e-5)
    assert profile.act_range[i, 0].item() == pytest.approx((h.max() - h.min()).item(), rel=1e-6)
    assert profile.act_range[0, 0].item() == pytest.approx((x_t.max() - x_t.min()).item(), rel=1e-6)
    assert profile.macs.tolist() == [32, 32, 32]
    assert profile.weight_range[i].item() == pytest.approx(
        (2 * model.a.weight.abs().amax(1)).pow(2).mean().sqrt().item(), rel=1e-6
    )
    assert all(p.requires_grad for p in model.parameters())


def test_v_prediction_and_t_units():
    model = TwoHeads()
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    grid = TimestepGrid(units="t", t_min=0.0, t_max=1.0, num_buckets=4)
    profile = profile_sensitivity(
        model, scheduler, x0, grid, samples_per_bucket=3, batch_size=2, progress=False
    )
    assert profile.act_fisher.shape == (3, 4) and (profile.act_fisher > 0).all()
    for k, (lo, hi) in enumerate(profile.meta["timestep_ranges"]):
        assert k * 25 <= lo <= hi < (k + 1) * 25
    auto = profile_sensitivity(
        model, scheduler, x0, TimestepGrid(num_buckets=2), samples_per_bucket=1, batch_size=1, progress=False
    )
    assert auto.grid["units"] == "train_timestep" and auto.grid["t_max"] == 99


def test_save_load_round_trip_and_errors(setup, tmp_path):
    profile = setup[3]
    json_path, st_path = profile.save(tmp_path / "prof")
    assert json_path.name == "prof.json" and st_path.name == "prof.safetensors"
    loaded = SensitivityProfile.load(tmp_path / "prof")
    assert loaded.layers == profile.layers and loaded.grid == profile.grid
    assert loaded.meta == json.loads(json.dumps(profile.meta))
    for name in ("act_fisher", "act_range", "weight_fisher", "weight_range", "macs", "num_samples"):
        assert torch.equal(getattr(loaded, name), getattr(profile, name)), name
    SensitivityProfile.load(json_path)  # either file name works

    manifest = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**manifest, "layers": manifest["layers"][:-1]}))
    with pytest.raises(ValueError, match=r"prof\.json.*act_fisher must have shape"):
        SensitivityProfile.load(json_path)
    json_path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match=r"prof\.json.*schema_version=99"):
        SensitivityProfile.load(json_path)
    json_path.write_text(json.dumps(manifest))
    st_path.write_bytes(st_path.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"prof\.safetensors.*not a readable"):
        SensitivityProfile.load(json_path)
    st_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"prof\.safetensors"):
        SensitivityProfile.load(json_path)


def test_report_and_plots(setup, tmp_path):
    profile = setup[3]
    table = profile.to_table(top=5)
    assert table.count("\n| ") == 6  # header + 5 rows
    with record_figures() as figs:
        act = profile.plot_heatmap(tmp_path / "act.png")
        weight = profile.plot_heatmap(tmp_path / "w.png", kind="weight")
    for path, rec, kind in ((act, figs[0], "activation"), (weight, figs[1], "weight")):
        assert png_size(path) == rec["size_px"]  # the file is the figure drawn
        heat, bar = rec["axes"]
        assert heat["title"] == f"{kind} Fisher trace"
        assert heat["xlabel"] == f"timestep bucket ({profile.grid['units']})"
        assert heat["yticklabels"] == profile.layers
        assert len(heat["xticklabels"]) == profile.num_buckets
        assert bar["ylabel"] == "log10 Fisher trace"
    with pytest.raises(ValueError, match="kind"):
        profile.plot_heatmap(tmp_path / "x.png", kind="bias")


def test_milp_on_real_profile(setup, tmp_path):
    profile = setup[3]
    for bits in (4, 6):
        sched = plan_precision(profile, PrecisionBudget(avg_act_bits=bits, avg_weight_bits=bits))
        avg = sched.average_bits(profile.macs)
        assert avg["act"] <= bits + 1e-9 and avg["weight"] <= bits + 1e-9
        uniform = plan_uniform(profile, bits, bits)
        assert schedule_objective(profile, sched) <= schedule_objective(profile, uniform) * (1 + 1e-9)
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=5.5, avg_weight_bits=5))
    assert sched.average_bits(profile.macs)["act"] <= 5.5 + 1e-9
