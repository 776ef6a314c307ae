"""Tests of the latent zoo models (``mnist-t2i``, ``mnist-dit``, ``mnist-clip``) and their training recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tdq.zoo import latent as zl

CKPT = Path(zl.__file__).resolve().parent / "checkpoints"


def _dir(name: str) -> Path:
    p = CKPT / name
    if not (p / ("config.json" if name == "mnist-clip" else "model_index.json")).is_file():
        pytest.fail(f"{name} not exported: run `python -m tdq.zoo.latent` (see tdq/zoo/latent.py)")
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
    return p


def test_word_level_bpe_roundtrip(tmp_path):
    from transformers import CLIPTokenizer

    vf, mf = zl.write_tokenizer_files(tmp_path)
    tok = CLIPTokenizer(str(vf), str(mf), model_max_length=zl.MAX_TEXT_LEN)
    caps, _ = zl.all_captions()
    for c in caps:
        ids = tok(c).input_ids
        assert len(ids) == len(c.split()) + 2, c  # one token per word + bos/eos
        assert tok.decode(ids, skip_special_tokens=True) == c
    assert tok("A  Handwritten digit SEVEN").input_ids == tok("a handwritten digit seven").input_ids
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]


@pytest.fixture(scope="module")
def t2i():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        _dir("mnist-t2i"), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t2i_loads_and_tokenizer_roundtrips(t2i):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(t2i.unet, UNet2DConditionModel) and isinstance(t2i.vae, AutoencoderKL)
    assert isinstance(t2i.text_encoder, CLIPTextModel) and isinstance(t2i.tokenizer, CLIPTokenizer)
    assert isinstance(t2i.scheduler, DDIMScheduler) and t2i.scheduler.config.num_train_timesteps == 1000
    prompt = "a handwritten digit seven"
    ids = t2i.tokenizer(prompt).input_ids
    assert t2i.tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert t2i.tokenizer.model_max_length == zl.MAX_TEXT_LEN
    assert t2i.vae.config.scaling_factor != 1.0  # set from the latent std after VAE training


def test_t2i_unet_call_shapes(t2i):
    ids = t2i.tokenizer(
        ["the number 3", ""],
        padding="max_length",
        max_length=t2i.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        emb = t2i.text_encoder(ids)[0]
        assert emb.shape == (2, zl.MAX_TEXT_LEN, t2i.unet.config.cross_attention_dim)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = t2i.unet(z, torch.tensor([10, 900]), encoder_hidden_states=emb).sample
        img = t2i.vae.decode(z / t2i.vae.config.scaling_factor).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert img.shape == (2, 1, 32, 32)


def test_t2i_sampling_deterministic(t2i):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return t2i(
            ["a handwritten digit two", "the number 5"],
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=g,
            output_type="np",
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 32, 32, 1) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture(scope="module")
def dit():
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(_dir("mnist-dit"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_loads_and_call_shapes(dit):
    from diffusers import DiTTransformer2DModel

    assert isinstance(dit.transformer, DiTTransformer2DModel)
    assert dit.get_label_ids(["seven", "zero"]) == [7, 0]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = dit.transformer(
            z, timestep=torch.tensor([10, 900]), class_labels=torch.tensor([3, 1000])
        ).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_dit_sampling_deterministic(dit):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return dit(
            class_labels=[2, 5], num_inference_steps=3, guidance_scale=4.0, generator=g, output_type="np"
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 32, 32, 1) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_clip_loads_and_scores():
    from transformers import CLIPModel, CLIPProcessor

    d = _dir("mnist-clip")
    model = CLIPModel.from_pretrained(d).eval()
    proc = CLIPProcessor.from_pretrained(d)
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    inputs = proc(
        text=["a handwritten digit seven", "the number 1"],
        images=[img],
        return_tensors="pt",
        padding="max_length",
    )
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (1, 2)


def _tiny_root(tmp_path: Path) -> Path:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    root = tmp_path / "root"
    cfg = dict(zl.STAGE_CONFIGS["vae"]["vae"], block_out_channels=(8, 8, 8), norm_num_groups=4)
    AutoencoderKL(**cfg).save_pretrained(root / "vae" / "final")
    g = torch.Generator().manual_seed(0)
    save_file(
        {"latents": torch.randn(64, 4, 8, 8, generator=g), "labels": torch.arange(64) % 10},
        str(root / "latents.safetensors"),
    )
    return root


def test_dit_stage_resume_matches_uninterrupted(tmp_path, monkeypatch):
    from diffusers import DiTPipeline
    from safetensors.torch import load_file

    cfg = copy.deepcopy(zl.STAGE_CONFIGS["mnist-dit"])
    cfg["dit"].update(num_layers=1, attention_head_dim=8, num_attention_heads=2)
    cfg.update(batch_size=8, warmup=2)
    monkeypatch.setitem(zl.STAGE_CONFIGS, "mnist-dit", cfg)
    root = _tiny_root(tmp_path)
    kw = dict(ckpt_every=2, export_every=100, threads=1)
    zl.train_stage("mnist-dit", root, steps=4, export_root=tmp_path / "ea", **kw)
    root_b = tmp_path / "b"
    root_b.mkdir()
    for p in ("vae", "latents.safetensors"):
        src = root / p
        (root_b / p).symlink_to(src, target_is_directory=src.is_dir())
    zl.train_stage("mnist-dit", root_b, steps=2, export_root=tmp_path / "eb", **kw)
    zl.train_stage("mnist-dit", root_b, steps=4, export_root=tmp_path / "eb", **kw)
    for f in ("model", "ema"):
        a = load_file(str(root / "mnist-dit" / "ckpt" / "step_0000004" / f"{f}.safetensors"))
        b = load_file(str(root_b / "mnist-dit" / "ckpt" / "step_0000004" / f"{f}.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    opt = torch.load(root_b / "mnist-dit" / "ckpt" / "step_0000004" / "optim.pt", weights_only=True)
    assert "state" in opt and "param_groups" in opt
    pipe = DiTPipeline.from_pretrained(tmp_path / "eb" / "mnist-dit", local_files_only=True)
    ema = load_file(str(root_b / "mnist-dit" / "ckpt" / "step_0000004" / "ema.safetensors"))
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    info = json.loads((tmp_path / "eb" / "mnist-dit" / "training_info.json").read_text())
    assert info["step"] == 4


def test_mnist_clip_torchmetrics_clipscore():
    import torch.nn.functional as F
    from torchmetrics.multimodal.clip_score import CLIPScore

    from tdq.zoo.data import load_mnist

    _dir("mnist-clip")
    metric = CLIPScore(model_name_or_path=zl.load_mnist_clip)
    x, y = load_mnist("test")
    imgs = (F.pad(torch.from_numpy(x[:20]), (2, 2, 2, 2)) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    matched = float(metric(list(imgs), [f"a handwritten digit {zl.DIGIT_WORDS[int(t)]}" for t in y[:20]]))
    metric.reset()
    wrong = float(
        metric(list(imgs), [f"a handwritten digit {zl.DIGIT_WORDS[(int(t) + 3) % 10]}" for t in y[:20]])
    )
    assert matched > wrong + 20
