"""Bad input and faults (issue #14): every case is a clear error naming the field/layer/file, or documented
behaviour; nothing goes through silently. docs/reliability.md lists each case with the test that guards it."""

import errno
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tdq
from tdq import ConfigError, LayerOverride, QuantSpec, TDQConfig, TimestepGrid
from tdq import testing as T
from tdq.adapters import TimestepArgumentError
from tdq.quant import NonFiniteActivationError, NotCalibratedError
from tdq.run.config import CalibrationConfig, EvalConfig, RunConfig, ScheduleConfig
from tdq.run.job import run_experiment
from tdq.run.models import ModelConfig
from tdq.serialization import (
    CONFIG_FILE,
    STATE_FILE,
    SavedQuantizationError,
    load_quantization,
    save_quantization,
)
from tdq.utils.io import sha256_file


def _growing(config=None, ts=(100.0, 900.0), scale=1.0):
    model = tdq.quantize_(T.GrowingActivationDenoiser(), config or TDQConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), tdq.calibration(model):
        for t in ts:
            model(torch.randn(8, 16, generator=g) * scale, torch.tensor(t))
    return model


def _toy(config=None):
    """ToySigmaDenoiser (three quantized layers: embed, conv1, conv2), calibrated."""
    model = tdq.quantize_(T.ToySigmaDenoiser(), config or TDQConfig(grid=TimestepGrid(num_buckets=2)))
    with torch.no_grad(), tdq.calibration(model):
        for s in (0.01, 1.0, 50.0):
            model(**T.denoiser_inputs(model, t=s))
    return model


# ---------------------------------------------------------------------------------------------------------------
# 1. per-layer override (and include/exclude) matching no layer


@pytest.mark.parametrize(
    "config, field",
    [
        (TDQConfig(overrides={"conv_inn": LayerOverride(weight_bits=4)}), "overrides pattern 'conv_inn'"),
        (TDQConfig(overrides={"re:.*attn.*": LayerOverride(skip=True)}), "overrides pattern 're:.*attn.*'"),
        (TDQConfig(include=["conv1", "conv3"]), "include pattern 'conv3'"),
        (TDQConfig(exclude=["conv_out"]), "exclude pattern 'conv_out'"),
        # an override of an excluded layer does nothing either
        (
            TDQConfig(exclude=["conv1"], overrides={"conv1": LayerOverride(weight_bits=4)}),
            "overrides pattern",
        ),
    ],
)
def test_pattern_matching_no_layer_is_refused(config, field):
    model = T.ToySigmaDenoiser()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="matches no quantizable layer") as e:
        tdq.quantize_(model, config)
    assert field in str(e.value) and "'conv1'" in str(e.value)  # lists the known layers
    assert not hasattr(model, "_tdq_quantization")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pattern_matching_some_layer_is_accepted():
    model = tdq.quantize_(
        T.ToySigmaDenoiser(),
        TDQConfig(exclude=["embed"], overrides={"re:conv.": LayerOverride(weight_bits=4)}),
    )
    assert [n for n, _ in tdq.iter_quant_layers(model)] == ["conv1", "conv2"]


# ---------------------------------------------------------------------------------------------------------------
# 2. NaN timestep (and other timestep values/types)


@pytest.mark.parametrize("out_of_range", ["error", "nearest"])
@pytest.mark.parametrize(
    "t",
    [float("nan"), torch.tensor(float("nan")), torch.tensor([500.0, float("nan")])],
    ids=["float", "0d", "batch"],
)
def test_nan_timestep_is_refused(t, out_of_range):
    model = _growing(TDQConfig(grid=TimestepGrid(out_of_range=out_of_range)))
    with pytest.raises(ValueError, match="timestep argument 'timestep' is NaN"):
        model(torch.randn(2, 16), t)
    with pytest.raises(ValueError, match="NaN"):
        tdq.get_quantization(model).grid.bucket(torch.tensor([float("nan")]))


@pytest.mark.parametrize(
    "t, what",
    [
        ([500.0, 500.0], "is a list"),
        ((500,), "is a tuple"),
        ("500", "is a str"),
        (True, "is a bool"),
        (500 + 0j, "is a complex"),
        (torch.tensor([True, False]), "dtype torch.bool"),
        (torch.tensor([500 + 0j]), "dtype torch.complex64"),
        (torch.zeros(0), "empty tensor"),
        (np.array(["a"]), "numpy dtype <U1"),
    ],
)
def test_bad_timestep_types_are_named(t, what):
    model = _growing()
    with pytest.raises(TimestepArgumentError, match="timestep argument 'timestep'") as e:
        model(torch.randn(2, 16), t)
    assert what in str(e.value) and "real number" in str(e.value)


