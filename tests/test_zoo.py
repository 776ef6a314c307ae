"""Tests of the bundled model zoo: data, judge, packaged checkpoint and resumable training."""

from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

from tdq import zoo
from tdq.utils.safe_pickle import restricted_unpickle
from tdq.zoo import data as zdata
from tdq.zoo import judge as zjudge
from tdq.zoo import train as ztrain


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        restricted_unpickle(payload)
    with pytest.raises(pickle.UnpicklingError, match="_Evil"):
        restricted_unpickle(pickle.dumps(_Evil, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_unpickle(b"cbuiltins\neval\n(S'1+1'\ntR.")


def test_restricted_unpickler_reads_numpy():
    arrs = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        got = restricted_unpickle(pickle.dumps(arrs, protocol=proto))
        np.testing.assert_array_equal(got[0], arrs[0])
        np.testing.assert_array_equal(got[1], arrs[1])
    # the packaged file is readable by the same unpickler (first bytes only would not parse; read whole)
    with gzip.open(zdata.mnist_pickle_path(), "rb") as f:
        assert f.read(2) == b"\x80\x02"


def test_load_mnist_shapes():
    sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for split, n in sizes.items():
        x, y = zdata.load_mnist(split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(np.unique(y[:1000]).tolist()) == set(range(10))
    assert zdata.load_mnist("test")[1][:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    with pytest.raises(ValueError):
        zdata.load_mnist("nope")


def test_judge_classifies_test_digits():
    judge = zjudge.load_judge()
    x, y = zdata.load_mnist("test")
    xb = torch.from_numpy(x[:64])
    with torch.no_grad():
        logits = judge(xb)
        feats = judge.features(xb)
        fmod = judge.feature_extractor()
    assert logits.shape == (64, 10) and feats.shape == (64, 128) and fmod.num_features == 128
    acc = (logits.argmax(-1).numpy() == y[:64]).mean()
    assert acc >= 62 / 64
    with pytest.raises(ValueError):
        judge(torch.zeros(1, 1, 32, 32))


def test_zoo_registry_errors(monkeypatch, tmp_path):
    with pytest.raises(KeyError, match="mnist-ddpm"):
        zoo.path("does-not-exist")
    assert {"mnist-ddpm", "mnist-t2i", "mnist-dit"} <= set(zoo.REGISTRY)
    monkeypatch.setattr(zoo, "CHECKPOINT_ROOT", tmp_path)
    assert zoo.available() == []
    with pytest.raises(FileNotFoundError, match="python -m tdq.zoo.train mnist-ddpm"):
        zoo.path("mnist-ddpm")
    with pytest.raises(FileNotFoundError, match="not trained"):
        zoo.load("mnist-dit")


@pytest.fixture(scope="module")
def ddpm_dir():
    p = zoo.path("mnist-ddpm")  # the packaged checkpoint must exist (python -m tdq.zoo.train mnist-ddpm)
    assert (p / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    return p


def test_zoo_load_offline_and_unet_call(ddpm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = zoo.load("mnist-ddpm")
    assert isinstance(pipe, DDPMPipeline)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.prediction_type == "epsilon"
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.unet(x, torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_ddim_sampling_deterministic(ddpm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(ddpm_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe(batch_size=2, generator=g, num_inference_steps=3, output_type="np").images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 28, 28, 1) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


TINY = {
    "unet": {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
    },
    "scheduler": dict(ztrain.TRAIN_CONFIGS["mnist-ddpm"]["scheduler"]),
    **{k: v for k, v in ztrain.TRAIN_CONFIGS["mnist-ddpm"].items() if k not in ("unet", "scheduler")},
    "batch_size": 4,
    "warmup": 2,
}


def test_train_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file

    monkeypatch.setitem(ztrain.TRAIN_CONFIGS, "tiny", TINY)
    kw = dict(ckpt_every=2, export_every=100, log_every=1, threads=1)
    ztrain.train("tiny", tmp_path / "a", steps=4, export_dir=tmp_path / "ea", **kw)
    ztrain.train("tiny", tmp_path / "b", steps=2, export_dir=tmp_path / "eb", **kw)
    ztrain.train("tiny", tmp_path / "b", steps=4, export_dir=tmp_path / "eb", **kw)
    for f in ("model", "ema"):
        a = load_file(str(tmp_path / "a" / "ckpt" / "step_0000004" / f"{f}.safetensors"))
        b = load_file(str(tmp_path / "b" / "ckpt" / "step_0000004" / f"{f}.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    opt = torch.load(tmp_path / "b" / "ckpt" / "step_0000004" / "optim.pt", weights_only=True)
    assert "state" in opt and "param_groups" in opt
    pipe = DDPMPipeline.from_pretrained(tmp_path / "eb", local_files_only=True)
    ema = load_file(str(tmp_path / "b" / "ckpt" / "step_0000004" / "ema.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    # the export of the latest checkpoint reproduces the same weights
    ztrain.export_latest("tiny", tmp_path / "b", tmp_path / "ec")
    again = DDPMPipeline.from_pretrained(tmp_path / "ec", local_files_only=True)
    for k, v in again.unet.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)


def test_batch_order_is_a_permutation():
    idx = np.concatenate([ztrain._batch_indices(s, 100, 1000, 0) for s in range(10)])
    assert sorted(idx.tolist()) == list(range(1000))
    assert not np.array_equal(ztrain._batch_indices(0, 100, 1000, 0), ztrain._batch_indices(10, 100, 1000, 0))


def test_refusal_names_class():
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=2).dump(pickle.Pickler)
    with pytest.raises(pickle.UnpicklingError, match="Pickler"):
        restricted_unpickle(buf.getvalue())
