"""Train the bundled zoo models.

Usage::

    python -m tdq.zoo.train mnist-ddpm [--steps N] [--out DIR] [--export DIR]

Training is resumable: every ``--ckpt-every`` steps the model, its EMA, the optimizer state and a JSON
state file are written to ``DIR/ckpt/step_XXXXXXX/`` (safetensors for weights, ``optim.pt`` loadable with
``torch.load(weights_only=True)``), and a restart with the same ``--out`` continues from the latest one.
Data order, noise and timesteps are derived from ``(seed, step)``, so a resumed run draws the same
batches as an uninterrupted one. Every ``--export-every`` steps the EMA weights are exported in diffusers
format (``unet/`` + ``scheduler/`` + ``model_index.json``) to ``--export`` (by default the packaged
``tdq/zoo/checkpoints/<name>/``), so a usable model exists even when training is killed. The loop itself is
[`tdq.zoo.loop.train_loop`], shared with the latent zoo models (``python -m tdq.zoo.latent``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tdq.utils.io import atomic_write_dir
from tdq.zoo.loop import batch_indices as _batch_indices  # noqa: F401 (the name tests and notebooks use)
from tdq.zoo.loop import checkpoint_dirs, load_weights, noised_batch, train_loop

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


def _export(name: str, ema, export_dir: Path, info: dict) -> Path:
    """Write ``ema`` as a diffusers ``DDPMPipeline`` (unet/ + scheduler/ + model_index.json), atomically."""
    from diffusers import DDPMPipeline

    def write(tmp: Path) -> None:
        DDPMPipeline(unet=ema, scheduler=build_scheduler(name)).save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2))

    return atomic_write_dir(export_dir, write)


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
    ckpts = checkpoint_dirs(out)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {out / 'ckpt'}")
    ema = build_unet(name)
    load_weights(ema, ckpts[-1] / "ema.safetensors")
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

    xs = [load_mnist(s)[0] for s in ("train", "valid")]  # 60k images; the test split stays held out
    data = torch.from_numpy(np.concatenate(xs)).mul_(2).sub_(1)  # [-1, 1]
    n = data.shape[0]

    torch.manual_seed(cfg["seed"])
    model = build_unet(name)
    alphas = build_scheduler(name).alphas_cumprod
    print(f"{name}: {n} images", flush=True)

    def step_fn(model, step: int, gen: torch.Generator) -> torch.Tensor:
        _, xt, t, noise = noised_batch(data, step, cfg, gen, alphas)
        return torch.nn.functional.mse_loss(model(xt, t).sample, noise)

    def export_fn(ema, state: dict) -> None:
        _export(name, ema, export_dir, _info(name, state))

    train_loop(
        model,
        cfg,
        out,
        step_fn,
        export_fn,
        ckpt_every=ckpt_every,
        export_every=export_every,
        log_every=log_every,
        state={"overrides": overrides, "name": name},
    )
    print(f"exported to {export_dir}", flush=True)
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
