"""Boundary layers in the precision planner and effective-bits accounting.

`tdq run` raises its boundary layers (model input, output, timestep/conditioning path) to `boundary_act_bits` after
calibration unless a schedule set them; so the planner takes them as fixed cells (`fixed_act_bits`) that it does not
choose but counts in the budget, and every run reports the bits it really runs at (`effective_average_bits`).
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from test_planner_budgets import _worst_feasible_milp
from test_schedule import make_profile

from tdq.errors import ConfigError
from tdq.mixed_precision.costs import effective_average_bits
from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, plan_uniform, schedule_objective
from tdq.run.config import ScheduleConfig

CANDS = (4, 6, 8)


def _brute_force_fixed(profile, budget, fixed):
    """Exhaustive search with the layers of `fixed` ({layer index: bits}) held at their bits in every bucket."""
    num_layers, k = profile.act_fisher.shape
    share = (profile.macs.double() / profile.macs.sum()).numpy()
    bits = np.asarray(CANDS, dtype=np.float64)
    act_cost = (
        profile.act_fisher.numpy()[..., None]
        * (profile.act_range.numpy()[..., None] / (2**bits - 1)) ** 2
        / 12
    )
    w_cost = (
        profile.weight_fisher.numpy().sum(1)[:, None]
        * (profile.weight_range.numpy()[:, None] / (2**bits - 1)) ** 2
        / 12
    )
    a_idx = np.array(list(itertools.product(range(3), repeat=num_layers * k))).reshape(-1, num_layers, k)
    for layer, b in fixed.items():
        a_idx = a_idx[(a_idx[:, layer, :] == CANDS.index(b)).all(1)]
    w_idx = np.array(list(itertools.product(range(3), repeat=num_layers)))
    lay = np.arange(num_layers)
    a_obj = act_cost[lay[None, :, None], np.arange(k)[None, None, :], a_idx].sum((1, 2))
    w_obj = w_cost[lay[None, :], w_idx].sum(1)
    ok_a = (share[None, :, None] * bits[a_idx]).sum((1, 2)) / k <= budget.avg_act_bits + 1e-9
    ok_w = (share[None, :] * bits[w_idx]).sum(1) <= budget.avg_weight_bits + 1e-9
    total = np.where(ok_a[:, None] & ok_w[None, :], a_obj[:, None] + w_obj[None, :], np.inf)
    return float(total.min())


def _profile():
    """3 layers x 2 buckets; layer 0 (the 'boundary' layer) is insensitive, so a free planner starves it."""
    profile = make_profile(num_layers=3, num_buckets=2, seed=5)
    profile.act_fisher[0] *= 1e-4
    return profile


@pytest.mark.parametrize("avg_act", [5.5, 6.0, 6.6])
def test_milp_with_fixed_boundary_layers_matches_brute_force(avg_act):
    profile = _profile()
    budget = PrecisionBudget(avg_act_bits=avg_act, avg_weight_bits=6.0)
    free = plan_precision(profile, budget, uniform_fallback=False)
    assert (free.act_bits[0] < 8).any()  # without fixing, the planner would not give layer 0 its 8 bits
    fixed = {profile.layers[0]: 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback or an early stop would warn
        sched = plan_precision(profile, budget, uniform_fallback=False, fixed_act_bits=fixed)
    assert sched.meta["fallback"] is None and sched.meta["solver"]["status"] == "milp"
    assert sched.meta["fixed_act_bits"] == fixed
    assert torch.all(sched.act_bits[0] == 8)
    best = _brute_force_fixed(profile, budget, {0: 8})
    assert schedule_objective(profile, sched) == pytest.approx(best, rel=1e-7)
    # the fixed layer counts in the average: the whole schedule keeps the budget
    assert sched.average_bits()["act"] <= avg_act + 1e-9
    assert sched.meta["budget_rows"]["avg_act_bits"] == pytest.approx(sched.average_bits()["act"])


def test_fixed_layers_infeasible_budget_and_bad_bits():
    profile = _profile()
    share0 = float(profile.macs[0] / profile.macs.sum())
    minimum = 8 * share0 + 4 * (1 - share0)  # the fixed layer at 8, the others at 4
    with pytest.raises(ValueError, match="fixed layers at their fixed bits"):
        plan_precision(
            profile, PrecisionBudget(avg_act_bits=minimum - 0.01), fixed_act_bits={profile.layers[0]: 8}
        )
    sched = plan_precision(
        profile, PrecisionBudget(avg_act_bits=minimum + 1e-6), fixed_act_bits={profile.layers[0]: 8}
    )
    assert torch.all(sched.act_bits[0] == 8) and torch.all(sched.act_bits[1:] == 4)
    with pytest.raises(ValueError, match="not one of act_candidates"):
        plan_precision(
            profile,
            PrecisionBudget(avg_act_bits=6, act_candidates=(4, 6)),
            fixed_act_bits={profile.layers[0]: 8},
        )
    with pytest.raises(ValueError, match="does not have"):
        plan_precision(profile, PrecisionBudget(avg_act_bits=6), fixed_act_bits={"no.such.layer": 8})


def test_uniform_fallback_keeps_fixed_layers(monkeypatch):
    profile = make_profile(seed=3)
    fixed = {profile.layers[0]: 8, profile.layers[-1]: 8}
    uni = plan_uniform(profile, 6, 6, fixed_act_bits=fixed)
    achieved = uni.meta["achieved"]
    assert achieved["act"] > 6  # the uniform run's effective average counts its 8-bit boundary layers
    budget = PrecisionBudget(avg_act_bits=achieved["act"], avg_weight_bits=achieved["weight"])
    _worst_feasible_milp(monkeypatch)
    with pytest.warns(RuntimeWarning, match="fell back to uniform W6A6"):
        sched = plan_precision(profile, budget, fixed_act_bits=fixed)
    assert sched.meta["fallback"]["act_bits"] == 6
    assert torch.equal(sched.act_bits, uni.act_bits) and torch.equal(sched.weight_bits, uni.weight_bits)


def test_uniform_effective_budget_is_what_the_milp_gets():
    """`schedule.match_uniform`: the MILP's budget is uniform W6A6's effective average; it spends no more."""
    profile = make_profile(seed=4)
    fixed = {profile.layers[0]: 8}
    eff = plan_uniform(profile, 6, 6, fixed_act_bits=fixed).meta["achieved"]
    share0 = float(profile.macs[0] / profile.macs.sum())
    assert eff["act"] == pytest.approx(8 * share0 + 6 * (1 - share0)) and eff["weight"] == pytest.approx(6.0)
    sched = plan_precision(
        profile, PrecisionBudget(avg_act_bits=eff["act"], avg_weight_bits=eff["weight"]), fixed_act_bits=fixed
    )
    assert sched.meta["achieved"]["act"] <= eff["act"] + 1e-9
    assert ScheduleConfig(match_uniform=True).validate() is None
    with pytest.raises(ConfigError, match="match_uniform"):
        ScheduleConfig(match_uniform=True, avg_act_bits=6.5).validate()


def test_effective_bits_hand_computed():
    macs = {"a": 100, "b": 300, "c": 500, "d": 100}
    # a: 8 bits; b: 4 / 6 per bucket; c: 16-bit fallback in bucket 0, 6 in bucket 1; d: not quantized (float32)
    act = {"a": [8, 8], "b": [4, 6], "c": [16, 6]}
    weight = {"a": 8, "b": 4, "c": 6}
    out = effective_average_bits(macs, act, weight, bucket_weights=[3, 1])
    # act: (100*8 + 300*(4*3+6)/4 + 500*(16*3+6)/4 + 100*32) / 1000 = (800 + 1350 + 6750 + 3200) / 1000
    assert out["act"] == pytest.approx(12.1)
    # weight: (100*8 + 300*4 + 500*6 + 100*32) / 1000
    assert out["weight"] == pytest.approx(8.2)
    # float inputs: c in bucket 0 (3/4 of the steps) and all of d
    assert out["mac_share_float_act"] == pytest.approx((500 * 0.75 + 100) / 1000)
    assert out["mac_share_float_weight"] == pytest.approx(0.1)
    # a static model (one bucket per layer) ignores the occupancy; a 32-bit cell counts 16 (the planner's float)
    one = effective_average_bits(
        {"a": 1, "b": 3}, {"a": [8], "b": [32]}, {"a": 8, "b": 6}, bucket_weights=[3, 1]
    )
    assert one["act"] == pytest.approx((8 + 3 * 16) / 4) and one["weight"] == pytest.approx((8 + 18) / 4)