@pytest.mark.parametrize(
    "t",
    [
        730,
        730.0,
        np.float32(730.0),
        np.int64(730),
        np.array(730.0),
        np.array([730.0, 730.0]),
        torch.tensor(730),
    ],
    ids=["int", "float", "np-float32", "np-int64", "np-0d", "np-1d", "tensor-0d"],
)
def test_timestep_number_types_are_accepted(t):
    model = _growing()
    model(torch.randn(2, 16), t)
    assert tdq.get_quantization(model).context.bucket == 7


# ---------------------------------------------------------------------------------------------------------------
# 3. convert() failing inside the calibration context


def test_convert_failure_leaves_no_layer_observing():
    model = tdq.quantize_(T.ToySigmaDenoiser(), TDQConfig(grid=TimestepGrid(num_buckets=2)))
    with pytest.raises(NotCalibratedError, match="layer 'embed' saw no activations"):
        with tdq.calibration(model):
            pass  # the sampler never called the denoiser: convert() fails on the first layer
    for name, m in tdq.iter_quant_layers(model):
        assert m.act_quantizer.mode == "quant" and m.act_quantizer.observers is None, name
    # the model does not keep running with live statistics: it refuses, naming a layer
    with pytest.raises(NotCalibratedError, match="used before calibration"):
        model(**T.denoiser_inputs(model, t=1.0))


def test_convert_failure_midway_keeps_converted_layers_and_refuses_the_rest(monkeypatch):
    model = tdq.quantize_(T.ToySigmaDenoiser(), TDQConfig(grid=TimestepGrid(num_buckets=2)))

    def broken():
        raise RuntimeError("observer exploded")

    with pytest.raises(RuntimeError, match="observer exploded"):
        with torch.no_grad(), tdq.calibration(model):
            model(**T.denoiser_inputs(model, t=1.0))
            monkeypatch.setattr(model.conv1.act_quantizer, "finish_observing", broken)
    assert [m.act_quantizer.mode for _, m in tdq.iter_quant_layers(model)] == ["quant"] * 3
    assert bool(model.embed.act_quantizer.calibrated.all()) and not bool(
        model.conv2.act_quantizer.calibrated.any()
    )
    with pytest.raises(NotCalibratedError):
        model(**T.denoiser_inputs(model, t=1.0))


# ---------------------------------------------------------------------------------------------------------------
# 4. NaN input activations


def test_nan_activation_during_calibration_names_the_layer():
    model = tdq.quantize_(T.GrowingActivationDenoiser())
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with pytest.raises(
        NonFiniteActivationError, match=r"layer 'proj': input activation holds 1 NaN and 0 inf"
    ):
        with torch.no_grad(), tdq.calibration(model):
            model(x, 500.0)
    assert model.proj.act_quantizer.mode == "quant"


def test_nan_activation_at_run_time_is_not_laundered():
    model = _growing()
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with torch.no_grad():
        q = model(x, 500.0)
        with tdq.disabled(model):
            fp = model(x, 500.0)
    # FP gives NaN in sample 1; so does the quantized model, and sample 0 stays finite
    assert fp[1].isnan().all() and q[1].isnan().all()
    assert torch.isfinite(q[0]).all()
    # the quantizer creates no NaN/inf itself: huge but finite inputs give finite outputs
    tdq.get_quantization(model).context.set(5, None)
    with torch.no_grad():
        assert torch.isfinite(model.proj.act_quantizer(torch.full((2, 16), 3e38))).all()


def test_check_finite_raises_at_run_time_naming_the_layer():
    model = _growing(TDQConfig(check_finite=True))
    x = torch.randn(2, 16)
    with torch.no_grad():
        model(x, 500.0)  # finite: fine
        x[0, 0] = float("inf")
        with pytest.raises(
            NonFiniteActivationError, match=r"layer 'proj'.*0 NaN and 1 inf value\(s\) at run time"
        ):
            model(x, 500.0)


def test_stochastic_rounding_is_off_in_an_eval_model():
    """The quantizers added by quantize_ follow the model's eval mode: no stochastic rounding at inference."""
    model = _growing(TDQConfig(activation=QuantSpec(rounding="stochastic", symmetric=False)))
    assert not model.proj.act_quantizer.training
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(model(x, 500.0), model(x, 500.0))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, 500.0), model(x, 500.0))


# ---------------------------------------------------------------------------------------------------------------
# 5. all-zero calibration


def test_all_zero_calibration_warns_and_uses_the_unit_range(caplog):
    model = tdq.quantize_(T.GrowingActivationDenoiser())
    with caplog.at_level(logging.WARNING, logger="tdq"), torch.no_grad(), tdq.calibration(model):
        model(torch.zeros(4, 16), 500.0)
    assert "layer 'proj' saw only zero inputs in timestep bucket(s) [5]" in caplog.text
    aq = model.proj.act_quantizer
    assert aq.min_val.tolist() == [-1.0] * 10 and aq.max_val.tolist() == [1.0] * 10
    # later non-zero inputs are not crushed to zero
    x = torch.linspace(-1, 1, 16).expand(2, 16)
    tdq.get_quantization(model).context.set(5, None)
    assert (aq(x) - x).abs().max() <= float(aq.scale[5]) / 2 + 1e-6


