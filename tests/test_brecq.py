"""tdq.rounding.brecq (block reconstruction) and the FP-model statistics of AdaRound, on the tiny UNet."""

import pytest
import torch

import tdq
from tdq.config import QuantSpec, TDQConfig, WeightRounding
from tdq.errors import ConfigError
from tdq.rounding import (
    calibrate_with_rounding,
    collect_layer_stats,
    collect_paired_stats,
    collect_unit_data,
    find_units,
    gptq_layer_,
    reconstruct_unit_,
    set_weight_codes_,
)
from tdq.rounding.gptq import column_grid, nearest_codes, weight_matrix
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = "down_blocks.1.resnets.0"  # a ResnetBlock2D of the tiny UNet (conv1, time_emb_proj, conv2, shortcut)


def _run(model, ts=(950.0, 700.0, 400.0, 10.0), batch=2):
    def run():
        with torch.no_grad():
            for t in ts:
                model(**denoiser_inputs(model, batch=batch, t=t, generator=torch.Generator().manual_seed(0)))

    return run


def _calibrated(**rounding):
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        weight_rounding=WeightRounding(**rounding),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    w_fp = {n: m.weight.detach().clone() for n, m in tdq.iter_quant_layers(model)}
    tdq.calibrate(model, _run(model))
    return model, w_fp


def test_adaround_statistics_come_from_the_fp_model_not_from_upstream_rounding():
    model, w_fp = _calibrated()
    run = _run(model)
    mods = dict(tdq.iter_quant_layers(model))
    before = collect_paired_stats(model, run, w_fp, max_rows=10**9)
    fp = collect_layer_stats(model, run)  # the FP model's input Hessians (what GPTQ uses)
    # round the first layer differently (some codes one step off): a downstream layer's statistics must not change
    first = mods["conv_in"]
    s, z = column_grid(first.weight_quantizer, first.weight.shape[0], weight_matrix(first).shape[1])
    codes = nearest_codes(weight_matrix(first), s, z, *first.weight_quantizer.qrange())
    codes[:, ::2] = (codes[:, ::2] + 1).clamp(max=first.weight_quantizer.qrange()[1])
    set_weight_codes_(first, codes)
    after = collect_paired_stats(model, run, w_fp, max_rows=10**9)
    name = f"{BLOCK}.conv1"
    for key in ("hqq", "hfq", "hff"):
        assert torch.equal(getattr(before[name], key), getattr(after[name], key)), key
    # `hff` is the FP model's input Hessian and `hqq` has the layer's own activation quantizer
    torch.testing.assert_close(after[name].hff, fp[name].hessian, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[name].hqq, after[name].hff, rtol=1e-6, atol=0)


def test_find_units_groups_layers_by_block_type():
    model, _ = _calibrated()
    units = {n: qs for n, _, qs in find_units(model)}
    assert set(units[BLOCK]) == {f"{BLOCK}.{x}" for x in ("conv1", "time_emb_proj", "conv2", "conv_shortcut")}
    assert units["conv_in"] == ["conv_in"]  # a layer outside every block is a unit of its own
    covered = [q for qs in units.values() for q in qs]
    assert sorted(covered) == sorted(n for n, _ in tdq.iter_quant_layers(model))  # every layer exactly once


