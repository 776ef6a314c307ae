"""Latent zoo models: a tiny MNIST VAE, a tiny CLIP, ``mnist-t2i`` (Stable Diffusion layout) and ``mnist-dit``.

Usage (stages must run in this order; ``mnist-t2i`` and ``mnist-dit`` may then run in parallel)::

    python -m tdq.zoo.latent vae          # AutoencoderKL on 32x32 padded MNIST -> 4x8x8 latents, + latent cache
    python -m tdq.zoo.latent clip         # tiny CLIPModel (text + vision tower), contrastive on (image, caption)
    python -m tdq.zoo.latent mnist-t2i    # UNet2DConditionModel on cached latents, frozen CLIP text tower
    python -m tdq.zoo.latent mnist-dit    # class-conditional DiTTransformer2DModel on cached latents

Every stage is resumable: each ``--ckpt-every`` steps the model, its EMA, the optimizer state
(``torch.load(weights_only=True)``-compatible) and a JSON state are written under ``<root>/<stage>/ckpt/``;
rerunning the same command continues from the newest checkpoint. Batches, noise and timesteps are derived from
``(seed, step)``, so a resumed run draws the same data as an uninterrupted one. Every ``--export-every`` steps
the EMA weights are exported in diffusers / transformers format (``tdq/zoo/checkpoints/mnist-clip``,
``mnist-t2i``, ``mnist-dit``), so a usable model exists even if training is killed.

Images are MNIST digits padded from 28x28 to 32x32 (background -1 in ``[-1, 1]``); pipelines therefore
produce 32x32 images; crop ``[2:30, 2:30]`` to get MNIST-sized digits (see [`crop28`]).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tdq.zoo.train import _batch_indices, _ckpt_dirs, _lr_at, ema_update_

__all__ = [
    "DIGIT_WORDS",
    "TEMPLATES",
    "STAGE_CONFIGS",
    "all_captions",
    "caption_vocab",
    "write_tokenizer_files",
    "build_tokenizer",
    "build_vae",
    "build_clip",
    "build_unet",
    "build_dit",
    "build_scheduler",
    "crop28",
    "load_mnist_clip",
    "train_stage",
    "main",
]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_ROOT = Path.home() / ".cache" / "tdq" / "zoo_runs" / "latent"  # --root overrides

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates; ``{}`` is filled with a digit word ("seven") or a numeral ("7")
TEMPLATES = (
    "{}",
    "a handwritten digit {}",
    "the digit {}",
    "the number {}",
    "a handwritten {}",
    "digit {}",
    "an image of the digit {}",
    "a photo of a handwritten number {}",
    "a drawing of the number {}",
    "a picture of a {}",
    "handwritten number {}",
    "a black and white image of the digit {}",
)
MAX_TEXT_LEN = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

STAGE_CONFIGS: dict[str, dict] = {
    "vae": {
        "vae": {
            "in_channels": 1,
            "out_channels": 1,
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "block_out_channels": (16, 32, 64),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 32,
            "mid_block_add_attention": False,
        },
        "steps": 1000,
        "batch_size": 32,
        "lr": 2e-3,
        "min_lr_ratio": 0.05,
        "warmup": 50,
        "ema_decay": 0.995,
        "grad_clip": 1.0,
        "kl_weight": 5e-4,
        "seed": 0,
    },
    "clip": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_TEXT_LEN,
        },
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        "projection_dim": 64,
        "steps": 1200,
        "batch_size": 128,
        "lr": 2e-3,
        "min_lr_ratio": 0.05,
        "warmup": 50,
        "ema_decay": 0.99,
        "grad_clip": 1.0,
        "seed": 1,
    },
    "mnist-t2i": {
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        "steps": 4000,
        "batch_size": 64,
        "lr": 1e-3,
        "min_lr_ratio": 0.05,
        "warmup": 100,
        "ema_decay": 0.999,
        "grad_clip": 1.0,
        "uncond_prob": 0.1,
        "seed": 2,
    },
    "mnist-dit": {
        "dit": {
            "num_attention_heads": 4,
            "attention_head_dim": 24,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 6,
            "sample_size": 8,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,  # DiTPipeline hard-codes class 1000 as the null (CFG) class
            "dropout": 0.0,
        },
        "steps": 4800,
        "batch_size": 128,
        "lr": 5e-4,
        "min_lr_ratio": 0.05,
        "warmup": 100,
        "ema_decay": 0.999,
        "grad_clip": 1.0,
        "uncond_prob": 0.1,
        "seed": 3,
    },
}

#: noise schedule shared by both latent denoisers (Stable Diffusion's, 1000 steps)
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# ----------------------------------------------------------------------------------------------- captions


def all_captions() -> tuple[list[str], list[int]]:
    r"""
    Every training caption: each template in [`TEMPLATES`] filled with each digit word and each numeral.

    Returns:
        `tuple[list[str], list[int]]`: captions and their digit labels.
    """
    caps, labels = [], []
    for d, w in enumerate(DIGIT_WORDS):
        for t in TEMPLATES:
            for filler in (w, str(d)):
                caps.append(t.format(filler))
                labels.append(d)
    return caps, labels


def caption_vocab() -> list[str]:
    r"""
    Sorted list of the distinct words used by the captions.

    Returns:
        `list[str]`: words (lower case letters or single numerals).
    """
    words = set()
    for c in all_captions()[0]:
        words.update(c.split())
    return sorted(words)


def _bpe_segment(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to a symbol sequence, as the tokenizers ``BPE`` model does."""
    syms = list(syms)
    while len(syms) > 1:
        pairs = [
            (ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms[:-1], syms[1:], strict=True))
        ]
        r, i = min(pairs)
        if r == math.inf:
            break
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    return syms


