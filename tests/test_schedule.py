import itertools
import json

import pytest
import torch
from _figures import png_size, record_figures
from torch import nn

from tdq.grid import TimestepGrid
from tdq.mixed_precision.fisher import SensitivityProfile
from tdq.mixed_precision.planners import (
    PrecisionBudget,
    PrecisionSchedule,
    plan_precision,
    plan_uniform,
    schedule_objective,
)


def make_profile(num_layers=6, num_buckets=4, heterogeneous=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = TimestepGrid(units="train_timestep", t_min=0, t_max=999, num_buckets=num_buckets).to_dict()
    if heterogeneous:
        # Sensitivities spanning several orders of magnitude across layers and buckets.
        act_fisher = 10 ** (4 * torch.rand(num_layers, num_buckets, generator=g, dtype=torch.float64) - 2)
        weight_fisher = 10 ** (4 * torch.rand(num_layers, num_buckets, generator=g, dtype=torch.float64) - 2)
        macs = torch.randint(100, 10_000, (num_layers,), generator=g)
    else:
        act_fisher = torch.ones(num_layers, num_buckets, dtype=torch.float64)
        weight_fisher = torch.ones(num_layers, num_buckets, dtype=torch.float64)
        macs = torch.full((num_layers,), 1000)
    return SensitivityProfile(
        layers=[f"blocks.{i}.proj" for i in range(num_layers)],
        grid=grid,
        act_fisher=act_fisher,
        act_range=1 + 3 * torch.rand(num_layers, num_buckets, generator=g, dtype=torch.float64),
        weight_fisher=weight_fisher,
        weight_range=0.1 + torch.rand(num_layers, generator=g, dtype=torch.float64),
        macs=macs,
        num_samples=torch.full((num_buckets,), 8),
    )


@pytest.mark.parametrize("act_budget,w_budget", [(4, 4), (4.5, 7.2), (5.0, 5.0), (6, 6), (7.3, 4.1), (8, 8)])
def test_milp_meets_budget(act_budget, w_budget):
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=act_budget, avg_weight_bits=w_budget))
    avg = sched.average_bits(profile.macs)
    assert avg["act"] <= act_budget + 1e-9
    assert avg["weight"] <= w_budget + 1e-9
    assert sched.meta["achieved"] == avg
    assert sched.meta["objective"] == pytest.approx(schedule_objective(profile, sched))
    assert set(sched.act_bits.unique().tolist()) <= {4, 6, 8}


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_milp_not_worse_than_uniform(bits):
    # with the fallback off: the solver's own schedule (the fallback is tested in test_planner_budgets.py)
    for heterogeneous in (True, False):
        profile = make_profile(heterogeneous=heterogeneous)
        uniform = plan_uniform(profile, bits, bits)
        budget = PrecisionBudget(avg_act_bits=bits, avg_weight_bits=bits)
        sched = plan_precision(profile, budget, uniform_fallback=False)
        assert sched.meta["fallback"] is None
        assert uniform.average_bits(profile.macs) == pytest.approx({"act": bits, "weight": bits})
        assert schedule_objective(profile, sched) <= schedule_objective(profile, uniform) * (1 + 1e-9)


def test_milp_strictly_better_on_heterogeneous_profile():
    profile = make_profile(heterogeneous=True, seed=3)
    uniform = plan_uniform(profile, 6, 6)
    sched = plan_precision(
        profile, PrecisionBudget(avg_act_bits=6, avg_weight_bits=6), uniform_fallback=False
    )
    assert sched.meta["objective"] < 0.9 * uniform.meta["objective"]
    assert len(sched.act_bits.unique()) > 1


def test_milp_matches_brute_force():
    profile = make_profile(num_layers=3, num_buckets=2, seed=1)
    budget = PrecisionBudget(avg_act_bits=5.7, avg_weight_bits=5.3)
    sched = plan_precision(profile, budget, uniform_fallback=False)
    share = profile.macs.double() / profile.macs.sum()
    best_act, best_w = float("inf"), float("inf")
    for combo in itertools.product((4, 6, 8), repeat=6):
        a = torch.tensor(combo, dtype=torch.long).reshape(3, 2)
        if float((share[:, None] * a).sum() / 2) > 5.7 + 1e-9:
            continue
        s = PrecisionSchedule(profile.layers, a, torch.full((3,), 8), profile.grid)
        best_act = min(best_act, schedule_objective(profile, s, split=True)["act"])
    for combo in itertools.product((4, 6, 8), repeat=3):
        w = torch.tensor(combo, dtype=torch.long)
        if float((share * w).sum()) > 5.3 + 1e-9:
            continue
        s = PrecisionSchedule(profile.layers, torch.full((3, 2), 8), w, profile.grid)
        best_w = min(best_w, schedule_objective(profile, s, split=True)["weight"])
    terms = schedule_objective(profile, sched, split=True)
    assert terms["act"] == pytest.approx(best_act, rel=1e-9)
    assert terms["weight"] == pytest.approx(best_w, rel=1e-9)


def test_unconstrained_budget_takes_largest_candidate():
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(act_candidates=(4, 8), weight_candidates=(2, 3)))
    assert torch.all(sched.act_bits == 8) and torch.all(sched.weight_bits == 3)


def test_infeasible_budget():
    profile = make_profile()
    with pytest.raises(ValueError, match=r"minimum achievable.*\b4 bits"):
        plan_precision(profile, PrecisionBudget(avg_act_bits=3.5))
    with pytest.raises(ValueError, match=r"weight budget.*minimum achievable.*\b6 bits"):
        plan_precision(profile, PrecisionBudget(avg_weight_bits=5, weight_candidates=(6, 8)))
    with pytest.raises(ValueError, match="unsupported"):
        PrecisionBudget(act_candidates=(1, 8))


