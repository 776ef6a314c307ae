"""The one resumable training loop of the zoo models (pixel DDPM, VAE, CLIP, latent UNet and DiT).

[`train_loop`] owns what every zoo training run shares: AdamW with linear warmup and cosine decay
([`lr_at`]), gradient clipping, an EMA of the weights ([`ema_update_`]), per-step seeding (batches, noise and
timesteps are functions of `(seed, step)`, see [`batch_indices`] and [`noised_batch`]), resumable checkpoints
(``<out>/ckpt/step_XXXXXXX/``: ``model.safetensors``, ``ema.safetensors``, ``optim.pt`` loadable with
``torch.load(weights_only=True)``, ``state.json``), a JSON-lines log, periodic exports of the EMA weights and a
SIGTERM/SIGINT handler that finishes the current step, checkpoints and exports. A model only supplies its loss
(`step_fn`) and its export (`export_fn`), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdq.utils.io import atomic_write_dir

__all__ = [
    "batch_indices",
    "checkpoint_dirs",
    "ema_update_",
    "load_weights",
    "lr_at",
    "noised_batch",
    "save_checkpoint",
    "step_seed",
    "train_loop",
]


def lr_at(step: int, cfg: Mapping[str, Any]) -> float:
    """Linear warmup over ``cfg['warmup']`` steps, then cosine decay to ``min_lr_ratio * lr`` at ``cfg['steps']``."""
    base, warm, total = cfg["lr"], cfg["warmup"], max(cfg["steps"], cfg["warmup"] + 1)
    if step < warm:
        return base * (step + 1) / warm
    frac = min(1.0, (step - warm) / (total - warm))
    lo = cfg["min_lr_ratio"]
    return base * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Indices of the batch for global ``step``: a fresh permutation per epoch, seeded by ``(seed, epoch)``."""
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch : (pos + 1) * batch]


def step_seed(seed: int, step: int) -> int:
    """The seed of everything random in optimizer step ``step`` of a run seeded ``seed``."""
    return seed * 1_000_003 + step


