"""Train the bundled zoo models.

Usage::

    python -m tdq.zoo.train mnist-ddpm [--steps N] [--out DIR] [--export DIR]

Training is resumable: every ``--ckpt-every`` steps the model, its EMA, the optimizer state and a JSON
state file are written to ``DIR/ckpt/step_XXXXXXX/`` (safetensors for weights, ``optim.pt`` loadable with
``torch.load(weights_only=True)``), and a restart with the same ``--out`` continues from the latest one.
Data order, noise and timesteps are derived from ``(seed, step)``, so a resumed run draws the same
batches as an uninterrupted one. Every ``--export-every`` steps the EMA weights are exported in diffusers
format (``unet/`` + ``scheduler/`` + ``model_index.json``) to ``--export`` (by default the packaged
``tdq/zoo/checkpoints/<name>/``), so a usable model exists even when training is killed.
"""

from __future__ import annotations

import argparse
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

__all__ = ["TRAIN_CONFIGS", "build_unet", "build_scheduler", "train", "export_latest", "main"]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"

TRAIN_CONFIGS: dict[str, dict] = {
    "mnist-ddpm": {
        "unet": {
            "sample_size": 28,
            "in_channels": 1,
            "out_channels": 1,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 128),
            "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            "attention_head_dim": 32,
        },
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "prediction_type": "epsilon",
            "clip_sample": True,
        },
        "steps": 4500,
        "batch_size": 128,
        "lr": 1e-3,
        "min_lr_ratio": 0.1,
        "warmup": 200,
        "weight_decay": 0.0,
        "ema_decay": 0.999,
        "grad_clip": 1.0,
        "seed": 0,
    },
}


def build_unet(name: str):
    r"""
    Build a freshly initialised UNet for a zoo model.

    Args:
        name (`str`):
            Zoo model name, a key of [`TRAIN_CONFIGS`].

    Returns:
        `diffusers.UNet2DModel`: the untrained network.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(**TRAIN_CONFIGS[name]["unet"])


def build_scheduler(name: str):
    r"""
    Build the training noise scheduler of a zoo model.

    Args:
        name (`str`):
            Zoo model name, a key of [`TRAIN_CONFIGS`].

    Returns:
        `diffusers.DDPMScheduler`: the scheduler (epsilon prediction, 1000 training timesteps).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(**TRAIN_CONFIGS[name]["scheduler"])


def _lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``cfg['steps']``."""
    base, warm, total = cfg["lr"], cfg["warmup"], max(cfg["steps"], cfg["warmup"] + 1)
    if step < warm:
        return base * (step + 1) / warm
    frac = min(1.0, (step - warm) / (total - warm))
    lo = cfg["min_lr_ratio"]
    return base * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


def _ckpt_dirs(out: Path) -> list[Path]:
    root = out / "ckpt"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()
    )


def _save_checkpoint(out: Path, step: int, model, ema, opt, extra: dict, keep: int = 2) -> Path:
    from safetensors.torch import save_file

    root = out / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.detach().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    torch.save(opt.state_dict(), tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _ckpt_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _export(name: str, ema, export_dir: Path, info: dict) -> Path:
    """Write ``ema`` as a diffusers ``DDPMPipeline`` (unet/ + scheduler/ + model_index.json), atomically."""
    from diffusers import DDPMPipeline

    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = export_dir.parent / f".tmp_{export_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = DDPMPipeline(unet=ema, scheduler=build_scheduler(name))
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2))
    old = export_dir.parent / f".old_{export_dir.name}"
    shutil.rmtree(old, ignore_errors=True)
    if export_dir.exists():
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return export_dir


def _load_weights(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def export_latest(name: str, out: str | Path, export_dir: str | Path | None = None) -> Path:
    r"""
    Export the EMA weights of the latest training checkpoint in diffusers format.

    Args:
        name (`str`):
            Zoo model name.
        out (`str` or `pathlib.Path`):
            Training work directory (the ``--out`` of the run).
        export_dir (`str` or `pathlib.Path`, *optional*):
            Destination; defaults to the packaged ``tdq/zoo/checkpoints/<name>/``.

    Returns:
        `pathlib.Path`: the export directory.
    """
    out = Path(out)
    ckpts = _ckpt_dirs(out)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {out / 'ckpt'}")
    ema = build_unet(name)
    _load_weights(ema, ckpts[-1] / "ema.safetensors")
    state = json.loads((ckpts[-1] / "state.json").read_text())
    return _export(name, ema, Path(export_dir) if export_dir else CHECKPOINT_ROOT / name, _info(name, state))


def _info(name: str, state: dict) -> dict:
    cfg = TRAIN_CONFIGS[name]
    return {
        "name": name,
        "step": state["step"],
        "ema": True,
        "ema_loss_avg": state.get("loss_avg"),
        "seconds_trained": state.get("seconds_trained"),
        "train_config": {k: v for k, v in cfg.items() if k not in ("unet", "scheduler")}
        | state.get("overrides", {}),
        "train_command": f"python -m tdq.zoo.train {name}",
    }


@torch.no_grad()
def ema_update_(ema, model, step: int, max_decay: float) -> None:
    """Move `ema`'s parameters toward `model`'s (decay warms up as `(1 + step) / (10 + step)`); copy buffers."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def _batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Indices of the batch for global ``step``: a fresh permutation per epoch, seeded by ``(seed, epoch)``."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch : (pos + 1) * batch]


