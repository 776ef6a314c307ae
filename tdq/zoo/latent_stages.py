"""The training stages of the latent zoo models: VAE (+ latent cache), CLIP, ``mnist-t2i`` and ``mnist-dit``.

Each stage builds its model and data, then hands a loss (`step_fn`) and an export (`export_fn`) to the shared
[`tdq.zoo.loop.train_loop`]. Run them with ``python -m tdq.zoo.latent <stage>`` ([`tdq.zoo.latent.train_stage`]).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tdq.utils.io import atomic_write_dir
from tdq.zoo.captions import DIGIT_WORDS, MAX_TEXT_LEN, all_captions, build_tokenizer, write_tokenizer_files
from tdq.zoo.latent_models import (
    STAGE_CONFIGS,
    _clip_processor,
    _pooled,
    build_clip,
    build_dit,
    build_scheduler,
    build_unet,
    build_vae,
)
from tdq.zoo.loop import batch_indices, noised_batch, train_loop


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


def _train(
    stage: str, out: Path, model, cfg: dict, step_fn, export_fn, ckpt_every: int, export_every: int
) -> int:
    """[`train_loop`] with the latent stages' logging (every 20 steps, ``[stage]`` prefix) and state."""
    return train_loop(
        model,
        cfg,
        out,
        step_fn,
        export_fn,
        ckpt_every=ckpt_every,
        export_every=export_every,
        log_every=20,
        state={"stage": stage},
        log_prefix=f"[{stage}] ",
    )


def _stage_vae(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    x, y = _padded_mnist()
    n = x.shape[0]
    torch.manual_seed(cfg["seed"])
    vae = build_vae()
    nlat = 4 * 8 * 8

    def step_fn(model, step, gen):
        xb = x[torch.from_numpy(batch_indices(step, cfg["batch_size"], n, cfg["seed"]))]
        post = model.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = model.decode(z).sample
        return F.l1_loss(rec, xb) + cfg["kl_weight"] * post.kl().mean() / nlat

    def export_fn(ema, state):
        def write(tmp):
            ema.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training_info.json").write_text(json.dumps(_info("vae", cfg, state), indent=2))

        atomic_write_dir(root / "vae" / "export", write)

    steps = _train("vae", root / "vae", vae, cfg, step_fn, export_fn, ckpt_every, export_every)
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

    atomic_write_dir(final, write)
    save_file(
        {"latents": (lat * scale).contiguous(), "labels": y.contiguous()}, str(root / "latents.safetensors")
    )
    print(f"[vae] cached {lat.shape[0]} latents, scaling_factor={scale:.4f}", flush=True)
    return root / "latents.safetensors"


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
        idx = torch.from_numpy(batch_indices(step, cfg["batch_size"], n, cfg["seed"]))
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

        atomic_write_dir(root / "clip" / "export", write)
        atomic_write_dir(export_root / "mnist-clip", lambda t: _copy_tree(root / "clip" / "export", t))

    _train("clip", root / "clip", model, cfg, step_fn, export_fn, ckpt_every, export_every)


def _copy_tree(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


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
        idx, zt, t, noise = noised_batch(lat, step, cfg, gen, alphas)
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

        atomic_write_dir(export_root / "mnist-t2i", write)

    _train("mnist-t2i", root / "mnist-t2i", unet, cfg, step_fn, export_fn, ckpt_every, export_every)


def _stage_dit(root: Path, cfg: dict, ckpt_every: int, export_every: int, export_root: Path) -> None:
    from diffusers import AutoencoderKL, DiTPipeline

    lat, y = _load_latents(root)
    alphas = build_scheduler().alphas_cumprod
    null_class = cfg["dit"]["num_embeds_ada_norm"]
    torch.manual_seed(cfg["seed"])
    dit = build_dit()
    vae = AutoencoderKL.from_pretrained(root / "vae" / "final")

    def step_fn(model, step, gen):
        idx, zt, t, noise = noised_batch(lat, step, cfg, gen, alphas)
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

        atomic_write_dir(export_root / "mnist-dit", write)

    _train("mnist-dit", root / "mnist-dit", dit, cfg, step_fn, export_fn, ckpt_every, export_every)


_STAGES = {"vae": _stage_vae, "clip": _stage_clip, "mnist-t2i": _stage_t2i, "mnist-dit": _stage_dit}
