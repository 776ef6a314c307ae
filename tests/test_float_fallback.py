"""Float (16-bit activation) as a candidate of the MILP planner: exact against brute force with the uniform
fallback off, its budget and BOPs accounting, the report, `apply_` keeping inputs float, the attention refusal,
and the objective scaling that keeps small layers' trade-offs above the solver's tolerances."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from test_schedule import make_profile

import tdq
from tdq.config import TDQConfig
from tdq.mixed_precision import planners as P
from tdq.mixed_precision.costs import schedule_costs
from tdq.mixed_precision.planners import PrecisionBudget, plan_precision, schedule_objective
from tdq.mixed_precision.schedule import PrecisionSchedule
from tdq.quant.attention import iter_attention_quantizers
from tdq.run.report import _schedule_markdown
from tdq.testing import denoiser_inputs, tiny_unet2d


def _brute_force(profile, act_cands, w_cands, avg_act, avg_w):
    """Least objective over every choice, in plain numpy (float candidates: zero error)."""
    num_layers, k = profile.act_fisher.shape
    share = (profile.macs.double() / profile.macs.sum()).numpy()
    ab = np.asarray(act_cands, dtype=np.float64)
    wb = np.asarray(w_cands, dtype=np.float64)
    act_noise = (profile.act_range.numpy()[..., None] / (2**ab - 1)) ** 2 / 12
    act_noise = np.where(ab >= 16, 0.0, act_noise)
    act_cost = profile.act_fisher.numpy()[..., None] * act_noise
    w_cost = (
        profile.weight_fisher.numpy().sum(1)[:, None]
        * (profile.weight_range.numpy()[:, None] / (2**wb - 1)) ** 2
        / 12
    )
    a_idx = np.array(list(itertools.product(range(len(ab)), repeat=num_layers * k))).reshape(
        -1, num_layers, k
    )
    w_idx = np.array(list(itertools.product(range(len(wb)), repeat=num_layers)))
    lay = np.arange(num_layers)
    a_obj = act_cost[lay[None, :, None], np.arange(k)[None, None, :], a_idx].sum((1, 2))
    w_obj = w_cost[lay[None, :], w_idx].sum(1)
    ok_a = (share[None, :, None] * ab[a_idx]).sum((1, 2)) / k <= avg_act + 1e-9
    ok_w = (share[None, :] * wb[w_idx]).sum(1) <= avg_w + 1e-9
    best_a = np.where(ok_a, a_obj, np.inf).argmin()
    best_w = np.where(ok_w, w_obj, np.inf).argmin()
    return float(a_obj[best_a] + w_obj[best_w]), ab[a_idx[best_a]]


def _plan(profile, budget):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an early stop or fallback would warn
        return plan_precision(profile, budget, uniform_fallback=False)


@pytest.mark.parametrize("avg_act", [6.0, 8.5, 10.0])
def test_milp_with_float_candidate_matches_brute_force(avg_act):
    profile = make_profile(num_layers=3, num_buckets=2, seed=7)
    budget = PrecisionBudget(
        avg_act_bits=avg_act,
        avg_weight_bits=6.0,
        act_candidates=(4, 8),
        weight_candidates=(4, 8),
        float_fallback=True,
    )
    assert budget.act_candidates == (4, 8, 16)
    sched = _plan(profile, budget)
    best, _ = _brute_force(profile, (4, 8, 16), (4, 8), avg_act, 6.0)
    assert sched.meta["solver"]["status"] == "milp"
    assert schedule_objective(profile, sched) == pytest.approx(best, rel=1e-9)
    # the budget holds, with float cells counted at 16 bits
    assert sched.meta["achieved"]["act"] <= avg_act + 1e-9
    share = (profile.macs.double() / profile.macs.sum()).numpy()
    assert sched.meta["achieved"]["act"] == pytest.approx((share[:, None] * sched.act_bits.numpy()).sum() / 2)
    if avg_act >= 10.0:  # room for float: the planner uses it
        assert sched.float_cells()


def test_sixteen_in_candidates_is_float_and_costs_count_32x32():
    profile = make_profile(num_layers=3, num_buckets=2, seed=7)
    a = PrecisionBudget(avg_act_bits=10.0, act_candidates=(4, 8, 16))
    b = PrecisionBudget(avg_act_bits=10.0, act_candidates=(4, 8), float_fallback=True)
    sa, sb = _plan(profile, a), _plan(profile, b)
    assert torch.equal(sa.act_bits, sb.act_bits)
    cells = sa.float_cells()
    assert cells and all(int(sa.act_bits[sa.layers.index(n), k]) == 16 for n, k in cells)
    assert schedule_objective(profile, sa, split=True)["act"] == pytest.approx(
        schedule_objective(profile, _float_free(sa), split=True)["act"] - _float_free_error(profile, sa),
        rel=1e-9,
    )
    macs = profile.macs.double().numpy()
    costs = schedule_costs(sa, macs=macs, bucket_weights=[1, 1])
    act = sa.act_bits.double().numpy()
    per_mac = np.where(act >= 16, 1024.0, act * sa.weight_bits.double().numpy()[:, None])
    assert costs["bops"] == pytest.approx(float((macs[:, None] * per_mac).sum() / 2))
    assert P.bops_cost_table(macs, [8, 16], [8])[:, 1, 0] == pytest.approx(macs * 1024)


def _float_free(sched):
    bits = sched.act_bits.clone()
    bits[bits >= 16] = 8
    return PrecisionSchedule(sched.layers, bits, sched.weight_bits, sched.grid)


def _float_free_error(profile, sched):
    """The 8-bit error of the float cells (what the float cells remove from the objective)."""
    mask = (sched.act_bits >= 16).numpy()
    noise = (profile.act_range.numpy() / 255.0) ** 2 / 12
    return float((profile.act_fisher.numpy() * noise * mask).sum())


def test_objective_scaling_keeps_small_layers_optimal():
    # One layer's range is 1e6 times the others' (an outlier stream): divided by the largest coefficient, the other
    # layers' trade-offs fall under HiGHS's tolerances and are not optimised.
    profile = make_profile(num_layers=4, num_buckets=2, seed=3)
    profile.act_range[0] *= 1e6
    sched = _plan(profile, PrecisionBudget(avg_act_bits=6.0, avg_weight_bits=6.0))
    best, best_bits = _brute_force(profile, (4, 6, 8), (4, 6, 8), 6.0, 6.0)
    obj = schedule_objective(profile, sched)
    assert obj - best <= 1e-10 * best
    assert np.array_equal(sched.act_bits.numpy(), best_bits)


def test_report_lists_float_cells():
    profile = make_profile(num_layers=3, num_buckets=2, seed=7)
    sched = _plan(profile, PrecisionBudget(avg_act_bits=10.0, act_candidates=(4, 8), float_fallback=True))
    cells = [{"layer": n, "bucket": k} for n, k in sched.float_cells()]
    report = {
        "schedule": {
            "planner": "milp",
            "average_bits": sched.average_bits(profile.macs),
            "costs": schedule_costs(sched, macs=profile.macs),
            "fallback": None,
            "float_cells": cells,
        }
    }
    md = "\n".join(_schedule_markdown(report))
    assert f"Float fallback: {len(cells)} (layer, bucket) cells" in md
    for c in cells:
        assert f"`{c['layer']}`" in md


def _quantized_tiny(attention=False):
    model = tdq.quantize_(tiny_unet2d(), TDQConfig(attention=attention))
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    layers = [
        n
        for n, m in model.named_modules()
        if hasattr(m, "act_quantizer") and callable(getattr(m, "set_bits", None))
    ]
    k = model.get_submodule(layers[0]).act_quantizer.num_buckets
    return model, layers, k


def test_apply_keeps_float_cells_unquantized():
    model, layers, k = _quantized_tiny()
    bits = torch.full((len(layers), k), 8, dtype=torch.long)
    bits[1] = 16
    PrecisionSchedule(layers, bits, torch.full((len(layers),), 8), {"num_buckets": k}).apply_(model)
    seen = {}

    def hook(name):
        def record(mod, inp, out):
            seen.setdefault(name, (inp[0].clone(), out.clone()))

        return record

    for i in (0, 1):
        model.get_submodule(layers[i]).act_quantizer.register_forward_hook(hook(layers[i]))
    with torch.no_grad():
        model(**denoiser_inputs(model, t=480.0))
    x_float, y_float = seen[layers[1]]
    assert torch.equal(x_float, y_float)  # the float cell passes its input through
    x_q, y_q = seen[layers[0]]
    assert not torch.equal(x_q, y_q)  # an 8-bit cell quantizes


def test_apply_refuses_attention_quantizers_without_attention_bits():
    model, layers, k = _quantized_tiny(attention=True)
    attn = list(iter_attention_quantizers(model))
    assert attn
    sched = PrecisionSchedule(
        layers, torch.full((len(layers), k), 6), torch.full((len(layers),), 8), {"num_buckets": k}
    )
    with pytest.raises(ValueError, match="attention_bits"):
        sched.apply_(model)
    with pytest.raises(ValueError, match="attention_bits"):
        sched.apply_(model, attention_bits=1)
    sched.apply_(model, attention_bits=6)
    assert all(int(b) == 6 for _, q in attn for b in q.bits)
