"""The MILP planner against exhaustive search (fallback off), its reported fallback to uniform, step-occupancy
weighting, and the weight-memory and latency budgets."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from test_schedule import make_profile

from tdq.errors import ConfigError
from tdq.mixed_precision.costs import schedule_costs
from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform, schedule_objective
from tdq.run.config import ScheduleConfig

CANDS = (4, 6, 8)


def _brute_force(profile, budget, occ, numel=None, table=None):
    """Exhaustive search over every (act bits per layer×bucket, weight bits per layer) choice, in plain numpy."""
    num_layers, k = profile.act_fisher.shape
    share = (profile.macs.double() / profile.macs.sum()).numpy()
    occ = np.asarray(occ, dtype=np.float64) * k / np.sum(occ)
    bits = np.asarray(CANDS, dtype=np.float64)
    act_noise = (profile.act_range.numpy()[..., None] / (2**bits - 1)) ** 2 / 12  # [L, K, J]
    act_cost = profile.act_fisher.numpy()[..., None] * act_noise
    w_cost = (
        profile.weight_fisher.numpy().sum(1)[:, None]
        * (profile.weight_range.numpy()[:, None] / (2**bits - 1)) ** 2
        / 12
    )
    a_idx = np.array(list(itertools.product(range(3), repeat=num_layers * k))).reshape(-1, num_layers, k)
    w_idx = np.array(list(itertools.product(range(3), repeat=num_layers)))
    lay = np.arange(num_layers)
    a_obj = act_cost[lay[None, :, None], np.arange(k)[None, None, :], a_idx].sum((1, 2))  # [Na]
    w_obj = w_cost[lay[None, :], w_idx].sum(1)  # [Nw]
    ok_a = np.ones(len(a_idx), bool)
    ok_w = np.ones(len(w_idx), bool)
    if budget.avg_act_bits is not None:
        ok_a &= (share[None, :, None] * occ[None, None, :] * bits[a_idx]).sum(
            (1, 2)
        ) / k <= budget.avg_act_bits + 1e-9
    if budget.avg_weight_bits is not None:
        ok_w &= (share[None, :] * bits[w_idx]).sum(1) <= budget.avg_weight_bits + 1e-9
    if budget.max_weight_bytes is not None:
        ok_w &= (np.asarray(numel)[None, :] * bits[w_idx]).sum(1) / 8 <= budget.max_weight_bytes + 1e-9
    total = a_obj[:, None] + w_obj[None, :]
    feasible = ok_a[:, None] & ok_w[None, :]
    if budget.max_relative_latency is not None:
        rel = table / table[:, -1, -1].sum()
        # latency[a, w] = sum_{l,k} occ_k rel[l, a_lk, w_l] / K
        lat = np.zeros((len(a_idx), len(w_idx)))
        for wi, w in enumerate(w_idx):
            lat[:, wi] = (occ[None, None, :] * rel[lay[None, :, None], a_idx, w[None, :, None]]).sum(
                (1, 2)
            ) / k
        feasible &= lat <= budget.max_relative_latency + 1e-9
    return float(np.where(feasible, total, np.inf).min())


BUDGETS = [
    dict(avg_act_bits=5.7, avg_weight_bits=5.3),
    dict(avg_act_bits=6.4, max_weight_bytes=900.0),
    dict(avg_weight_bits=7.0, max_relative_latency=0.55),
    dict(avg_act_bits=7.0, avg_weight_bits=6.5, max_weight_bytes=1100.0, max_relative_latency=0.7),
]


@pytest.mark.parametrize("bounds", BUDGETS, ids=["bits", "bytes", "latency", "all"])
@pytest.mark.parametrize("occ", [[1, 1], [3, 1]], ids=["equal", "occupancy"])
def test_milp_without_fallback_matches_brute_force(bounds, occ):
    profile = make_profile(num_layers=3, num_buckets=2, seed=5)
    numel = [300, 500, 700]
    table = np.random.default_rng(0).uniform(0.5, 2, (3, 1, 1)) * np.outer(CANDS, CANDS)[None] / 64
    budget = PrecisionBudget(**bounds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback or early stop would warn
        sched = plan_precision(
            profile,
            budget,
            uniform_fallback=False,
            bucket_weights=occ,
            weight_numel=numel,
            latency_table=table,
        )
    assert sched.meta["fallback"] is None and sched.meta["solver"]["status"] == "milp"
    best = _brute_force(profile, budget, occ, numel, table)
    assert schedule_objective(profile, sched) == pytest.approx(best, rel=1e-7)
    for name, value in sched.meta["budget_rows"].items():
        assert value <= getattr(budget, name) + 1e-9, name
    if "avg_act_bits" in sched.meta["budget_rows"]:  # the schedule's own average uses the same occupancy
        assert sched.meta["achieved"]["act"] == pytest.approx(sched.meta["budget_rows"]["avg_act_bits"])


def test_occupancy_changes_the_plan():
    """A bucket the sampler never visits costs nothing, so its bits go elsewhere."""
    profile = make_profile(num_layers=4, num_buckets=4, seed=2)
    budget = PrecisionBudget(avg_act_bits=5.0)
    equal = plan_precision(profile, budget)
    skewed = plan_precision(profile, budget, bucket_weights=[0, 0, 1, 3])
    assert skewed.meta["bucket_weights"] == [0.0, 0.0, 1.0, 3.0]
    assert skewed.average_bits()["act"] <= 5.0 + 1e-9
    # the visited buckets get more bits than under equal weighting
    assert skewed.act_bits[:, 2:].double().mean() > equal.act_bits[:, 2:].double().mean()
    # the profile's own record (from profile_sensitivity(step_timesteps=...)) is the default
    profile.meta["bucket_weights"] = [0.0, 0.0, 1.0, 3.0]
    assert torch.equal(plan_precision(profile, budget).act_bits, skewed.act_bits)


def _worst_feasible_milp(monkeypatch):
    """Make scipy's milp return the WORST feasible schedule and say it hit its time limit."""
    import scipy.optimize

    real = scipy.optimize.milp

    def fake(c, **kwargs):
        res = real(-c, **kwargs)
        res.status, res.message = 1, "Time limit reached. (test)"
        return res

    monkeypatch.setattr(scipy.optimize, "milp", fake)


