"""Property tests over `TDQConfig` (issue #14): every config that validates quantizes, calibrates and saves/reloads a
tiny model bit-exactly; every config that does not validate is refused with a message naming the field."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tdq
from tdq import ConfigError, TDQConfig
from tdq import testing as T
from tdq.serialization import load_quantization, save_quantization

SETTINGS = settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _spec(bits):
    return st.fixed_dictionaries(
        {
            "bits": bits,
            "symmetric": st.booleans(),
            "rounding": st.sampled_from(["nearest", "stochastic"]),
            "observer": st.sampled_from(["minmax", "percentile", "mse"]),
            "percentile": st.floats(90.0, 100.0),
            "enabled": st.booleans(),
        }
    )


valid_configs = st.fixed_dictionaries(
    {
        "weight": _spec(st.integers(2, 8)).flatmap(
            lambda w: st.sampled_from(
                [
                    {**w, "granularity": "per_tensor"},
                    {**w, "granularity": "per_channel"},
                    {**w, "granularity": "per_group", "group_size": 4},
                    {**w, "granularity": "per_group", "group_size": 7},
                    {**w, "granularity": "per_group", "group_size": 64},
                ]
            )
        ),
        "activation": _spec(st.integers(2, 16)),
        "grid": st.fixed_dictionaries(
            {
                "num_buckets": st.integers(1, 12),
                "out_of_range": st.sampled_from(["nearest", "error"]),
                "spacing": st.sampled_from(["linear", "log"]),
            }
        ),
        "check_finite": st.booleans(),
        "exclude": st.sampled_from([[], ["embed"], ["re:conv2"]]),
        "overrides": st.sampled_from(
            [
                {},
                {"conv1": {"weight_bits": 3, "act_bits": 6}},
                {"re:conv.*": {"activation": {"symmetric": True}}},
            ]
        ),
    }
)

# (where, bad values, the field the message must name)
MUTATIONS = [
    (("weight", "bits"), [1, 9, 8.0, 8.5, "8", None, True], "weight.bits"),
    (("activation", "bits"), [1, 17, 4.5, "eight"], "activation.bits"),
    (("weight", "group_size"), [0, -1, 2.0, "16", 2**40], "weight.group_size"),
    (("weight", "granularity"), ["per_row", 3], "weight.granularity"),
    (("activation", "granularity"), ["per_channel", "per_group"], "activation.granularity"),
    (("weight", "percentile"), [0.0, 101.0, math.nan, math.inf, "99"], "weight.percentile"),
    (("activation", "observer"), ["kl", None], "activation.observer"),
    (("weight", "rounding"), ["up"], "weight.rounding"),
    (("weight", "symmetric"), ["yes", 1, None], "weight.symmetric"),
    (("activation", "enabled"), ["no", 0], "activation.enabled"),
    (("grid", "num_buckets"), [0, -2, 2**40, 3.0, True, "4"], "grid.num_buckets"),
    (("grid", "spacing"), ["cubic"], "grid.spacing"),
    (("grid", "units"), ["seconds", 1], "grid.units"),
    (("grid", "out_of_range"), ["clip"], "grid.out_of_range"),
    (("grid", "t_min"), ["0", math.inf, math.nan], "grid.t_min"),
    (("check_finite",), ["no", 1], "check_finite"),
    (("include",), ["conv1", [], [5], [""]], "include="),
    (("exclude",), ["embed", [None]], "exclude="),
    (("overrides",), [{"conv1": {"weight_bits": 12}}], "overrides['conv1'].weight.bits"),
    (("overrides",), [{"conv1": {"act_bits": 1.5}}], "overrides['conv1'].activation.bits"),
    (("overrides",), [{"conv1": {"skip": "true"}}], "overrides['conv1'].skip"),
    (("weight", "bitz"), [4], "weight: unknown field"),
]


@st.composite
def mutated_configs(draw):
    data = draw(valid_configs)
    where, values, field = draw(st.sampled_from(MUTATIONS))
    value = draw(st.sampled_from(values))
    target = data
    for key in where[:-1]:
        target = target.setdefault(key, {})
    target[where[-1]] = copy.deepcopy(value)
    return data, field


def _calibrate(model):
    with torch.no_grad(), tdq.calibration(model):
        for s in (0.01, 1.0, 50.0):
            model(**T.denoiser_inputs(model, t=s))


def _predict(model):
    with torch.no_grad():
        return model(**T.denoiser_inputs(model, t=0.5, batch=3))


@SETTINGS
@given(data=valid_configs)
def test_every_valid_config_quantizes_calibrates_and_reloads_bit_exactly(data, tmp_path_factory):
    config = TDQConfig.from_dict(data)
    model = tdq.quantize_(T.ToySigmaDenoiser(), config)
    _calibrate(model)
    ref = _predict(model)
    assert torch.isfinite(ref).all()
    directory = tmp_path_factory.mktemp("state")
    save_quantization(model, directory)
    skeleton = T.ToySigmaDenoiser()
    for p in skeleton.parameters():
        torch.nn.init.normal_(p)
    load_quantization(skeleton, directory)
    assert torch.equal(_predict(skeleton), ref)


@SETTINGS
@given(case=mutated_configs())
def test_every_invalid_config_is_refused_naming_the_field(case):
    data, field = case
    with pytest.raises(ConfigError) as e:
        TDQConfig.from_dict(data)
    assert field in str(e.value)
    # a config built directly (not from a dict) is refused the same way by quantize_
    model = T.ToySigmaDenoiser()
    try:
        config = TDQConfig(**data)
    except ConfigError as e2:  # a nested dict with an unknown key is refused at construction
        assert field in str(e2)
        return
    with pytest.raises(ConfigError) as e:
        tdq.quantize_(model, config)
    assert field in str(e.value)
    assert not hasattr(model, "_tdq_quantization")
