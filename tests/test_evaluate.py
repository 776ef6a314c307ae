"""`tdq.evaluate` and the quantizer plug-ins of `tdq run` (registry, config group, MAC accounting, NaN reporting)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tdq
from tdq.errors import ConfigError
from tdq.run import quantizers
from tdq.run.config import ScheduleConfig
from tdq.run.job import run_experiment
from tdq.testing.runs import tiny_random_run

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny random UNet, few seeds and steps, no feature networks: each run takes about a second.
SMALL = tiny_random_run(
    calibration={"num_inference_steps": 3}, eval={"num_samples": 3, "num_inference_steps": 3, "batch_size": 3}
)


def _paired(report):
    return {k: report[k] for k in ("psnr", "ssim", "psnr_per_image", "ssim_per_image", "drift")}


def test_custom_quantizer_matches_tdq_run(tmp_path):
    """A quantizer function doing tdq's quantize + calibrate scores exactly what `tdq run` (quantizer=tdq) scores."""

    def mine(model, ctx):
        tdq.quantize_(model, ctx.quant, num_train_timesteps=ctx.num_train_timesteps)
        ctx.calibrate_tdq(model)
        return model

    ref = run_experiment(SMALL, tmp_path / "run")
    out = tdq.evaluate(mine, config=SMALL, run_dir=tmp_path / "evaluate")
    assert _paired(out) == _paired(ref)
    assert 0 < ref["psnr"] < 60 and ref["drift"][-1] > 0  # a real quantization, not a no-op
    assert out["quantizer"]["name"] == "custom:test_custom_quantizer_matches_tdq_run.<locals>.mine"
    assert ref["quantizer"]["name"] == "tdq" and ref["quantizer"]["mac_share_quantized"] == 1.0
    assert out["quantizer"]["mac_share_quantized"] == 1.0 and out["quantizer"]["nonfinite_samples"] == 0
    assert out["run_dir"] == str(tmp_path / "evaluate")
    assert (
        json.loads((tmp_path / "evaluate" / "report.json").read_text())["quantizer"]["layers_quantized"] > 0
    )


def test_static_plugin_is_the_one_bucket_preset(tmp_path):
    """`quantizer=static` equals tdq's stages with one bucket (`quant=w8a8-static`), and differs from 3 buckets."""
    static_cfg = copy.deepcopy(SMALL)
    static_cfg["quant"] = {"grid": {"num_buckets": 1}}
    ref = run_experiment(static_cfg, tmp_path / "run")
    out = tdq.evaluate("static", config=SMALL, run_dir=tmp_path / "static")
    assert _paired(out) == _paired(ref)
    assert out["quantizer"]["tdq_config"]["num_buckets"] == 1
    aware = run_experiment(SMALL, tmp_path / "aware")
    assert out["psnr"] != aware["psnr"]


def test_identity_quantizer_scores_exact(tmp_path):
    out = tdq.evaluate(lambda model, ctx: model, config=SMALL, run_dir=tmp_path)
    assert out["psnr"] == "inf" and out["ssim"] == pytest.approx(1.0)  # strict JSON: inf as "inf"
    assert out["drift"] == [0.0] * 3
    q = out["quantizer"]
    assert q["mac_share_quantized"] == 0.0 and q["layers_quantized"] == 0 and q["macs_total"] > 0


def test_nan_outputs_are_reported_not_hidden(tmp_path):
    def nan_on_first_sample(model, ctx):
        def hook(module, args, out):
            s = out.sample.clone()
            s[0] = float("nan")
            return type(out)(sample=s)

        model.register_forward_hook(hook)
        return model

    out = tdq.evaluate(nan_on_first_sample, config=SMALL, run_dir=tmp_path)
    q = out["quantizer"]
    assert q["nonfinite_samples"] == 1 and q["nonfinite_seeds"] == [0]
    assert out["psnr"] is None and out["psnr_per_image"][0] is None  # NaN in strict JSON, not dropped
    assert "Warning: 1 of 3 quantized samples contain NaN/inf" in (tmp_path / "report.md").read_text()