def test_average_bits_is_mac_weighted():
    grid = TimestepGrid(units="t", t_min=0, t_max=1, num_buckets=2).to_dict()
    sched = PrecisionSchedule(
        ["a", "b"], torch.tensor([[4, 8], [8, 8]]), torch.tensor([4, 8]), grid, meta={"macs": [3, 1]}
    )
    assert sched.average_bits() == pytest.approx({"act": 0.75 * 6 + 0.25 * 8, "weight": 0.75 * 4 + 0.25 * 8})
    assert sched.average_bits([1, 1]) == pytest.approx({"act": 7.0, "weight": 6.0})


def test_schedule_objective_is_order_invariant_and_checks_layers():
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=6, avg_weight_bits=5))
    perm = list(reversed(range(len(sched.layers))))
    shuffled = PrecisionSchedule(
        [sched.layers[i] for i in perm], sched.act_bits[perm], sched.weight_bits[perm], sched.grid
    )
    assert schedule_objective(profile, shuffled) == pytest.approx(schedule_objective(profile, sched))
    other = PrecisionSchedule(["x"], torch.full((1, 4), 8), torch.tensor([8]), sched.grid)
    with pytest.raises(ValueError, match="different layers"):
        schedule_objective(profile, other)


def test_schedule_validation():
    grid = TimestepGrid(units="t", t_min=0, t_max=1, num_buckets=2).to_dict()
    with pytest.raises(ValueError, match="num_buckets"):
        PrecisionSchedule(["a"], torch.full((1, 3), 8), torch.tensor([8]), grid)
    with pytest.raises(ValueError, match="weight bit-widths"):
        PrecisionSchedule(["a"], torch.full((1, 2), 8), torch.tensor([12]), grid)
    with pytest.raises(ValueError, match="more than once"):
        PrecisionSchedule(["a", "a"], torch.full((2, 2), 8), torch.tensor([8, 8]), grid)


def test_save_load_round_trip(tmp_path):
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=5.5, avg_weight_bits=6.5))
    path = sched.save(tmp_path / "sched")
    assert path.name == "sched.json"
    loaded = PrecisionSchedule.load(path)
    assert loaded.layers == sched.layers
    assert torch.equal(loaded.act_bits, sched.act_bits) and loaded.act_bits.dtype == torch.long
    assert torch.equal(loaded.weight_bits, sched.weight_bits)
    assert loaded.grid == sched.grid
    assert loaded.meta == json.loads(json.dumps(sched.meta))
    assert loaded.to_dict() == sched.to_dict()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        PrecisionSchedule.load(bad)
    data = sched.to_dict()
    data["act_bits"] = data["act_bits"][:-1]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json.*act_bits"):
        PrecisionSchedule.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PrecisionSchedule.load(tmp_path / "missing.json")


def test_table_and_plot(tmp_path):
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=6))
    table = sched.to_table()
    assert "| `blocks.0.proj` |" in table and "MAC-weighted average" in table
    with record_figures() as figs:
        out = sched.plot(tmp_path / "sched.png")
    assert png_size(out) == figs[0]["size_px"]
    w_ax, a_ax, bar = figs[0]["axes"]
    assert w_ax["xticklabels"] == ["W"] and w_ax["yticklabels"] == profile.layers
    assert a_ax["title"] == "activation bits" and a_ax["xlabel"] == "timestep bucket (train_timestep)"
    assert a_ax["xticklabels"] == sched._bucket_labels() and a_ax["xticklabels"][0].startswith("[0, ")
    assert bar["ylabel"] == "bits"


class FakeQuantLinear(nn.Module):
    def __init__(self, num_buckets):
        super().__init__()
        self.num_buckets = num_buckets
        self.weight_bits = 8
        self.act_bits = torch.full((num_buckets,), 8)

    def set_bits(self, weight_bits, act_bits):
        if act_bits.shape != (self.num_buckets,):
            raise ValueError("wrong number of buckets")
        self.weight_bits = weight_bits
        self.act_bits = act_bits


def make_model(num_buckets):
    model = nn.Module()
    model.blocks = nn.ModuleList()
    for _ in range(6):
        block = nn.Module()
        block.proj = FakeQuantLinear(num_buckets)
        model.blocks.append(block)
    return model


def test_apply_sets_bits():
    profile = make_profile()
    sched = plan_precision(profile, PrecisionBudget(avg_act_bits=6, avg_weight_bits=5))
    model = make_model(4)
    assert sched.apply_(model) is model
    for i, name in enumerate(sched.layers):
        module = model.get_submodule(name)
        assert module.weight_bits == int(sched.weight_bits[i]) and isinstance(module.weight_bits, int)
        assert torch.equal(module.act_bits, sched.act_bits[i]) and module.act_bits.dtype == torch.long


def test_apply_errors_name_the_layer_and_change_nothing():
    profile = make_profile()
    sched = plan_uniform(profile, 4, 4)
    with pytest.raises(ValueError, match=r"'blocks\.0\.proj'.*3 timestep buckets"):
        sched.apply_(make_model(3))

    model = make_model(4)
    del model.blocks[5].proj
    with pytest.raises(KeyError, match=r"blocks\.5\.proj"):
        sched.apply_(model)
    assert all(model.blocks[i].proj.weight_bits == 8 for i in range(5))  # checked before anything changed

    model = make_model(4)
    model.blocks[2].proj = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"blocks\.2\.proj.*set_bits"):
        sched.apply_(model)