def test_fallback_to_uniform_is_reported(monkeypatch):
    profile = make_profile(seed=3)
    budget = PrecisionBudget(avg_act_bits=6, avg_weight_bits=6)
    _worst_feasible_milp(monkeypatch)
    with pytest.warns(RuntimeWarning, match="fell back to uniform W6A6"):
        sched = plan_precision(profile, budget)
    fb = sched.meta["fallback"]
    assert fb["to"] == "uniform" and fb["act_bits"] == 6 and fb["weight_bits"] == 6
    assert "Time limit" in fb["reason"]
    assert torch.all(sched.act_bits == 6) and torch.all(sched.weight_bits == 6)
    assert sched.meta["objective"] == pytest.approx(plan_uniform(profile, 6, 6).meta["objective"])
    # without the fallback the solver's (bad) schedule is returned, and said to be worse than uniform
    with pytest.warns(RuntimeWarning, match="before proving"):
        raw = plan_precision(profile, budget, uniform_fallback=False)
    assert raw.meta["fallback"] is None and raw.meta["solver"]["uniform_better"] is True
    assert raw.meta["objective"] > sched.meta["objective"]


def test_memory_and_latency_budget_errors():
    profile = make_profile(num_layers=3, num_buckets=2)
    with pytest.raises(ValueError, match="weight_numel"):
        plan_precision(profile, PrecisionBudget(max_weight_bytes=1000))
    with pytest.raises(ValueError, match=r"memory budget.*minimum achievable is 750 bytes"):
        plan_precision(profile, PrecisionBudget(max_weight_bytes=700), weight_numel=[500, 500, 500])
    with pytest.raises(ValueError, match=r"latency budget.*minimum achievable is 0\.25"):
        plan_precision(profile, PrecisionBudget(max_relative_latency=0.2))  # (4*4)/(8*8) under the BOPs model
    with pytest.raises(ValueError, match="latency_table must have shape"):
        plan_precision(profile, PrecisionBudget(max_relative_latency=0.5), latency_table=np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="must be positive"):
        PrecisionBudget(max_weight_bytes=0)


def test_default_latency_model_is_bops_and_costs_are_reported():
    profile = make_profile(num_layers=4, num_buckets=3, seed=1)
    sched = plan_precision(profile, PrecisionBudget(max_relative_latency=0.5))
    assert sched.meta["latency_cost"] == "bops_model"
    costs = schedule_costs(sched, weight_numel=[10, 20, 30, 40])
    assert costs["bops_ratio"] * (32 * 32) / (8 * 8) == pytest.approx(
        sched.meta["budget_rows"]["max_relative_latency"]
    )
    assert costs["bops_ratio"] * (32 * 32) / (8 * 8) <= 0.5 + 1e-9
    w = sched.weight_bits.double()
    assert costs["weight_bytes"] == pytest.approx(float((torch.tensor([10.0, 20, 30, 40]) * w).sum() / 8))
    assert costs["weight_bytes_fp32"] == 400


def test_schedule_config_validates_new_fields():
    ScheduleConfig(max_weight_bytes=1e6, max_relative_latency=0.5).validate()
    with pytest.raises(ConfigError, match=r"schedule\.max_relative_latency=2"):
        ScheduleConfig(max_relative_latency=2).validate()
    with pytest.raises(ConfigError, match=r"schedule\.max_weight_bytes='big'"):
        ScheduleConfig(max_weight_bytes="big").validate()
    with pytest.raises(ConfigError, match=r"schedule\.uniform_fallback"):
        ScheduleConfig(uniform_fallback="yes").validate()