@pytest.mark.parametrize("start", ["nearest", "gptq"])
def test_brecq_block_error_below_start_and_variables_binary(start):
    model, w_fp = _calibrated()
    run = _run(model, batch=4)
    unit_name, unit, qs = next(u for u in find_units(model) if u[0] == BLOCK)
    mods = dict(tdq.iter_quant_layers(model))
    if start == "gptq":
        stats = collect_layer_stats(model, run)
        for q in qs:
            gptq_layer_(mods[q], stats[q].hessian, act_order=True)
    data = collect_unit_data(model, run, [(unit_name, unit, qs)], w_fp, samples_per_call=4)[BLOCK]
    assert len(data) == 16 and set(data.buckets.tolist()) == {0, 1, 2, 3}  # every bucket's calls

    def block_error():  # summed squared error of the quantized block against the FP block outputs
        ctx = mods[qs[0]].context
        err = 0.0
        with torch.no_grad():
            for i in range(len(data)):
                args, kwargs, ref, b = data.take(torch.tensor([i]))
                ctx.set(int(b[0]))
                err += float(((unit(*args, **kwargs) - ref).double() ** 2).sum())
        return err

    err_start = block_error()
    rep = reconstruct_unit_(unit, {q: mods[q] for q in qs}, w_fp, data, iters=300, batch=8)
    err = block_error()
    assert rep["method"] == "brecq"
    assert rep["binary_fraction"] > 0.9, rep  # almost all at exactly 0 or 1 (the rest are rounded at 0.5)
    assert err < 0.9 * err_start, (err, err_start)
    energy = float((data.outputs.double() ** 2).sum())
    assert rep["error"] == pytest.approx(err / energy, rel=1e-4)
    for q in qs:  # on the grid; from nearest, each weight at the grid point below or above its FP value
        w = mods[q].weight.detach()
        assert torch.equal(mods[q].weight_quantizer(w), w), q
        if start != "nearest":  # GPTQ codes may lie further from the FP weight; the pair is around them
            continue
        s, _ = column_grid(mods[q].weight_quantizer, w.shape[0], weight_matrix(mods[q]).shape[1])
        step = (weight_matrix(mods[q]) - w_fp[q].reshape(w.shape[0], -1)).abs() / s
        assert float(step.max()) < 1.0 + 1e-4, q


def test_brecq_state_reloads_bit_exact_and_runs_on_x86(tmp_path):
    from tdq.quant.backends import backend_info, get_cpu_capability, to_backend
    from tdq.serialization import load_quantization, save_quantization

    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel", observer="mse"),
        weight_rounding=WeightRounding(method="brecq", adaround_init="gptq", act_order=True, brecq_iters=20),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    model = tdq.quantize_(tiny_unet2d(), cfg)
    w_fp = {n: m.weight.detach().clone() for n, m in tdq.iter_quant_layers(model)}
    rep = calibrate_with_rounding(model, _run(model))
    brq = rep["brecq"]
    assert brq["units"] and any(u["method"] == "brecq" for u in brq["units"].values())
    assert all(u["error"] <= u["error_start"] for u in brq["units"].values())
    moved = 0
    for name, m in tdq.iter_quant_layers(model):
        w = m.weight.detach()
        assert torch.equal(m.weight_quantizer(w), w), name
        moved += int(not torch.equal(m.weight_quantizer(w_fp[name]), w))
    assert moved > 0
    inp = denoiser_inputs(model, t=700.0)
    with torch.no_grad():
        ref = output_tensor(model(**inp))
    directory = save_quantization(model, tmp_path / "state")
    fresh = load_quantization(tiny_unet2d(), directory)
    with torch.no_grad():
        assert torch.equal(output_tensor(fresh(**inp)), ref)
    if not get_cpu_capability()["onednn_int8"]:
        pytest.skip("PyTorch without oneDNN int8 kernels")
    real = to_backend(load_quantization(tiny_unet2d(), directory), "x86")
    assert backend_info(real)["backend"] == "x86"
    with torch.no_grad():
        out = output_tensor(real(**inp))
    # exact int32 sums vs the simulator's float sums (and, where the model runs channels-last, float ops summed in
    # another order) may flip a few activation codes of one call: compare as a relative MSE (>= 30 dB)
    assert float((out - ref).pow(2).mean()) < 1e-3 * float(ref.pow(2).mean())


@pytest.mark.parametrize(
    "field,value",
    [
        ("brecq_iters", 0),
        ("brecq_iters", 2.5),
        ("brecq_iters", True),
        ("brecq_batch", -1),
        ("brecq_samples_per_call", "2"),
        ("brecq_reg", -1.0),
        ("brecq_reg", float("nan")),
        ("brecq_lr", 0.0),
        ("brecq_lr", "fast"),
    ],
)
def test_bad_brecq_fields_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"weight_rounding\.{field}="):
        TDQConfig(weight_rounding=WeightRounding(method="brecq", **{field: value})).validate()
    with pytest.raises(ConfigError, match=rf"weight_rounding\.{field}="):  # from a mapping (Hydra/YAML)
        TDQConfig.from_dict({"weight_rounding": {"method": "brecq", field: value}})