def test_zero_bucket_takes_the_nearest_non_zero_bucket_range(caplog):
    model = tdq.quantize_(T.GrowingActivationDenoiser())
    with caplog.at_level(logging.WARNING, logger="tdq"), torch.no_grad(), tdq.calibration(model):
        model(torch.zeros(4, 16), 100.0)
        model(torch.randn(4, 16), 900.0)
    assert "saw only zero inputs in timestep bucket(s) [1]" in caplog.text
    aq = model.proj.act_quantizer
    assert aq.scale[1] == aq.scale[9] and aq.scale[1] > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# 6. quantize_ on the meta device, then to_empty()


def test_meta_quantize_then_to_empty_is_reinitialised_or_refused(tmp_path):
    with torch.device("meta"):
        model = T.ToySigmaDenoiser()
    config = TDQConfig(grid=TimestepGrid(num_buckets=2))
    tdq.quantize_(model, config)
    with pytest.raises(RuntimeError, match="layer 'embed': its weight is on the meta device"):
        with tdq.calibration(model):
            pass
    model.to_empty(device="cpu")
    inputs = T.denoiser_inputs(model, t=1.0)
    with pytest.raises(RuntimeError, match="built on the meta device and never initialised"):
        model(**inputs)
    # load the float weights (not the quantizer buffers), calibrate: buffers are re-initialised from the config
    model.load_state_dict(T.ToySigmaDenoiser().state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="never initialised"):
        model(**inputs)
    with torch.no_grad(), tdq.calibration(model):
        for s in (0.01, 1.0, 50.0):
            model(**T.denoiser_inputs(model, t=s))
    ref = _toy(config)
    assert torch.equal(model(**inputs), ref(**inputs))
    assert model.conv1.weight_quantizer.bits.item() == 8
    # or: load a saved state into the to_empty()'d model
    save_quantization(ref, tmp_path)
    with torch.device("meta"):
        other = T.ToySigmaDenoiser()
    tdq.quantize_(other, config)
    other.to_empty(device="cpu")
    load_quantization(other, tmp_path)
    assert torch.equal(other(**inputs), ref(**inputs))


# ---------------------------------------------------------------------------------------------------------------
# 7. NaN / negative scales and impossible bit-widths inside a saved state


def _rewrite_state(directory, edit_tensors=None, edit_sidecar=None):
    sidecar = json.loads((directory / CONFIG_FILE).read_text())
    path = directory / sidecar["state_file"]
    if edit_tensors is not None:
        tensors = load_file(str(path))
        edit_tensors(tensors)
        save_file(tensors, str(path))
        sidecar["state_sha256"] = sha256_file(path)
    if edit_sidecar is not None:
        edit_sidecar(sidecar)
    (directory / CONFIG_FILE).write_text(json.dumps(sidecar))


def _set(key, value):
    def edit(tensors):
        tensors[key] = torch.full_like(tensors[key], value)

    return edit


@pytest.fixture(scope="module")
def saved_toy(tmp_path_factory):
    model = _toy()
    directory = tmp_path_factory.mktemp("toy")
    save_quantization(model, directory)
    return model, directory


def _copy_state(directory, tmp_path):
    for name in (STATE_FILE, CONFIG_FILE):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            _set("conv1.act_quantizer.scale", float("nan")),
            r"layer 'conv1': conv1.act_quantizer.scale holds nan",
        ),
        (
            _set("conv2.weight_quantizer.scale", -0.5),
            r"layer 'conv2': conv2.weight_quantizer.scale holds -0.5",
        ),
        (_set("embed.act_quantizer.scale", 0.0), r"layer 'embed'.*scales must be finite and positive"),
        (
            _set("conv1.act_quantizer.zero_point", float("inf")),
            r"conv1.act_quantizer.zero_point holds NaN/inf",
        ),
        (_set("conv1.act_quantizer.max_val", float("nan")), r"conv1.act_quantizer.max_val holds NaN/inf"),
        (
            _set("conv1.act_quantizer.bits", 99),
            r"conv1.act_quantizer.bits holds \[99, 99\]; bit-widths must be",
        ),
    ],
    ids=[
        "nan-act-scale",
        "negative-weight-scale",
        "zero-scale",
        "inf-zero-point",
        "nan-range",
        "act-bits-99",
    ],
)
def test_unusable_saved_quantizer_values_are_refused(saved_toy, tmp_path, edit, match):
    _, directory = saved_toy
    _rewrite_state(_copy_state(directory, tmp_path), edit_tensors=edit)
    model = T.ToySigmaDenoiser()
    with pytest.raises(SavedQuantizationError, match=match):
        load_quantization(model, tmp_path)
    assert not hasattr(model, "_tdq_quantization")