def _word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab + merges of a BPE that encodes each word of ``words`` as one token.

    Words are added one at a time: a word is first segmented with the merges so far, then new (lower
    priority) merges join its pieces left to right, so earlier words keep encoding as single tokens.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    chars = sorted(
        {c for w in words for c in w} | {chr(c) for c in range(ord("a"), ord("z") + 1)} | set("0123456789")
    )
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = _bpe_segment(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = pieces[0]
        for s in pieces[1:]:
            ranks[(cur, s)] = len(merges)
            merges.append((cur, s))
            cur = cur + s
            vocab.setdefault(cur, len(vocab))
    return vocab, merges


def write_tokenizer_files(directory: str | Path) -> tuple[Path, Path]:
    r"""
    Write ``vocab.json`` and ``merges.txt`` of a word-level CLIP BPE covering the caption vocabulary.

    Every caption word maps to a single token; unseen words fall back to character tokens.

    Args:
        directory (`str` or `pathlib.Path`): output directory (created).

    Returns:
        `tuple[pathlib.Path, pathlib.Path]`: paths of ``vocab.json`` and ``merges.txt``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = _word_bpe(caption_vocab())
    (d / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return d / "vocab.json", d / "merges.txt"


def build_tokenizer(directory: str | Path | None = None):
    r"""
    Build the caption [`~transformers.CLIPTokenizer`] from locally generated vocabulary files.

    Args:
        directory (`str` or `pathlib.Path`, *optional*): where to write ``vocab.json``/``merges.txt``
            (a temporary directory when omitted).

    Returns:
        `transformers.CLIPTokenizer`: tokenizer with ``model_max_length`` = 16.
    """
    import tempfile

    from transformers import CLIPTokenizer

    if directory is None:
        directory = tempfile.mkdtemp(prefix="tdq_clip_tok_")
    vf, mf = write_tokenizer_files(directory)
    tok = CLIPTokenizer(vocab=str(vf), merges=str(mf), model_max_length=MAX_TEXT_LEN)
    return tok


# ------------------------------------------------------------------------------------------------ models


def build_vae():
    r"""
    Build the untrained MNIST [`~diffusers.AutoencoderKL`] (1x32x32 <-> 4x8x8).

    Returns:
        `diffusers.AutoencoderKL`: the autoencoder.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(**STAGE_CONFIGS["vae"]["vae"])


def build_clip(vocab_size: int):
    r"""
    Build the untrained tiny [`~transformers.CLIPModel`] (text: 2 layers x 64, vision: ViT 2 layers x 64 on 32x32).

    Args:
        vocab_size (`int`): tokenizer vocabulary size.

    Returns:
        `transformers.CLIPModel`: the model (eos token id 1, bos 0, pad 1).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    c = STAGE_CONFIGS["clip"]
    text = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **c["text"])
    vision = CLIPVisionConfig(**c["vision"])
    cfg = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=c["projection_dim"]
    )
    return CLIPModel(cfg)


def build_unet():
    r"""
    Build the untrained ``mnist-t2i`` [`~diffusers.UNet2DConditionModel`] (4x8x8 latents, 64-d cross-attention).

    Returns:
        `diffusers.UNet2DConditionModel`: the denoiser.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**STAGE_CONFIGS["mnist-t2i"]["unet"])