def test_unknown_quantizer_lists_the_available_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"quantizer='nope' is unknown; available: \[.*'quanto-w8a8'.*'static'"
    ):
        tdq.evaluate("nope", config=SMALL, run_dir=tmp_path)
    assert not (tmp_path / "report.json").exists()
    cfg = copy.deepcopy(SMALL)
    cfg["quantizer"] = {"name": "static", "options": {"bogus": 1}}
    with pytest.raises(ConfigError, match=r"options \['bogus'\] are not understood by quantizer 'static'"):
        run_experiment(cfg, tmp_path / "opts")
    with pytest.raises(
        ConfigError, match=r"quantizer='nope' is not a config of group 'quantizer'; choose one of"
    ):
        tdq.evaluate("tdq", overrides=["quantizer=nope"])
    with pytest.raises(ConfigError, match="backend='x86' lowers tdq's own quantization only"):
        run_experiment({**SMALL, "backend": "x86", "quantizer": {"name": "static"}}, tmp_path / "be")
    # schedule settings a non-tdq quantizer would silently ignore are refused, naming the field
    for sched, field in [
        ({"planner": "none", "float_fallback": True}, "float_fallback"),
        ({"planner": "uniform"}, "planner"),
    ]:
        with pytest.raises(ConfigError, match=rf"schedule\.{field}=.*quantizer 'static' does not use"):
            run_experiment({**SMALL, "schedule": sched, "quantizer": {"name": "static"}}, tmp_path / "sc")
    quantizers.check_schedule_unused(
        SimpleNamespace(schedule=ScheduleConfig()), quantizers.get_quantizer("static")
    )


def test_quantizer_must_return_a_module(tmp_path):
    with pytest.raises(TypeError, match="returned NoneType; it must return the quantized nn.Module"):
        tdq.evaluate(lambda model, ctx: None, config=SMALL, run_dir=tmp_path)


def test_missing_extra_is_a_clear_error(monkeypatch):
    entry = quantizers.get_quantizer("quanto-w8a8")
    monkeypatch.setitem(
        quantizers._REGISTRY,
        "quanto-w8a8",
        quantizers.QuantizerEntry(**{**vars(entry), "requires": ("no_such_pkg",)}),
    )
    with pytest.raises(
        quantizers.QuantizerUnavailableError, match=r"needs \['no_such_pkg'\].*tdq\[baselines\]"
    ):
        tdq.evaluate("quanto-w8a8", config=SMALL)


def test_register_quantizer_and_config_group(tmp_path):
    from hydra import compose, initialize_config_dir

    from tdq.run.cli import register_schemas
    from tdq.run.config import to_run_config
    from tdq.run.evaluate import CONFIG_DIR, compose_run_config

    @quantizers.register_quantizer("test-w8-only")
    def w8_only(model, ctx):
        """tdq weights only (A16)."""
        tdq.quantize_(
            model, tdq.TDQConfig(activation={"bits": 16}), num_train_timesteps=ctx.num_train_timesteps
        )
        ctx.calibrate_tdq(model)
        return model

    try:
        assert quantizers.available_quantizers()["test-w8-only"] == "tdq weights only (A16)."
        with pytest.raises(ValueError, match="already registered"):
            quantizers.register_quantizer("test-w8-only")(lambda m, c: m)
        out = tdq.evaluate("test-w8-only", config=SMALL, run_dir=tmp_path)
        assert (
            out["quantizer"]["mac_share_weights"] == 1.0 and out["quantizer"]["mac_share_activations"] == 0.0
        )
    finally:
        quantizers._REGISTRY.pop("test-w8-only")
    # every shipped config of the group names a registered quantizer, and Hydra composes it into the schema
    names = sorted(p.stem for p in (CONFIG_DIR / "quantizer").glob("*.yaml"))
    assert set(names) <= set(quantizers.available_quantizers()) and "tdq" in names
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for ov in (["quantizer=quanto-w4a8", "quant=w4a8", "eval.num_samples=5"], []):
            hydra_cfg = to_run_config(compose(config_name="config", overrides=ov))
            assert hydra_cfg == compose_run_config(ov)
    assert hydra_cfg.quantizer.name == "tdq" and compose_run_config(ov[:1]).quantizer.name == "tdq"


def test_layer_macs_and_share():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(self.conv(x).mean((2, 3)))

    net = Net()
    macs = quantizers.layer_macs(net, {"args": (torch.randn(5, 2, 6, 6),), "kwargs": {}})
    assert macs == {"conv": 5 * 4 * 36 * (2 // 2) * 9, "lin": 5 * 3 * 4}
    q = {"lin": {"how": "x", "weights": True, "activations": False}}
    rep = quantizers.mac_report(macs, q)
    assert (
        rep["mac_share_quantized"] == pytest.approx(60 / (6480 + 60)) and rep["mac_share_activations"] == 0.0
    )
    assert rep["layers_not_quantized"] == ["conv"]
