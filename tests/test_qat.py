"""tdq.qat: LSQ fine-tuning learns step sizes, lowers the error to FP, resumes exactly, saves and runs on x86."""

import copy
from pathlib import Path

import pytest
import torch
from _layer_match import assert_layers_match
from diffusers import DDIMScheduler

import tdq
from tdq.config import QuantSpec, TDQConfig
from tdq.errors import ConfigError
from tdq.qat import LSQState, QATConfig, distillation_error, finetune_qat, fp_samples, timestep_pool
from tdq.qat.lora import check_no_lora
from tdq.quant.backends import get_cpu_capability
from tdq.testing import tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5  # sampler steps of the tiny model's calibration and x0 samples


def _scheduler():
    return DDIMScheduler(num_train_timesteps=1000)


def _qat_config(**kw) -> QATConfig:
    base = dict(
        enabled=True, steps=30, lr=1e-2, weight_lr=2e-2, batch_size=4, num_samples=4, sample_steps=STEPS,
        eval_steps=STEPS,
    )  # fmt: skip
    base.update(kw)
    return QATConfig(**base)


@pytest.fixture(scope="module")
def calibrated():
    """(FP model, calibrated W4A8 model, x0) of the tiny UNet; copy before changing."""
    torch.manual_seed(0)
    fp = tiny_unet2d()
    cfg = TDQConfig(
        weight=QuantSpec(bits=4, granularity="per_channel"),
        activation=QuantSpec(bits=8, symmetric=False),
        grid=tdq.TimestepGrid(num_buckets=4),
    )
    q = tdq.quantize_(copy.deepcopy(fp), cfg)
    from tdq.sampling import DiffusionSampler

    sampler = DiffusionSampler(q, _scheduler(), (1, 16, 16), num_inference_steps=STEPS, progress=False,
                               record_trajectory=False)  # fmt: skip
    tdq.calibrate(q, lambda: sampler(list(range(500, 504))))
    x0 = fp_samples(fp, _scheduler(), _qat_config())
    return fp, q, x0


def _copy(q):
    return copy.deepcopy(q)


def test_step_sizes_get_gradients_and_change(calibrated):
    fp, q0, x0 = calibrated
    q = _copy(q0)
    w_scale0 = {n: m.weight_quantizer.scale.clone() for n, m in tdq.iter_quant_layers(q)}
    a_scale0 = {n: m.act_quantizer.scale.clone() for n, m in tdq.iter_quant_layers(q)}
    # one backward pass: every layer's step sizes receive a finite, non-zero gradient
    state = LSQState(q, learn_weights=False)
    state.attach()
    sched = _scheduler()
    pool = timestep_pool(sched, _qat_config())
    x_t = sched.add_noise(x0[:4], torch.randn_like(x0[:4]), pool[:4])
    loss = ((q(x_t, pool[:4]).sample - fp(x_t, pool[:4]).sample) ** 2).mean()
    loss.backward()
    state.detach()
    for name, st in state.layers.items():
        assert st.p_w.grad is not None and bool(torch.isfinite(st.p_w.grad).all()), name
        assert float(st.p_w.grad.abs().sum()) > 0, name
        assert st.p_a.grad is not None and float(st.p_a.grad.abs().sum()) > 0, name
    # a short fine-tuning changes the buffers the quantizers use (written back), all finite and positive
    finetune_qat(q, fp, _scheduler(), _qat_config(steps=3, weight_lr=0.0), x0=x0, heldout_batches=0)
    moved_w = moved_a = 0
    for n, m in tdq.iter_quant_layers(q):
        s_w, s_a = m.weight_quantizer.scale, m.act_quantizer.scale
        assert bool(torch.isfinite(s_w).all() & (s_w > 0).all()) and bool(
            torch.isfinite(s_a).all() & (s_a > 0).all()
        )
        moved_w += int(not torch.equal(s_w, w_scale0[n]))
        moved_a += int(not torch.equal(s_a, a_scale0[n]))
        # the stored range agrees with the learned scale (set_bits would recompute the same scale)
        wq = m.weight_quantizer
        s_re, _ = tdq.quant.functional.scale_zero_point(
            wq.min_val, wq.max_val, int(wq.bits), wq.spec.symmetric
        )
        torch.testing.assert_close(s_re, wq.scale)
    n_layers = len(list(tdq.iter_quant_layers(q)))
    assert moved_w == n_layers and moved_a == n_layers


def test_loss_falls_and_heldout_error_below_ptq(calibrated):
    fp, q0, x0 = calibrated
    q = _copy(q0)
    sched = _scheduler()
    cfg = _qat_config(steps=30)
    pool = timestep_pool(sched, cfg)
    # held-out inputs: FP samples of other seeds, other noise
    x0_held = fp_samples(fp, sched, _qat_config(sample_seed=777, num_samples=4))
    err_ptq = distillation_error(q, fp, sched, x0_held, pool, seed=99)
    rep = finetune_qat(q, fp, sched, cfg, x0=x0, heldout_batches=0)
    err_qat = distillation_error(q, fp, sched, x0_held, pool, seed=99)
    assert rep["loss_last"] < 0.8 * rep["loss_first"], rep
    assert err_qat < 0.9 * err_ptq, (err_qat, err_ptq)
    # every weight is back on its quantizer's grid
    with torch.no_grad():
        for _, m in tdq.iter_quant_layers(q):
            assert torch.equal(m.weight_quantizer(m.weight), m.weight)