def train(
    name: str,
    out: str | Path,
    steps: int | None = None,
    export_dir: str | Path | None = None,
    ckpt_every: int = 100,
    export_every: int = 500,
    log_every: int = 10,
    threads: int = 2,
    batch_size: int | None = None,
    lr: float | None = None,
) -> Path:
    r"""
    Train (or resume training of) a zoo diffusion model.

    Args:
        name (`str`):
            Zoo model name, a key of [`TRAIN_CONFIGS`] (currently ``"mnist-ddpm"``).
        out (`str` or `pathlib.Path`):
            Work directory for checkpoints (``ckpt/``) and the log (``train_log.jsonl``); resumes from it.
        steps (`int`, *optional*):
            Total optimizer steps (also the length of the cosine learning-rate schedule); defaults to the config.
        export_dir (`str` or `pathlib.Path`, *optional*):
            Where the EMA model is exported in diffusers format; defaults to ``tdq/zoo/checkpoints/<name>/``.
        ckpt_every (`int`, *optional*, defaults to `100`):
            Steps between resumable checkpoints.
        export_every (`int`, *optional*, defaults to `500`):
            Steps between diffusers exports of the EMA model.
        log_every (`int`, *optional*, defaults to `10`):
            Steps between log lines.
        threads (`int`, *optional*, defaults to `2`):
            ``torch.set_num_threads`` value.
        batch_size (`int`, *optional*):
            Override of the config batch size.
        lr (`float`, *optional*):
            Override of the config peak learning rate.

    Returns:
        `pathlib.Path`: the export directory.
    """
    from tdq.zoo.data import load_mnist

    torch.set_num_threads(threads)
    cfg = dict(TRAIN_CONFIGS[name])
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    cfg.update(overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_dir = Path(export_dir) if export_dir else CHECKPOINT_ROOT / name
    log_path = out / "train_log.jsonl"

    xs = [load_mnist(s)[0] for s in ("train", "valid")]  # 60k images; the test split stays held out
    data = torch.from_numpy(np.concatenate(xs)).mul_(2).sub_(1)  # [-1, 1]
    n = data.shape[0]

    torch.manual_seed(cfg["seed"])
    model = build_unet(name)
    ema = build_unet(name)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    sched = build_scheduler(name)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    step, seconds, loss_avg = 0, 0.0, None
    ckpts = _ckpt_dirs(out)
    if ckpts:
        last = ckpts[-1]
        _load_weights(model, last / "model.safetensors")
        _load_weights(ema, last / "ema.safetensors")
        opt.load_state_dict(torch.load(last / "optim.pt", weights_only=True, map_location="cpu"))
        st = json.loads((last / "state.json").read_text())
        step, seconds, loss_avg = st["step"], st.get("seconds_trained", 0.0), st.get("loss_avg")
        print(f"resumed from {last} at step {step}", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: {nparams / 1e6:.2f}M params, {n} images, target {cfg['steps']} steps, batch {cfg['batch_size']}",
        flush=True,
    )

    stop = {"flag": False}

    def _on_term(signum, frame):  # finish the current step, then checkpoint + export
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)

    def _state():
        return {"seconds_trained": seconds, "loss_avg": loss_avg, "overrides": overrides, "name": name}

    alphas = sched.alphas_cumprod
    model.train()
    win_t, win_l = [], []
    last_saved = step
    while step < cfg["steps"] and not stop["flag"]:
        t0 = time.perf_counter()
        lr_now = _lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_now
        idx = _batch_indices(step, cfg["batch_size"], n, cfg["seed"])
        x0 = data[torch.from_numpy(idx)]
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
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
        if step % log_every == 0:
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
            print(json.dumps(rec), flush=True)
            win_t, win_l = [], []
        if step % ckpt_every == 0:
            _save_checkpoint(out, step, model, ema, opt, _state())
            last_saved = step
        if step % export_every == 0:
            _export(name, ema, export_dir, _info(name, {"step": step, **_state()}))
            print(f"exported EMA model at step {step} to {export_dir}", flush=True)
    if step != last_saved:
        _save_checkpoint(out, step, model, ema, opt, _state())
    _export(name, ema, export_dir, _info(name, {"step": step, **_state()}))
    print(f"done at step {step}; exported to {export_dir}", flush=True)
    return export_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``python -m tdq.zoo.train``."""
    p = argparse.ArgumentParser(prog="python -m tdq.zoo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(TRAIN_CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: config)")
    p.add_argument("--out", default=None, help="work dir (default: ~/.cache/tdq/zoo_runs/<name>)")
    p.add_argument("--export", default=None, help="export dir (default: tdq/zoo/checkpoints/<name>)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--export-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--export-only", action="store_true", help="only export the latest checkpoint's EMA weights"
    )
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path.home() / ".cache" / "tdq" / "zoo_runs" / a.name
    if a.export_only:
        print(export_latest(a.name, out, a.export))
        return 0
    train(
        a.name,
        out,
        steps=a.steps,
        export_dir=a.export,
        ckpt_every=a.ckpt_every,
        export_every=a.export_every,
        threads=a.threads,
        batch_size=a.batch_size,
        lr=a.lr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