def build_dit():
    r"""
    Build the untrained ``mnist-dit`` [`~diffusers.DiTTransformer2DModel`] (4x8x8 latents, patch 2, 6 layers x 96).

    Returns:
        `diffusers.DiTTransformer2DModel`: the denoiser.
    """
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    model = DiTTransformer2DModel(**STAGE_CONFIGS["mnist-dit"]["dit"])
    # Every block's LabelEmbedding would otherwise drop labels independently (p=0.1, global RNG) in training
    # mode; label dropout for classifier-free guidance is done once per sample by the training loop instead.
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


def build_scheduler():
    r"""
    Build the exported sampler: [`~diffusers.DDIMScheduler`] with Stable Diffusion's 1000-step noise schedule.

    Returns:
        `diffusers.DDIMScheduler`: the scheduler.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def crop28(images: torch.Tensor) -> torch.Tensor:
    r"""
    Crop 32x32 pipeline outputs back to 28x28 MNIST digits.

    Args:
        images (`torch.Tensor`): ``[N, C, 32, 32]``.

    Returns:
        `torch.Tensor`: ``[N, C, 28, 28]``.
    """
    return images[..., 2:30, 2:30]


def load_mnist_clip(path: str | Path | None = None):
    r"""
    Load the tiny in-domain CLIP (``tdq/zoo/checkpoints/mnist-clip``) and its processor, offline.

    The returned model's ``get_image_features`` / ``get_text_features`` return plain projected tensors (as in
    transformers 4.x), so the pair works as torchmetrics' callable form:
    ``CLIPScore(model_name_or_path=tdq.zoo.latent.load_mnist_clip)``. Images are 32x32 (MNIST padded by 2 px),
    white digit on black, any RGB/uint8 input the ``CLIPImageProcessor`` accepts.

    Args:
        path (`str` or `pathlib.Path`, *optional*): checkpoint directory; defaults to the packaged one.

    Returns:
        `tuple[transformers.CLIPModel, transformers.CLIPProcessor]`: model (eval mode) and processor.
    """
    from transformers import CLIPModel, CLIPProcessor

    class _TensorFeaturesCLIP(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return _pooled(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _pooled(super().get_text_features(*args, **kwargs))

    d = Path(path) if path is not None else CHECKPOINT_ROOT / "mnist-clip"
    model = _TensorFeaturesCLIP.from_pretrained(d, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(d, local_files_only=True)


# ------------------------------------------------------------------------------------------- utilities


def _sd(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _save_ckpt(out: Path, step: int, model, ema, opt, state: dict, keep: int = 2) -> None:
    from safetensors.torch import save_file

    root = out / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_sd(model), str(tmp / "model.safetensors"))
    save_file(_sd(ema), str(tmp / "ema.safetensors"))
    torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _ckpt_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_sd(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True)


def _atomic_dir(dest: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then atomically swap ``tmp_dir`` into ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dest.parent / f".tmp_{dest.name}", dest.parent / f".old_{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _padded_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """Train + valid MNIST (60k) padded to 32x32 in ``[-1, 1]``, and labels."""
    from tdq.zoo.data import load_mnist

    xs, ys = zip(*(load_mnist(s) for s in ("train", "valid")), strict=True)
    x = torch.from_numpy(np.concatenate(xs)).mul(2).sub(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.contiguous(), torch.from_numpy(np.concatenate(ys))


def _info(stage: str, cfg: dict, state: dict) -> dict:
    return {
        "name": stage,
        "step": state["step"],
        "ema": True,
        "loss_ema": state.get("loss_avg"),
        "seconds_trained": state.get("seconds_trained"),
        "s_per_step": state.get("seconds_trained", 0) / max(1, state["step"]),
        "train_config": {k: v for k, v in cfg.items() if not isinstance(v, dict)},
        "train_command": f"python -m tdq.zoo.latent {stage}"
        + (f" --steps {cfg['steps']}" if cfg["steps"] != STAGE_CONFIGS[stage]["steps"] else ""),
    }


def _loop(
    stage: str, out: Path, model, cfg: dict, step_fn, export_fn, ckpt_every: int, export_every: int
) -> int:
    """Generic resumable AdamW + EMA loop; ``step_fn(model, step, gen) -> loss``; ``export_fn(ema, state)``."""
    out.mkdir(parents=True, exist_ok=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=0.0
    )
    step, seconds, loss_avg = 0, 0.0, None
    ckpts = _ckpt_dirs(out)
    if ckpts:
        last = ckpts[-1]
        _load_sd(model, last / "model.safetensors")
        _load_sd(ema, last / "ema.safetensors")
        opt.load_state_dict(torch.load(last / "optim.pt", weights_only=True, map_location="cpu"))
        st = json.loads((last / "state.json").read_text())
        step, seconds, loss_avg = st["step"], st.get("seconds_trained", 0.0), st.get("loss_avg")
        print(f"[{stage}] resumed from {last} at step {step}", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"[{stage}] {nparams / 1e6:.3f}M params, target {cfg['steps']} steps, batch {cfg['batch_size']}",
        flush=True,
    )
    stop = {"flag": False}

    def _on_term(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    model.train()
    win_t, win_l, last_saved, log_path = [], [], step, out / "train_log.jsonl"

    def _state():
        return {"seconds_trained": seconds, "loss_avg": loss_avg, "stage": stage}

    while step < cfg["steps"] and not stop["flag"]:
        t0 = time.perf_counter()
        lr_now = _lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_now
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        torch.manual_seed(cfg["seed"] * 1_000_003 + step)  # any module-internal randomness is per-step too
        loss = step_fn(model, step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        step += 1
        ema_update_(ema, model, step, cfg["ema_decay"])
        dt = time.perf_counter() - t0
        seconds += dt
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        win_t.append(dt)
        win_l.append(lv)
        if step % 20 == 0:
            rec = {
                "step": step,
                "loss": sum(win_l) / len(win_l),
                "loss_ema": loss_avg,
                "lr": lr_now,
                "grad_norm": float(gnorm),
                "s_per_step": sum(win_t) / len(win_t),
                "seconds_trained": seconds,
                "time": time.time(),
            }
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[{stage}] " + json.dumps(rec), flush=True)
            win_t, win_l = [], []
        if step % ckpt_every == 0:
            _save_ckpt(out, step, model, ema, opt, _state())
            last_saved = step
        if step % export_every == 0:
            export_fn(ema, {"step": step, **_state()})
            print(f"[{stage}] exported EMA at step {step}", flush=True)
    if step != last_saved:
        _save_ckpt(out, step, model, ema, opt, _state())
    ema.eval()
    export_fn(ema, {"step": step, **_state()})
    print(f"[{stage}] stopped at step {step} ({seconds:.0f} s trained)", flush=True)
    return step


# ---------------------------------------------------------------------------------------------- stages


def _stage_vae(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    x, y = _padded_mnist()
    n = x.shape[0]
    torch.manual_seed(cfg["seed"])
    vae = build_vae()
    nlat = 4 * 8 * 8

    def step_fn(model, step, gen):
        xb = x[torch.from_numpy(_batch_indices(step, cfg["batch_size"], n, cfg["seed"]))]
        post = model.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = model.decode(z).sample
        return F.l1_loss(rec, xb) + cfg["kl_weight"] * post.kl().mean() / nlat

    def export_fn(ema, state):
        def write(tmp):
            ema.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training_info.json").write_text(json.dumps(_info("vae", cfg, state), indent=2))

        _atomic_dir(root / "vae" / "export", write)

    steps = _loop("vae", root / "vae", vae, cfg, step_fn, export_fn, ckpt_every, export_every)
    if steps >= cfg["steps"]:
        _cache_latents(root)


@torch.no_grad()
def _cache_latents(root: Path) -> Path:
    """Encode the 60k training images (posterior means), set the VAE ``scaling_factor`` = 1/std, save both."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(root / "vae" / "export").eval()
    x, y = _padded_mnist()
    lat = torch.cat([vae.encode(x[i : i + 500]).latent_dist.mean for i in range(0, x.shape[0], 500)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    final = root / "vae" / "final"

    def write(tmp):
        vae.save_pretrained(tmp, safe_serialization=True)
        info = json.loads((root / "vae" / "export" / "training_info.json").read_text())
        info["scaling_factor"] = scale
        info["latent_mean"] = float(lat.mean())
        info["latent_std"] = float(lat.std())
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2))

    _atomic_dir(final, write)
    save_file(
        {"latents": (lat * scale).contiguous(), "labels": y.contiguous()}, str(root / "latents.safetensors")
    )
    print(f"[vae] cached {lat.shape[0]} latents, scaling_factor={scale:.4f}", flush=True)
    return root / "latents.safetensors"


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def _stage_clip(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    from transformers import CLIPProcessor

    x, y = _padded_mnist()
    n = x.shape[0]
    tok = build_tokenizer(root / "clip" / "tokenizer_files")
    caps, cap_labels = all_captions()
    ids = tok(
        caps, padding="max_length", max_length=MAX_TEXT_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    by_digit = [torch.tensor([i for i, lab in enumerate(cap_labels) if lab == d]) for d in range(10)]
    torch.manual_seed(cfg["seed"])
    model = build_clip(len(tok))

    def step_fn(model, step, gen):
        idx = torch.from_numpy(_batch_indices(step, cfg["batch_size"], n, cfg["seed"]))
        xb, yb = x[idx].expand(-1, 3, -1, -1), y[idx]
        pick = torch.randint(0, len(by_digit[0]), (len(idx),), generator=gen)
        cap_idx = torch.stack([by_digit[int(d)][int(p)] for d, p in zip(yb, pick, strict=True)])
        out = model(input_ids=ids[cap_idx], pixel_values=xb)
        # captions of the same digit are all positives: soft targets over the same-class entries
        same = (yb[:, None] == yb[None, :]).float()
        tgt = same / same.sum(1, keepdim=True)
        li, lt = out.logits_per_image, out.logits_per_text
        return 0.5 * (-(tgt * li.log_softmax(1)).sum(1).mean() - (tgt * lt.log_softmax(1)).sum(1).mean())

    def export_fn(ema, state):
        def write(tmp):
            ema.save_pretrained(tmp, safe_serialization=True)
            CLIPProcessor(image_processor=_clip_processor(), tokenizer=tok).save_pretrained(tmp)
            write_tokenizer_files(tmp)  # also the slow-format vocab.json + merges.txt
            info = _info("clip", cfg, state)
            info["zero_shot_acc_valid1k"] = _clip_zero_shot(ema, tok, x[-1000:], y[-1000:])
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2))

        _atomic_dir(root / "clip" / "export", write)
        _atomic_dir(export_root / "mnist-clip", lambda t: _copy_tree(root / "clip" / "export", t))

    _loop("clip", root / "clip", model, cfg, step_fn, export_fn, ckpt_every, export_every)


