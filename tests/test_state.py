"""Save/load of the tdq state: integer codes, bit-exact reload, and clear errors that leave the model untouched."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import tdq
from tdq.config import LayerOverride, QuantSpec, TDQConfig
from tdq.quant.functional import unpack_int4
from tdq.serialization import (
    CONFIG_FILE,
    STATE_FILE,
    SavedQuantizationError,
    load_quantization,
    read_saved_quantization,
    save_quantization,
)
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d_condition

W8 = TDQConfig()
W4_AFFINE_GROUPS = TDQConfig(
    weight=QuantSpec(bits=4, granularity="per_group", group_size=16, symmetric=False),
    overrides={"conv_in": LayerOverride(weight_bits=3), "conv_out": LayerOverride(weight_bits=6)},
)


def _calibrated(config=W8, **overrides):
    model = tdq.quantize_(tiny_unet2d_condition(**overrides), config)
    with tdq.calibration(model), torch.no_grad():
        for t in (20.0, 480.0, 950.0):
            model(**denoiser_inputs(model, t=t))
    return model


def _predict(model, t=700.0):
    with torch.no_grad():
        return output_tensor(model(**denoiser_inputs(model, t=t)))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    assert not hasattr(model, "_tdq_quantization")
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _calibrated()
    directory = save_quantization(model, tmp_path_factory.mktemp("state"), source_model="tiny-unet")
    return model, directory


@pytest.mark.parametrize("config", [W8, W4_AFFINE_GROUPS], ids=["w8-per-channel", "w4-affine-per-group"])
def test_reload_into_random_skeleton_is_bit_exact(config, tmp_path):
    model = _calibrated(config)
    ref = _predict(model)
    save_quantization(model, tmp_path)
    skeleton = tiny_unet2d_condition()
    for p in skeleton.parameters():  # prove every value comes from the state
        torch.nn.init.normal_(p)
    load_quantization(skeleton, tmp_path)
    assert torch.equal(_predict(skeleton), ref)
    for (name, a), (_, b) in zip(tdq.iter_quant_layers(model), tdq.iter_quant_layers(skeleton), strict=True):
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name


def test_weights_are_stored_as_integer_codes(tmp_path):
    model = _calibrated(W4_AFFINE_GROUPS)
    save_quantization(model, tmp_path)
    tensors = load_file(str(tmp_path / STATE_FILE))
    layers = dict(tdq.iter_quant_layers(model))
    for name, m in layers.items():
        assert name + ".weight" not in tensors  # no float copy of a quantized weight
        codes = tensors[name + ".weight_codes"]
        expected = m.weight_quantizer.int_codes(m.weight).to(torch.int16)
        assert codes.dtype == torch.uint8
        if int(m.weight_quantizer.bits) <= 4:  # packed two per byte
            assert codes.numel() == (expected.numel() + 1) // 2
            unpacked = unpack_int4(codes, expected.numel()).to(torch.int16) & 0xF
        else:
            unpacked = codes.to(torch.int16)
        assert torch.equal(unpacked.reshape(expected.shape), expected), name
    assert int(tensors["conv_in.weight_quantizer.bits"]) == 3
    rows = layers["conv_out"].weight_quantizer.scale.shape[0]
    assert tensors["conv_out.weight_codes"].shape == (rows, 16)  # 6 bits: int8 rows of one group each


def test_sidecar_records_config_grid_schedule_and_hash(saved):
    model, directory = saved
    sidecar = read_saved_quantization(directory)
    state = tdq.get_quantization(model)
    assert sidecar["schema_version"] == 1
    assert sidecar["tdq_version"] == tdq.__version__
    assert sidecar["source_model"] == "tiny-unet"
    assert sidecar["config"] == state.config.to_dict()
    assert sidecar["grid"] == state.grid.to_dict()
    assert sidecar["grid"]["units"] == "train_timestep" and sidecar["grid"]["t_max"] == 999.0
    assert sidecar["adapter"]["arg_name"] == "timestep"
    names = [n for n, _ in tdq.iter_quant_layers(model)]
    assert sidecar["schedule"]["layers"] == names
    assert sidecar["schedule"]["weight_bits"] == [8] * len(names)
    assert sidecar["schedule"]["act_bits"][0] == [8] * state.grid.num_buckets
    assert len(sidecar["state_sha256"]) == 64


def test_state_of_another_model_names_first_mismatched_layer(saved):
    _, directory = saved
    other = tiny_unet2d_condition(block_out_channels=(8, 32))
    snapshot = _snapshot(other)
    with pytest.raises(
        SavedQuantizationError, match="first mismatched layer 'down_blocks.1.resnets.0.conv1'"
    ):
        load_quantization(other, directory)
    _assert_untouched(other, snapshot)


def test_state_with_other_layer_selection_names_the_layer(tmp_path):
    model = _calibrated(TDQConfig(exclude=["conv_in"]))
    save_quantization(model, tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    data["config"]["exclude"] = []  # now the model would quantize conv_in, which the state lacks
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match="first mismatched layer 'conv_in'"):
        load_quantization(target, tmp_path)
    _assert_untouched(target, snapshot)


def _copy_state(src, dst):
    dst.mkdir()
    for name in (STATE_FILE, CONFIG_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_safetensors_is_a_clear_error(saved, tmp_path):
    directory = _copy_state(saved[1], tmp_path / "s")
    path = directory / STATE_FILE
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match="corrupted or truncated"):
        load_quantization(target, directory)
    _assert_untouched(target, snapshot)


def test_flipped_byte_fails_the_hash(saved, tmp_path):
    directory = _copy_state(saved[1], tmp_path / "s")
    data = bytearray((directory / STATE_FILE).read_bytes())
    data[-10] ^= 0xFF
    (directory / STATE_FILE).write_bytes(bytes(data))
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match="sha256"):
        load_quantization(target, directory)
    _assert_untouched(target, snapshot)


def test_corrupted_sidecar_is_a_clear_error(saved, tmp_path):
    directory = _copy_state(saved[1], tmp_path / "s")
    text = (directory / CONFIG_FILE).read_text()
    (directory / CONFIG_FILE).write_text(text[: len(text) // 3])
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match="not valid JSON"):
        load_quantization(target, directory)
    _assert_untouched(target, snapshot)


def test_sidecar_bits_disagreeing_with_tensors_is_corruption(saved, tmp_path):
    directory = _copy_state(saved[1], tmp_path / "s")
    data = json.loads((directory / CONFIG_FILE).read_text())
    data["layers"][0]["weight_bits"] = 5
    (directory / CONFIG_FILE).write_text(json.dumps(data))
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match="corrupted"):
        load_quantization(target, directory)
    _assert_untouched(target, snapshot)


def test_unknown_schema_version_lists_readable_versions(saved, tmp_path):
    directory = _copy_state(saved[1], tmp_path / "s")
    data = json.loads((directory / CONFIG_FILE).read_text())
    data["schema_version"] = 99
    (directory / CONFIG_FILE).write_text(json.dumps(data))
    target = tiny_unet2d_condition()
    snapshot = _snapshot(target)
    with pytest.raises(SavedQuantizationError, match=r"schema_version=99.*readable versions: \[1\]"):
        load_quantization(target, directory)
    _assert_untouched(target, snapshot)


def test_missing_state_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_quantization(tiny_unet2d_condition(), tmp_path)


def test_uncalibrated_model_cannot_be_saved(tmp_path):
    model = tdq.quantize_(tiny_unet2d_condition(), TDQConfig())
    with pytest.raises(tdq.NotCalibratedError):
        save_quantization(model, tmp_path)


def test_overlay_state_holds_only_quantized_layers(tmp_path):
    model = _calibrated()
    ref = _predict(model)
    save_quantization(model, tmp_path, include_float=False)
    tensors = load_file(str(tmp_path / STATE_FILE))
    assert "time_embedding.linear_1.weight_codes" in tensors
    assert not any(k.startswith("conv_norm_out.") for k in tensors)  # a GroupNorm: not stored
    target = tiny_unet2d_condition()  # same seed: same float weights outside the quantized layers
    load_quantization(target, tmp_path)
    assert torch.equal(_predict(target), ref)


def test_load_into_model_quantized_with_same_config(saved):
    model, directory = saved
    target = tdq.quantize_(tiny_unet2d_condition(), TDQConfig())
    load_quantization(target, directory)
    assert torch.equal(_predict(target), _predict(model))
    other = tdq.quantize_(tiny_unet2d_condition(), TDQConfig(weight=QuantSpec(bits=6)))
    with pytest.raises(SavedQuantizationError, match="another config"):
        load_quantization(other, directory)


def test_state_is_much_smaller_than_float_weights(tmp_path):
    # A UNet large enough that per-layer quantizer buffers are small next to the weights.
    bigger = dict(block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=8)
    fp_bytes = sum(
        v.numel() * v.element_size() for v in tiny_unet2d_condition(**bigger).state_dict().values()
    )
    model = _calibrated(**bigger)
    save_quantization(model, tmp_path / "q")
    ratio = os.path.getsize(tmp_path / "q" / STATE_FILE) / fp_bytes
    assert ratio < 0.4  # int8 codes: ~0.25 plus float norms/biases and per-channel scales
