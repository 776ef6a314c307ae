import json

import pytest
import torch

import tdq
from tdq import ConfigError, LayerOverride, QuantSpec, TDQConfig, TimestepGrid
from tdq import testing as T


def test_dict_roundtrip_through_json():
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_group", group_size=32),
        activation=QuantSpec(bits=6, symmetric=False, observer="mse"),
        grid=TimestepGrid(num_buckets=5, units="sigma", t_min=0.01, t_max=80.0, spacing="log"),
        exclude=["re:.*conv_out"],
        overrides={"re:time_embedding.*": LayerOverride(weight_bits=8, act_bits=8)},
    )
    again = TDQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"weight": {"bits": 9}}, "weight.bits"),
        ({"weight": {"bits": 1}}, "weight.bits"),
        ({"activation": {"bits": 32}}, "activation.bits"),
        ({"weight": {"granularity": "per_row"}}, "weight.granularity"),
        ({"activation": {"granularity": "per_channel"}}, "activation.granularity"),
        ({"activation": {"observer": "kl"}}, "activation.observer"),
        ({"grid": {"num_buckets": 0}}, "grid.num_buckets"),
        ({"grid": {"units": "seconds"}}, "grid.units"),
        ({"weight": {"bitz": 4}}, "weight: unknown field"),
        ({"version": 99}, "version=99"),
        ({"overrides": {"conv_in": {"weight_bits": 12}}}, "overrides['conv_in'].weight.bits"),
    ],
)
def test_bad_fields_are_named(data, field):
    with pytest.raises(ConfigError) as e:
        TDQConfig.from_dict(data)
    assert field in str(e.value)


def test_include_exclude_and_overrides_apply():
    model = T.tiny_unet2d()
    cfg = TDQConfig(
        exclude=["conv_in", "re:.*attentions.*"],
        overrides={
            "conv_out": LayerOverride(weight_bits=4, act_bits=6),
            "re:time_embedding.*": LayerOverride(skip=True),
        },
    )
    tdq.quantize_(model, cfg)
    names = dict(tdq.iter_quant_layers(model))
    assert "conv_in" not in names and not any("attentions" in n or "time_embedding" in n for n in names)
    assert int(names["conv_out"].weight_quantizer.bits) == 4
    assert names["conv_out"].act_quantizer.bits.tolist() == [6] * 10
    assert int(names["down_blocks.0.resnets.0.conv1"].weight_quantizer.bits) == 8


def test_hydra_structured_config_validates_types():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(TDQConfig)
    merged = OmegaConf.merge(schema, {"weight": {"bits": 4}, "grid": {"num_buckets": 4}})
    cfg = TDQConfig.from_dict(merged)
    assert cfg.weight.bits == 4 and cfg.grid.num_buckets == 4
    with pytest.raises(Exception, match="bits"):
        OmegaConf.merge(schema, {"weight": {"bits": "eight"}})


def test_set_bits_rejects_unsupported():
    model = T.GrowingActivationDenoiser()
    tdq.quantize_(model)
    with pytest.raises(ValueError, match="layer 'proj'.*weight bits=12"):
        model.proj.set_bits(weight_bits=12)
    with pytest.raises(ValueError, match="act_bits has 3 buckets"):
        model.proj.set_bits(act_bits=torch.tensor([8, 8, 8]))