def _copy_tree(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def _pooled(out) -> torch.Tensor:
    """CLIP ``get_*_features`` return a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _clip_zero_shot(model, tok, x: torch.Tensor, y: torch.Tensor) -> float:
    """Zero-shot accuracy with prompts "a handwritten digit <word>" (x: [N,1,32,32] in [-1, 1])."""
    was = model.training
    model.eval()
    t = tok(
        [f"a handwritten digit {w}" for w in DIGIT_WORDS],
        padding="max_length",
        max_length=MAX_TEXT_LEN,
        return_tensors="pt",
    )
    te = F.normalize(_pooled(model.get_text_features(input_ids=t.input_ids)), dim=-1)
    ie = F.normalize(_pooled(model.get_image_features(pixel_values=x.expand(-1, 3, -1, -1))), dim=-1)
    model.train(was)
    return float(((ie @ te.T).argmax(1) == y).float().mean())


def _load_latents(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    p = root / "latents.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{p} missing: run `python -m tdq.zoo.latent vae` first")
    d = load_file(str(p))
    return d["latents"], d["labels"]


def _diffusion_batch(lat, step, cfg, gen, alphas):
    n = lat.shape[0]
    idx = torch.from_numpy(_batch_indices(step, cfg["batch_size"], n, cfg["seed"]))
    z0 = lat[idx]
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, 1000, (z0.shape[0],), generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    return idx, a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def _stage_t2i(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    lat, y = _load_latents(root)
    clip_dir = root / "clip" / "export"
    if not (clip_dir / "config.json").is_file():
        raise FileNotFoundError(f"{clip_dir} missing: run `python -m tdq.zoo.latent clip` first")
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5: CLIPTextModel holds the CLIPTextTransformer modules directly; 4.x: under ``.text_model``
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    caps, cap_labels = all_captions()
    with torch.no_grad():
        ids = tok(
            caps + [""],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        emb = text_encoder(ids)[0]  # exactly what StableDiffusionPipeline.encode_prompt computes
    uncond = len(caps)
    by_digit = [torch.tensor([i for i, lab in enumerate(cap_labels) if lab == d]) for d in range(10)]
    alphas = build_scheduler().alphas_cumprod
    torch.manual_seed(cfg["seed"])
    unet = build_unet()
    vae = AutoencoderKL.from_pretrained(root / "vae" / "final")

    def step_fn(model, step, gen):
        idx, zt, t, noise = _diffusion_batch(lat, step, cfg, gen, alphas)
        yb = y[idx]
        pick = torch.randint(0, len(by_digit[0]), (len(idx),), generator=gen)
        cap_idx = torch.stack([by_digit[int(d)][int(p)] for d, p in zip(yb, pick, strict=True)])
        drop = torch.rand(len(idx), generator=gen) < cfg["uncond_prob"]
        cap_idx = torch.where(drop, torch.full_like(cap_idx, uncond), cap_idx)
        pred = model(zt, t, encoder_hidden_states=emb[cap_idx]).sample
        return F.mse_loss(pred, noise)

    def export_fn(ema, state):
        def write(tmp):
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tok,
                unet=ema,
                scheduler=build_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            write_tokenizer_files(tmp / "tokenizer")  # also the slow-format vocab.json + merges.txt
            info = _info("mnist-t2i", cfg, state)
            info["pixel_size"] = 32
            info["note"] = "outputs are 32x32 (MNIST padded by 2 px); crop [2:30, 2:30] for 28x28"
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2))

        _atomic_dir(export_root / "mnist-t2i", write)

    _loop("mnist-t2i", root / "mnist-t2i", unet, cfg, step_fn, export_fn, ckpt_every, export_every)


def _stage_dit(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    from diffusers import AutoencoderKL, DiTPipeline

    lat, y = _load_latents(root)
    alphas = build_scheduler().alphas_cumprod
    null_class = cfg["dit"]["num_embeds_ada_norm"]
    torch.manual_seed(cfg["seed"])
    dit = build_dit()
    vae = AutoencoderKL.from_pretrained(root / "vae" / "final")

    def step_fn(model, step, gen):
        idx, zt, t, noise = _diffusion_batch(lat, step, cfg, gen, alphas)
        drop = torch.rand(len(idx), generator=gen) < cfg["uncond_prob"]
        labels = torch.where(drop, torch.full_like(y[idx], null_class), y[idx])
        pred = model(zt, timestep=t, class_labels=labels).sample
        return F.mse_loss(pred, noise)

    def export_fn(ema, state):
        def write(tmp):
            id2label = {str(i): w for i, w in enumerate(DIGIT_WORDS)}
            pipe = DiTPipeline(transformer=ema, vae=vae, scheduler=build_scheduler(), id2label=id2label)
            # stored in model_index.json so that DiTPipeline.from_pretrained restores get_label_ids()
            pipe.register_to_config(id2label=id2label)
            pipe.save_pretrained(tmp, safe_serialization=True)
            info = _info("mnist-dit", cfg, state)
            info["pixel_size"] = 32
            info["id2label"] = dict(enumerate(DIGIT_WORDS))
            info["note"] = "outputs are 32x32 (MNIST padded by 2 px); crop [2:30, 2:30] for 28x28"
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2))

        _atomic_dir(export_root / "mnist-dit", write)

    _loop("mnist-dit", root / "mnist-dit", dit, cfg, step_fn, export_fn, ckpt_every, export_every)


_STAGES = {"vae": _stage_vae, "clip": _stage_clip, "mnist-t2i": _stage_t2i, "mnist-dit": _stage_dit}


def train_stage(
    stage: str,
    root: str | Path = DEFAULT_ROOT,
    steps: int | None = None,
    ckpt_every: int = 100,
    export_every: int = 500,
    threads: int = 1,
    export_root: str | Path | None = None,
) -> None:
    r"""
    Train (or resume) one stage of the latent zoo models.

    Args:
        stage (`str`): ``"vae"``, ``"clip"``, ``"mnist-t2i"`` or ``"mnist-dit"`` (in this order).
        root (`str` or `pathlib.Path`, *optional*): shared work directory of all stages
            (default ``~/.cache/tdq/zoo_runs/latent``); ``mnist-t2i``/``mnist-dit`` read the VAE, the latent
            cache and the CLIP from it.
        steps (`int`, *optional*): total optimizer steps (also the cosine schedule length); default: config.
        ckpt_every (`int`, *optional*, defaults to `100`): steps between resumable checkpoints.
        export_every (`int`, *optional*, defaults to `500`): steps between exports of the EMA weights.
        threads (`int`, *optional*, defaults to `1`): ``torch.set_num_threads`` value.
        export_root (`str` or `pathlib.Path`, *optional*): parent of the exported model directories
            (``mnist-clip``, ``mnist-t2i``, ``mnist-dit``); defaults to the packaged ``tdq/zoo/checkpoints``.
    """
    torch.set_num_threads(threads)
    cfg = copy.deepcopy(STAGE_CONFIGS[stage])
    if steps is not None:
        cfg["steps"] = steps
    _STAGES[stage](Path(root), cfg, ckpt_every, export_every, Path(export_root or CHECKPOINT_ROOT))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``python -m tdq.zoo.latent``."""
    p = argparse.ArgumentParser(prog="python -m tdq.zoo.latent", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(_STAGES))
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="shared work dir of all stages")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--export-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export-root", default=None, help="default: tdq/zoo/checkpoints")
    p.add_argument(
        "--cache-latents", action="store_true", help="vae only: (re)build the latent cache and exit"
    )
    a = p.parse_args(argv)
    if a.cache_latents:
        _cache_latents(Path(a.root))
        return 0
    train_stage(a.stage, a.root, a.steps, a.ckpt_every, a.export_every, a.threads, a.export_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