def test_weight_bits_99_in_a_saved_state_is_refused(saved_toy, tmp_path):
    _, directory = saved_toy

    def sidecar(s):
        s["layers"][1]["weight_bits"] = 99

    _rewrite_state(
        _copy_state(directory, tmp_path),
        edit_tensors=_set("conv1.weight_quantizer.bits", 99),
        edit_sidecar=sidecar,
    )
    with pytest.raises(
        SavedQuantizationError, match=r"layers\[1\] \('conv1'\).weight_bits=99 must be an integer"
    ):
        load_quantization(T.ToySigmaDenoiser(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 8. the sidecar naming a state file outside its directory


@pytest.mark.parametrize(
    "state_file",
    [
        "/etc/passwd",
        "../tdq_state.safetensors",
        "sub/tdq_state.safetensors",
        "..",
        "",
        7,
        None,
        "x.safetensors",
    ],
)
def test_sidecar_state_file_must_be_a_bare_name(saved_toy, tmp_path, state_file):
    _, directory = saved_toy
    target = tmp_path / "inner"
    target.mkdir()
    _copy_state(directory, target)
    (tmp_path / STATE_FILE).write_bytes((directory / STATE_FILE).read_bytes())  # a valid file one level up

    def edit(s):
        s["state_file"] = state_file

    _rewrite_state(target, edit_sidecar=edit)
    with pytest.raises(
        SavedQuantizationError, match=r"state_file=.* must be a file name inside the state directory"
    ):
        load_quantization(T.ToySigmaDenoiser(), target)


# ---------------------------------------------------------------------------------------------------------------
# 9. the weights + sidecar pair is replaced as a whole


def _predict(model):
    with torch.no_grad():
        return model(**T.denoiser_inputs(model, t=1.0))


def _failing_at(fn, fail_at):
    """`fn`, except that its `fail_at`-th call raises a disk-full error."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return fn(*args, **kwargs)

    return wrapped


def test_failed_save_over_an_existing_state_keeps_a_loadable_pair(tmp_path, monkeypatch):
    old = _toy()
    new = _toy(TDQConfig(weight=QuantSpec(bits=4), grid=TimestepGrid(num_buckets=2)))
    save_quantization(old, tmp_path)
    outputs = {"old": _predict(old), "new": _predict(new)}
    real_replace = os.replace
    seen = set()
    for fail_at in range(1, 10):
        monkeypatch.setattr(os, "replace", _failing_at(real_replace, fail_at))
        try:
            save_quantization(new, tmp_path)
            failed = False
        except OSError:
            failed = True
        monkeypatch.setattr(os, "replace", real_replace)
        if not failed:
            break
        # a failure at any step leaves a pair that loads, and gives the old or the new model exactly
        out = _predict(load_quantization(T.ToySigmaDenoiser(), tmp_path))
        which = [k for k, v in outputs.items() if torch.equal(out, v)]
        assert len(which) == 1, fail_at
        seen.add(which[0])
        save_quantization(old, tmp_path)  # back to the old pair for the next failure point
    assert not failed and seen == {"old", "new"}  # every step was hit, before and after the commit point
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, CONFIG_FILE])
    assert torch.equal(_predict(load_quantization(T.ToySigmaDenoiser(), tmp_path)), outputs["new"])


def test_failed_tensor_write_keeps_the_old_pair(tmp_path, monkeypatch):
    old = _toy()
    save_quantization(old, tmp_path)
    import safetensors.torch

    def half_then_full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_quantization(
            _toy(TDQConfig(weight=QuantSpec(bits=4), grid=TimestepGrid(num_buckets=2))), tmp_path
        )
    monkeypatch.undo()
    assert torch.equal(_predict(load_quantization(T.ToySigmaDenoiser(), tmp_path)), _predict(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE_FILE, CONFIG_FILE])


# ---------------------------------------------------------------------------------------------------------------
# 10. run-config values


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("eval", "num_inference_steps", -3),
        ("eval", "num_inference_steps", 0),
        ("eval", "num_samples", 0),
        ("eval", "batch_size", 0),
        ("eval", "seed", -1),
        ("eval", "scheduler", "ddim2"),
        ("eval", "feature", "clip"),
        ("eval", "lpips_nets", "alex"),
        ("eval", "guidance_scale", float("nan")),
        ("eval", "kid_subsets", 0),
        ("eval", "num_real", 0),
        ("eval", "cache", "yes"),
        ("calibration", "num_inference_steps", -1),
        ("calibration", "num_samples", 0),
        ("calibration", "batch_size", 2.5),
        ("schedule", "planner", "greedy"),
        ("schedule", "avg_act_bits", float("inf")),
        ("schedule", "act_candidates", []),
        ("schedule", "weight_candidates", [4, 16]),
        ("schedule", "samples_per_bucket", 0),
        ("model", "source", "hub"),
        ("model", "path", 5),
        ("model", "sample_size", 0),
        ("model", "crop", -1),
        ("model", "class_names", "0123"),
    ],
)
def test_run_config_values_are_refused(section, field, value):
    cls = {
        "eval": EvalConfig,
        "calibration": CalibrationConfig,
        "schedule": ScheduleConfig,
        "model": ModelConfig,
    }[section]
    cfg = RunConfig(**{section: cls(**{field: value})})
    with pytest.raises(ConfigError, match=rf"^{section}\.{field}=.* is not allowed; it must be"):
        cfg.validate()


def test_run_experiment_refuses_bad_values_before_any_work(tmp_path):
    with pytest.raises(
        ConfigError, match=r"eval\.num_inference_steps=-3 is not allowed; it must be an integer in"
    ):
        run_experiment({"eval": {"num_inference_steps": -3}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"eval: unknown field\(s\) \['num_sample'\]"):
        run_experiment({"eval": {"num_sample": 3}}, tmp_path / "run")
    RunConfig().validate()  # the defaults are valid


# ---------------------------------------------------------------------------------------------------------------
# the "unclear" cases: a message naming the field and what is allowed


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"weight": {"bits": "eight"}},
            r"weight\.bits='eight' is not supported; choose an integer in \[2, 8\]",
        ),
        (
            {"grid": {"num_buckets": 2**40}},
            r"grid\.num_buckets=1099511627776 must be an integer in \[1, 4096\]",
        ),
        (
            {"activation": {"percentile": "99.9"}},
            r"activation\.percentile='99.9' must be a number in \(0, 100\]",
        ),
        ({"include": "conv1"}, r"include='conv1' must be a list of layer names"),
        (
            {"overrides": {"conv1": {"weight_bits": 99}}},
            r"overrides\['conv1'\]\.weight\.bits=99 is not supported",
        ),
        # neighbours
        ({"weight": {"bits": 8.0}}, r"weight\.bits=8\.0 is not supported"),
        ({"weight": {"bits": 8.5}}, r"weight\.bits=8\.5 is not supported"),
        ({"weight": {"bits": True}}, r"weight\.bits=True is not supported"),
        (
            {"weight": {"group_size": -4, "granularity": "per_group"}},
            r"weight\.group_size=-4 must be an integer",
        ),
        ({"weight": {"group_size": "64"}}, r"weight\.group_size='64' must be an integer"),
        ({"weight": {"symmetric": "yes"}}, r"weight\.symmetric='yes' must be true or false"),
        ({"activation": {"enabled": 1}}, r"activation\.enabled=1 must be true or false"),
        ({"activation": {"percentile": float("nan")}}, r"activation\.percentile=nan must be a number"),
        ({"activation": {"observer": None}}, r"activation\.observer=None is unknown"),
        ({"grid": {"num_buckets": 4.0}}, r"grid\.num_buckets=4\.0 must be an integer"),
        ({"grid": {"num_buckets": True}}, r"grid\.num_buckets=True must be an integer"),
        ({"grid": {"t_min": "0"}}, r"grid\.t_min='0' must be a finite number or null"),
        ({"grid": {"t_max": float("inf")}}, r"grid\.t_max=inf must be a finite number or null"),
        ({"grid": {"units": ["t"]}}, r"grid\.units=\['t'\] is unknown"),
        ({"include": []}, r"include=\[\] selects no layer"),
        ({"include": [3]}, r"include=\[3\] must be a list"),
        ({"exclude": "conv1"}, r"exclude='conv1' must be a list"),
        ({"exclude": [""]}, r"exclude=\[''\] must be a list"),
        ({"overrides": ["conv1"]}, r"overrides=\['conv1'\] must map"),
        ({"overrides": {"conv1": {"skip": "no"}}}, r"overrides\['conv1'\]\.skip='no' must be true or false"),
        ({"overrides": {"conv1": {"act_bits": "8"}}}, r"overrides\['conv1'\]\.activation\.bits='8'"),
        ({"overrides": {"conv1": {"weight": 4}}}, r"overrides\['conv1'\]\.weight=4 must be a mapping"),
        ({"check_finite": "true"}, r"check_finite='true' must be true or false"),
    ],
)
def test_bad_config_values_are_named(data, match):
    with pytest.raises(ConfigError, match=match):
        TDQConfig.from_dict(data)


def test_meta_model_calibration_is_a_clear_error(tmp_path):
    with torch.device("meta"):  # the whole quantize_ call under the meta device, too
        model = tdq.quantize_(T.GrowingActivationDenoiser())
    with pytest.raises(
        NotCalibratedError, match="layer 'proj': its weight or quantizer state is on the meta device"
    ):
        save_quantization(model, tmp_path)
    model.to_empty(device="cpu")
    with pytest.raises(NotCalibratedError, match="never initialised after to_empty"):
        save_quantization(model, tmp_path)
    with torch.device("meta"):
        model = tdq.quantize_(T.GrowingActivationDenoiser())
    with pytest.raises(RuntimeError, match="layer 'proj': its weight is on the meta device; materialise"):
        with tdq.calibration(model):
            model(torch.randn(2, 16, device="meta"), 500.0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda s: s["layers"][0].pop("code_layout"),
            r"layers\[0\] \('embed'\) lacks field\(s\) \['code_layout'\]",
        ),
        (
            lambda s: s["layers"][0].update(code_layout="int3"),
            r"layers\[0\] \('embed'\)\.code_layout='int3' must",
        ),
        (
            lambda s: s["layers"][0].update(act_bits="8"),
            r"act_bits='8' must be a list of integers in \[2, 16\]",
        ),
        (lambda s: s["layers"][0].update(weight_shape=[4, "x"]), r"weight_shape=\[4, 'x'\] must be a list"),
        (
            lambda s: s["layers"][0].update(weight_dtype="float99"),
            r"weight_dtype='float99' must be a torch dtype",
        ),
        (lambda s: s["layers"][0].pop("name"), r"layers\[0\]\.name=None must be a layer name"),
        (lambda s: s.update(layers="embed"), r"layers='embed' must be a list of layer entries"),
        (lambda s: s.update(layers=["embed"]), r"layers\[0\]='embed' must be a JSON object"),
        (lambda s: s.update(include_float="yes"), r"include_float='yes' must be true or false"),
        (lambda s: s.update(state_sha256=5), r"state_sha256=5 must be a sha256 hex digest"),
        (lambda s: s.update(config=[]), r"config=\[\] must be a JSON object"),
        (lambda s: s["adapter"].update(scale="2"), r"adapter\.scale='2' is not allowed"),
        (lambda s: s["adapter"].update(t_max=float("nan")), r"adapter\.t_max=nan is not allowed"),
        (lambda s: s["config"]["weight"].update(bits="eight"), r"invalid config: weight\.bits='eight'"),
    ],
)
def test_bad_sidecar_fields_are_named(saved_toy, tmp_path, edit, match):
    _, directory = saved_toy
    _rewrite_state(_copy_state(directory, tmp_path), edit_sidecar=edit)
    with pytest.raises(SavedQuantizationError, match=match):
        load_quantization(T.ToySigmaDenoiser(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# ssim_per_image on small images


def _ssim_reference(x, y, k, sigma, data_range=1.0):
    """SSIM with a k×k Gaussian window over the reflect-padded image (torchmetrics' convention), mean over channels
    and positions."""
    coords = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None].expand(x.shape[1], 1, k, k)
    x, y = x.double(), y.double()
    p = (k - 1) // 2

    def filt(t):
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(t, (p, p, p, p), mode="reflect"), w, groups=t.shape[1]
        )

    mx, my = filt(x), filt(y)
    vx, vy, cxy = (
        (filt(x * x) - mx**2).clamp(min=0),
        (filt(y * y) - my**2).clamp(min=0),
        filt(x * y) - mx * my,
    )
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


@pytest.mark.parametrize("size", [3, 4, 5, 6, 7, 10, 11, 16])
def test_ssim_small_images_use_a_window_that_fits(size):
    from tdq.eval.metrics import ssim_per_image

    g = torch.Generator().manual_seed(size)
    x = torch.rand(3, 2, size, size, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    k = min(11, size) if min(11, size) % 2 else min(11, size) - 1
    ref = _ssim_reference(x, y, k, 1.5 * k / 11)
    torch.testing.assert_close(ssim_per_image(x, y), ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(3))


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (1, 3, 1, 8), (2, 1, 16, 2)])
def test_ssim_refuses_images_without_room_for_a_window(shape):
    from tdq.eval.metrics import ssim_per_image

    with pytest.raises(ValueError, match=r"SSIM needs images of at least 3×3 pixels"):
        ssim_per_image(torch.rand(shape), torch.rand(shape))


# ---------------------------------------------------------------------------------------------------------------
# neighbours: quantize_ arguments, set_bits, precision schedules


def test_quantize_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"weight\.bits=99"):
        tdq.quantize_(T.GrowingActivationDenoiser(), {"weight": {"bits": 99}})
    model = tdq.quantize_(T.GrowingActivationDenoiser(), {"weight": {"bits": 4}})  # a mapping is a config
    assert int(model.proj.weight_quantizer.bits) == 4
    with pytest.raises(TypeError, match="config must be a TDQConfig or a mapping of its fields, got str"):
        tdq.quantize_(T.GrowingActivationDenoiser(), "w8a8")
    for n in (0, 1, 999.0, "1000"):
        with pytest.raises(ConfigError, match=r"num_train_timesteps=.* must be an integer >= 2"):
            tdq.quantize_(T.GrowingActivationDenoiser(), num_train_timesteps=n)


def test_fractional_activation_bits_are_refused():
    model = _growing()
    with pytest.raises(ValueError, match=r"layer 'proj': activation bits 8\.5 must be integers"):
        model.proj.set_bits(act_bits=torch.tensor(8.5))
    model.proj.set_bits(act_bits=torch.tensor(6.0))  # integral floats are fine
    assert model.proj.act_quantizer.bits.tolist() == [6] * 10


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"layers": "proj"}, r"layers='proj' must be a list of layer names"),
        ({"act_bits": [[8.5] * 10]}, r"act_bits must be a list .* of lists of integers"),
        ({"weight_bits": ["8"]}, r"weight_bits must be a list of integers"),
        ({"grid": 10}, r"grid must be a mapping"),
    ],
)
def test_bad_precision_schedule_fields_are_named(edit, match):
    from tdq.mixed_precision.schedule import PrecisionSchedule

    data = {"layers": ["proj"], "act_bits": [[8] * 10], "weight_bits": [8], "grid": {"num_buckets": 10}}
    PrecisionSchedule.from_dict(data)
    with pytest.raises(ValueError, match=match):
        PrecisionSchedule.from_dict({**data, **edit})


def test_unknown_top_level_run_config_key_is_refused():
    from tdq.run.config import to_run_config

    with pytest.raises(ConfigError, match=r"unknown run config key\(s\) \['evl'\]"):
        to_run_config({"evl": {"num_samples": 4}})
    assert to_run_config({"hydra": {"x": 1}, "threads": 1}).threads == 1


def test_calibration_seed_must_be_an_integer():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x, timestep):
            return self.proj(x)

    net = Net()
    tdq.quantize_(net, TDQConfig())
    for bad in ("a", -1, 1.5, True):
        with pytest.raises(ValueError, match="seed="):
            with tdq.calibration(net, seed=bad):
                pass


# ---------------------------------------------------------------------------------------------------------------
# neighbours probed in session 3 (experiments/probe_reliability.py): timesteps, saved-state tensors, configs,
# profiling, pipelines, metrics


@pytest.mark.parametrize("out_of_range", ["error", "nearest"])
@pytest.mark.parametrize(
    "t, what",
    [(float("inf"), "inf"), (-float("inf"), "-inf"), (torch.tensor([1.0, float("inf")]), "inf")],
    ids=["inf", "-inf", "inf-in-batch"],
)
def test_infinite_timestep_is_refused(t, what, out_of_range):
    model = _toy(TDQConfig(grid=TimestepGrid(num_buckets=2, out_of_range=out_of_range)))
    with pytest.raises(
        ValueError, match=rf"timestep argument 'sigma' is {what}; every timestep must be a finite"
    ):
        model(**T.denoiser_inputs(model, t=t))


def test_timesteps_that_do_not_match_the_batch_are_refused():
    model = _toy()
    with pytest.raises(TimestepArgumentError, match=r"holds 3 different timesteps for a batch of 2"):
        model(**T.denoiser_inputs(model, t=torch.tensor([1.0, 2.0, 3.0])))
    # one per sample, in any shape, is per-sample bucketing
    col = model(**T.denoiser_inputs(model, t=torch.tensor([[0.01], [50.0]])))
    flat = model(**T.denoiser_inputs(model, t=torch.tensor([0.01, 50.0])))
    assert torch.equal(col, flat)


@pytest.mark.parametrize("data", [None, "w8a8", ["weight"]])
def test_config_from_something_that_is_not_a_mapping_is_named(data):
    with pytest.raises(ConfigError, match=r"TDQConfig\.from_dict needs a mapping of config fields, got"):
        TDQConfig.from_dict(data)


@pytest.mark.parametrize(
    "outliers, match",
    [
        (
            {"alphas": "0.5"},
            r"outliers\.alphas='0\.5' is not allowed; it must be a non-empty list of numbers",
        ),
        ({"alphas": []}, r"outliers\.alphas=\[\] is not allowed"),
        ({"clip_ratios": [0.9, "x"]}, r"outliers\.clip_ratios=\[0\.9, 'x'\] is not allowed"),
        ({"enabled": "yes"}, r"outliers\.enabled='yes' is not allowed; it must be true or false"),
        ({"min_gain": "0.8"}, r"outliers\.min_gain='0\.8' is not allowed"),
        ({"snapshots": 2.5}, r"outliers\.snapshots=2\.5 is not allowed; it must be a positive integer"),
        ({"fallback_error": float("nan")}, r"outliers\.fallback_error=nan is not allowed"),
    ],
)
def test_bad_outlier_config_values_are_named(outliers, match):
    with pytest.raises(ConfigError, match=match):
        TDQConfig.from_dict({"outliers": outliers})


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.update({"conv1.act_quantizer.scale": t["conv1.act_quantizer.scale"].half()}),
            r"tensor 'conv1\.act_quantizer\.scale' has dtype torch\.float16, expected torch\.float32",
        ),
        (
            lambda t: t.update({"conv1.act_quantizer.bits": t["conv1.act_quantizer.bits"].int()}),
            r"tensor 'conv1\.act_quantizer\.bits' has dtype torch\.int32, expected torch\.int64",
        ),
        (
            _set("conv1.act_quantizer.zero_point", 1e6),
            r"zero_point holds 1000000\.0; a zero-point must be an",
        ),
        (
            _set("conv1.act_quantizer.zero_point", 3.5),
            r"zero_point holds 3\.5; a zero-point must be an integer",
        ),
        (_set("conv1.weight_quantizer.zero_point", -1e4), r"weight_quantizer\.zero_point holds -10000\.0"),
    ],
    ids=["scale-float16", "bits-int32", "zero-point-huge", "zero-point-fraction", "weight-zero-point"],
)
def test_saved_quantizer_buffers_of_wrong_dtype_or_range_are_refused(saved_toy, tmp_path, edit, match):
    _, directory = saved_toy
    _rewrite_state(_copy_state(directory, tmp_path), edit_tensors=edit)
    model = T.ToySigmaDenoiser()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SavedQuantizationError, match=match):
        load_quantization(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_save_into_a_file_path_is_named(tmp_path):
    (tmp_path / "state").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"'.*state' is a file; pass a directory"):
        save_quantization(_toy(), tmp_path / "state")


def _profile(**kw):
    from diffusers import DDPMScheduler

    from tdq.mixed_precision.fisher import profile_sensitivity

    x0 = kw.pop("x0", torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    grid = TimestepGrid(num_buckets=2).resolve("train_timestep", 0, 999)
    args = dict(samples_per_bucket=1, batch_size=1, progress=False, **kw)
    return profile_sensitivity(T.tiny_unet2d(), DDPMScheduler(), x0, grid, **args)


def test_profile_refuses_nan_samples_and_a_layers_string():
    x0 = torch.randn(2, 1, 16, 16)
    x0[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x0 holds NaN/inf in sample\(s\) \[1\]"):
        _profile(x0=x0)
    with pytest.raises(ValueError, match=r"layers='conv_in' must be a list of layer names"):
        _profile(layers="conv_in")


def test_profile_with_non_finite_or_negative_fisher_is_refused(tmp_path):
    from tdq.mixed_precision import SensitivityProfile

    profile = _profile()
    profile.save(tmp_path / "p")
    for value in (float("nan"), float("inf"), -1.0):
        tensors = load_file(str(tmp_path / "p.safetensors"))
        tensors["weight_fisher"][2, 1] = value
        save_file(tensors, str(tmp_path / "q.safetensors"), metadata={"schema_version": "1"})
        manifest = json.loads((tmp_path / "p.json").read_text())
        manifest.update(tensors="q.safetensors", tensors_sha256=sha256_file(tmp_path / "q.safetensors"))
        (tmp_path / "q.json").write_text(json.dumps(manifest))
        layer = profile.layers[2]
        with pytest.raises(ValueError, match=rf"weight_fisher of layer '{layer}' holds NaN, inf or negative"):
            SensitivityProfile.load(tmp_path / "q")


@pytest.mark.parametrize("prompts", [[], "lower newer", ()])
def test_empty_or_string_calibration_prompts_are_refused(prompts):
    from tdq.pipelines import TDQPipeline
    from tdq.testing.pipelines import tiny_sd_components

    pipe = TDQPipeline(**tiny_sd_components())
    with pytest.raises(ValueError, match=r"calibration_prompts=.* must be a non-empty list of prompts"):
        pipe.quantize(calibration_prompts=prompts)


def test_metrics_of_non_finite_images_are_refused():
    from tdq.eval import paired_metrics

    fp = torch.rand(3, 1, 16, 16)
    q = fp.clone()
    q[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"q_images holds 1 NaN/inf value\(s\) \(image\(s\) \[2\]\)"):
        paired_metrics(fp, q, feature=None, lpips_nets=())