def noised_batch(
    data: torch.Tensor, step: int, cfg: Mapping[str, Any], gen: torch.Generator, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The diffusion training batch of ``step``: clean rows of ``data`` noised at uniformly drawn timesteps.

    Args:
        data (`torch.Tensor`): all clean samples (images in ``[-1, 1]`` or scaled latents), ``[N, C, H, W]``.
        step (`int`): the global optimizer step (picks the rows, see [`batch_indices`]).
        cfg (`Mapping`): ``batch_size`` and ``seed``.
        gen (`torch.Generator`): the step's generator; draws the noise, then the timesteps.
        alphas_cumprod (`torch.Tensor`): the noise schedule, one entry per training timestep.

    Returns:
        `tuple`: ``(idx, x_t, t, noise)``: the row indices, the noised batch, its timesteps and its noise.
    """
    idx = torch.from_numpy(batch_indices(step, cfg["batch_size"], data.shape[0], cfg["seed"]))
    x0 = data[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return idx, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


@torch.no_grad()
def ema_update_(ema, model, step: int, max_decay: float) -> None:
    """Move `ema`'s parameters toward `model`'s (decay warms up as `(1 + step) / (10 + step)`); copy buffers."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """The complete checkpoints ``<out>/ckpt/step_*/`` (with a ``state.json``), oldest first."""
    root = Path(out) / "ckpt"
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()
    )


def _state_dict(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(
    out: str | Path, step: int, model, ema, opt, state: Mapping[str, Any], keep: int = 2
) -> Path:
    r"""
    Write the resumable checkpoint ``<out>/ckpt/step_XXXXXXX/`` atomically and keep only the newest ``keep``.

    Args:
        out (`str` or `pathlib.Path`): the run's work directory.
        step (`int`): optimizer steps done.
        model (`nn.Module`): the trained model (``model.safetensors``).
        ema (`nn.Module`): its EMA (``ema.safetensors``).
        opt (`torch.optim.Optimizer`): its optimizer (``optim.pt``, tensors and plain values only).
        state (`Mapping`): JSON-safe run state (``state.json``, with ``step`` added).
        keep (`int`, *optional*, defaults to `2`): checkpoints kept.

    Returns:
        `pathlib.Path`: the checkpoint directory.
    """
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(_state_dict(model), str(tmp / "model.safetensors"))
        save_file(_state_dict(ema), str(tmp / "ema.safetensors"))
        torch.save(opt.state_dict(), tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    final = atomic_write_dir(Path(out) / "ckpt" / f"step_{step:07d}", write)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(module, path: str | Path) -> None:
    """Load a ``.safetensors`` state dict into `module` (strict)."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True)


def train_loop(
    model,
    cfg: Mapping[str, Any],
    out: str | Path,
    step_fn: Callable[[Any, int, torch.Generator], torch.Tensor],
    export_fn: Callable[[Any, dict[str, Any]], Any],
    *,
    ckpt_every: int = 100,
    export_every: int = 500,
    log_every: int = 10,
    state: Mapping[str, Any] | None = None,
    log_prefix: str = "",
) -> int:
    r"""
    Train `model` with AdamW + EMA until ``cfg['steps']``, resuming from the newest checkpoint under `out`.

    Every step sets the learning rate ([`lr_at`]), seeds a fresh generator and the global RNG with
    [`step_seed`] (so any module-internal randomness is a function of the step too), calls
    ``loss = step_fn(model, step, generator)``, back-propagates, clips the gradient norm to ``cfg['grad_clip']``,
    steps the optimizer and updates the EMA. Every `log_every` steps a line goes to ``<out>/train_log.jsonl``
    and stdout, every `ckpt_every` steps a checkpoint ([`save_checkpoint`]) and every `export_every` steps
    ``export_fn(ema, state)``; at the end (or on SIGTERM/SIGINT, after the current step) a last checkpoint and
    export. The previous signal handlers are restored on return.

    Args:
        model (`nn.Module`): the freshly initialised model (its weights are replaced on resume).
        cfg (`Mapping`): ``steps``, ``lr``, ``warmup``, ``min_lr_ratio``, ``ema_decay``, ``grad_clip``, ``seed``,
            ``batch_size``, optional ``weight_decay`` (default 0).
        out (`str` or `pathlib.Path`): work directory (``ckpt/``, ``train_log.jsonl``).
        step_fn (`Callable`): ``step_fn(model, step, generator) -> loss`` (a scalar tensor).
        export_fn (`Callable`): ``export_fn(ema, state)``; ``state`` has ``step``, ``seconds_trained``,
            ``loss_avg`` and the entries of `state`.
        ckpt_every (`int`, *optional*, defaults to `100`): steps between checkpoints.
        export_every (`int`, *optional*, defaults to `500`): steps between exports.
        log_every (`int`, *optional*, defaults to `10`): steps between log lines.
        state (`Mapping`, *optional*): extra JSON-safe entries of ``state.json`` and of the export state.
        log_prefix (`str`, *optional*, defaults to `""`): prefix of the printed lines (e.g. ``"[vae] "``).

    Returns:
        `int`: the number of optimizer steps done (``cfg['steps']`` unless stopped by a signal).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg["lr"],
        weight_decay=cfg.get("weight_decay", 0.0),
    )
    step, seconds, loss_avg = 0, 0.0, None
    ckpts = checkpoint_dirs(out)
    if ckpts:
        last = ckpts[-1]
        load_weights(model, last / "model.safetensors")
        load_weights(ema, last / "ema.safetensors")
        opt.load_state_dict(torch.load(last / "optim.pt", weights_only=True, map_location="cpu"))
        st = json.loads((last / "state.json").read_text())
        step, seconds, loss_avg = st["step"], st.get("seconds_trained", 0.0), st.get("loss_avg")
        print(f"{log_prefix}resumed from {last} at step {step}", flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(
        f"{log_prefix}{nparams / 1e6:.3f}M params, target {cfg['steps']} steps, batch {cfg['batch_size']}",
        flush=True,
    )

    def run_state() -> dict[str, Any]:
        return {"seconds_trained": seconds, "loss_avg": loss_avg, **(state or {})}

    stop = {"flag": False}

    def on_signal(signum, frame):  # finish the current step, then checkpoint + export
        stop["flag"] = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        model.train()
        win_t, win_l, last_saved, log_path = [], [], step, out / "train_log.jsonl"
        while step < cfg["steps"] and not stop["flag"]:
            t0 = time.perf_counter()
            lr_now = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr_now
            gen = torch.Generator().manual_seed(step_seed(cfg["seed"], step))
            torch.manual_seed(step_seed(cfg["seed"], step))  # any module-internal randomness is per-step too
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
                print(log_prefix + json.dumps(rec), flush=True)
                win_t, win_l = [], []
            if step % ckpt_every == 0:
                save_checkpoint(out, step, model, ema, opt, run_state())
                last_saved = step
            if step % export_every == 0:
                export_fn(ema, {"step": step, **run_state()})
                print(f"{log_prefix}exported EMA at step {step}", flush=True)
        if step != last_saved:
            save_checkpoint(out, step, model, ema, opt, run_state())
        ema.eval()
        export_fn(ema, {"step": step, **run_state()})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"{log_prefix}stopped at step {step} ({seconds:.0f} s trained)", flush=True)
    return step