def test_resume_equals_straight_run(calibrated, tmp_path):
    fp, q0, x0 = calibrated
    straight = _copy(q0)
    finetune_qat(straight, fp, _scheduler(), _qat_config(steps=6), x0=x0, heldout_batches=0)
    resumed = _copy(q0)
    ck = str(tmp_path / "ck")
    finetune_qat(
        resumed,
        fp,
        _scheduler(),
        _qat_config(steps=3, checkpoint_dir=ck, checkpoint_every=3),
        x0=x0,
        heldout_batches=0,
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "qat_state.00000003.safetensors",
        "qat_state.json",
    ]
    resumed = _copy(q0)  # a fresh process: the model as calibration left it, the checkpoint on disk
    rep = finetune_qat(
        resumed,
        fp,
        _scheduler(),
        _qat_config(steps=6, checkpoint_dir=ck, checkpoint_every=3),
        x0=x0,
        heldout_batches=0,
    )
    assert rep["resumed_from"] == 3
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # a changed setting is refused, naming the field
    with pytest.raises(ConfigError, match=r"qat\.lr"):
        finetune_qat(
            _copy(q0),
            fp,
            _scheduler(),
            _qat_config(steps=6, lr=0.5, checkpoint_dir=ck),
            x0=x0,
            heldout_batches=0,
        )


def test_checkpoint_killed_mid_save_resumes_from_the_last_whole_one(calibrated, tmp_path, monkeypatch):
    """A save that dies before its JSON is published leaves the previous step's pair, which resumes; tensors that
    do not match the JSON are refused, naming the file."""
    import tdq.qat.train as train

    fp, q0, x0 = calibrated
    ck = tmp_path / "ck"
    cfg = _qat_config(steps=4, checkpoint_dir=str(ck), checkpoint_every=2)
    real = train.atomic_write

    def dies_at_step_4_json(path, write, **kw):
        if Path(path).name == "qat_state.json" and (ck / "qat_state.00000004.safetensors").exists():
            raise KeyboardInterrupt
        return real(path, write, **kw)

    monkeypatch.setattr(train, "atomic_write", dies_at_step_4_json)
    with pytest.raises(KeyboardInterrupt):
        finetune_qat(_copy(q0), fp, _scheduler(), cfg, x0=x0, heldout_batches=0)
    monkeypatch.setattr(train, "atomic_write", real)
    rep = finetune_qat(_copy(q0), fp, _scheduler(), cfg, x0=x0, heldout_batches=0)
    assert rep["resumed_from"] == 2
    assert sorted(p.name for p in ck.iterdir()) == ["qat_state.00000004.safetensors", "qat_state.json"]
    (ck / "qat_state.00000004.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match=r"qat_state\.00000004\.safetensors"):
        finetune_qat(_copy(q0), fp, _scheduler(), cfg, x0=x0, heldout_batches=0)


def test_saved_state_reloads_bit_exact_and_runs_on_x86(calibrated, tmp_path):
    fp, q0, x0 = calibrated
    q = _copy(q0)
    finetune_qat(q, fp, _scheduler(), _qat_config(steps=3), x0=x0, heldout_batches=0)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600, 600])
    with torch.no_grad():
        ref = q(x, t).sample
    tdq.save_quantization(q, tmp_path / "state")
    loaded = tdq.load_quantization(tiny_unet2d(), tmp_path / "state")
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, ref)
    for (n, a), (_, b) in zip(tdq.iter_quant_layers(q), tdq.iter_quant_layers(loaded), strict=True):
        assert torch.equal(a.act_quantizer.scale, b.act_quantizer.scale), n
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale), n
    if not get_cpu_capability()["onednn_int8"]:
        pytest.skip("PyTorch without oneDNN int8 kernels")

    # every converted layer equals its simulated twin on the input it saw (a whole-output bound cannot separate
    # a correct backend from a wrong one: one activation code over a rounding boundary cascades, see _layer_match)
    real = tdq.to_backend(tdq.load_quantization(tiny_unet2d(), tmp_path / "state"), "x86")
    with torch.no_grad():
        assert bool(torch.isfinite(real(x, t).sample).all())
    assert_layers_match(real, q, {"sample": x, "timestep": t})


def test_lora_trains_in_float_and_backends_refuse_it(calibrated):
    fp, q0, x0 = calibrated
    q = _copy(q0)
    rep = finetune_qat(
        q, fp, _scheduler(), _qat_config(steps=3, lora_rank=2, lora_lr=1e-2), x0=x0, heldout_batches=0
    )
    assert rep["lora_rank"] == 2
    ads = tdq.qat.lora_adapters(q)
    assert len(ads) == len(list(tdq.iter_quant_layers(q)))
    assert any(float(a.b.weight.abs().sum()) > 0 for a in ads.values())  # B started at zero and learned
    with pytest.raises(NotImplementedError, match="LoRA"):
        check_no_lora(q, "the x86 backend")
    with pytest.raises(NotImplementedError, match="LoRA"):
        tdq.to_backend(q, "x86")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", -1),
        ("lr", float("nan")),
        ("weight_lr", -1.0),
        ("batch_size", 0),
        ("timesteps", "linear"),
        ("lora_rank", 1.5),
        ("checkpoint_every", 0),
        ("seed", "x"),
        ("enabled", 1),
    ],
)
def test_bad_config_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=rf"qat\.{field}"):
        TDQConfig(qat={field: value}).validate()
    with pytest.raises(ConfigError, match=r"unknown field"):
        TDQConfig(qat={"stepz": 3})
    assert TDQConfig().qat.enabled is False  # off by default
