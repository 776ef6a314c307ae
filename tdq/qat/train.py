"""`finetune_qat`: LSQ fine-tuning of a quantized denoiser by data-free distillation from the FP model.

```python
report = tdq.finetune_qat(qunet, fp_unet, scheduler, QATConfig(enabled=True, steps=200))
```

The FP model's own samples `x0` (drawn through the real diffusers `scheduler` from fixed seeds) are noised with the
scheduler's forward process at timesteps of the evaluation sampler (uniform over its steps, i.e. each timestep
bucket weighted by its step occupancy as in calibration), and the quantized model learns to reproduce the FP model's
output there: `MSE(q(x_t, t), fp(x_t, t))`, plus `eps_loss_weight * MSE(q(x_t, t), eps)`. Every step's batch, noise
and timesteps come from a generator seeded by `(seed, step)`, so a run resumed from a checkpoint (safetensors + JSON,
no pickle) continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdq.api import get_quantization
from tdq.errors import ConfigError
from tdq.qat.lora import attach_lora
from tdq.qat.lsq import LSQState
from tdq.qat_config import QATConfig
from tdq.utils.io import atomic_write, read_json_object, remove_temporaries, sha256_file

#: The checkpoint sidecar in `QATConfig.checkpoint_dir`; it names the tensors file of the same step.
CHECKPOINT_FILE = "qat_state.json"
# Config fields that may differ between a checkpoint and the run resuming from it.
RESUMABLE_FIELDS = ("enabled", "steps", "checkpoint_dir", "checkpoint_every")


def _output(out) -> torch.Tensor:
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple | list):
        return out[0]
    return out


def _default_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "sample_size", None)
    chans = getattr(cfg, "in_channels", None)
    if size is None or chans is None:
        raise ValueError(
            "finetune_qat: pass x0= or sample_shape= (the model has no config.sample_size/in_channels)"
        )
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(chans), *size)


@torch.no_grad()
def fp_samples(
    fp_model: nn.Module, scheduler, config: QATConfig, sample_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """
    The FP model's own samples `x0` (model space, `[-1, 1]`) of seeds `config.sample_seed ...` through `scheduler`.

    Args:
        fp_model (`nn.Module`): the float denoiser (unconditional pixel model: `fp_model(x, t)`).
        scheduler: a diffusers scheduler (copied, not changed).
        config (`QATConfig`): `num_samples`, `sample_seed`, `sample_steps`.
        sample_shape (`tuple[int, ...]`, *optional*): one sample's shape; defaults to the model config's.
    """
    from tdq.sampling import DiffusionSampler

    shape = tuple(sample_shape) if sample_shape is not None else _default_shape(fp_model)
    sampler = DiffusionSampler(
        fp_model,
        copy.deepcopy(scheduler),
        shape,
        num_inference_steps=config.sample_steps,
        batch_size=16,
        device=next(fp_model.parameters()).device,
        record_trajectory=False,
        progress=False,
    )
    seeds = list(range(config.sample_seed, config.sample_seed + config.num_samples))
    return sampler(seeds).images * 2 - 1


def timestep_pool(scheduler, config: QATConfig) -> torch.Tensor:
    """The training timesteps `t` are drawn from (uniformly): the evaluation sampler's, or every training one."""
    if config.timesteps == "sampler":
        s = copy.deepcopy(scheduler)
        s.set_timesteps(config.eval_steps)
        return torch.as_tensor(s.timesteps).long().cpu()
    return torch.arange(int(scheduler.config.num_train_timesteps))


def make_batch(x0: torch.Tensor, pool: torch.Tensor, scheduler, batch: int, seed: int, step: int):
    """The batch of `step`: `(x_t, t, eps)` from a generator seeded by `(seed, step)` (deterministic, resumable)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(x0.shape[0], (batch,), generator=g)
    t = pool[torch.randint(pool.numel(), (batch,), generator=g)]
    clean = x0[idx.to(x0.device)]
    eps = torch.randn(clean.shape, generator=g).to(clean.device, clean.dtype)
    x_t = scheduler.add_noise(clean, eps, t.to(clean.device))
    return x_t, t.to(clean.device), eps


@torch.no_grad()
def distillation_error(
    model: nn.Module, fp_model: nn.Module, scheduler, x0: torch.Tensor, pool: torch.Tensor, *, batches: int = 4,
    batch: int = 8, seed: int = 12345,
) -> float:  # fmt: skip
    """Mean `MSE(model(x_t, t), fp(x_t, t))` over `batches` fixed held-out batches (seed `seed`)."""
    errs = []
    for k in range(batches):
        x_t, t, _ = make_batch(x0, pool, scheduler, batch, seed, k)
        errs.append(float(torch.mean((_output(model(x_t, t)) - _output(fp_model(x_t, t))) ** 2)))
    return sum(errs) / len(errs)


def _heldout(model, fp_model, sched, x0, pool, batches: int) -> float:
    if batches <= 0:
        return float("nan")
    return distillation_error(model, fp_model, sched, x0, pool, batches=batches, batch=8)


def _config_key(config: QATConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_FIELDS}


def _save_checkpoint(
    directory: Path, step: int, state: LSQState, opt, config: QATConfig, losses: list
) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"state.{k}": v.detach().contiguous().cpu() for k, v in state.named_tensors().items()}
    sd = opt.state_dict()
    for i, s in sd["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    meta = {
        "step": step,
        "config": _config_key(config),
        "param_groups": sd["param_groups"],
        "layers": sorted(state.layers),
        "losses": losses,
    }
    # The pair is committed by the JSON: the tensors go to a file named by the step, then the JSON (which names that
    # file and its sha256) replaces the old one; a kill at any point leaves a JSON whose tensors exist and match.
    state_file = f"qat_state.{step:08d}.safetensors"
    atomic_write(directory / state_file, lambda p: save_file(tensors, p))
    meta["state_file"] = state_file
    meta["state_sha256"] = sha256_file(directory / state_file)
    atomic_write(directory / CHECKPOINT_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    for old in directory.glob(
        "qat_state.*.safetensors"
    ):  # earlier steps' tensors: no longer named by the JSON
        if old.name != state_file:
            old.unlink(missing_ok=True)
    remove_temporaries(directory, ".qat_state*.tmp")


def _load_checkpoint(directory: Path, state: LSQState, opt, config: QATConfig) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta_file = directory / CHECKPOINT_FILE
    if not meta_file.exists():
        return 0, []
    meta = read_json_object(meta_file, what="QAT checkpoint")
    for key in ("step", "config", "param_groups", "layers", "losses", "state_file", "state_sha256"):
        if key not in meta:
            raise ValueError(f"{meta_file}: QAT checkpoint has no {key!r}; delete {directory} to start over")
    state_path = directory / Path(str(meta["state_file"])).name
    if not state_path.is_file() or sha256_file(state_path) != meta["state_sha256"]:
        raise ValueError(
            f"{meta_file}: its tensors {state_path.name} are missing or do not match the recorded sha256; delete "
            f"{directory} to start over"
        )
    want = _config_key(config)
    for k, v in want.items():
        if meta["config"].get(k) != v:
            raise ConfigError(
                f"qat.{k}={v!r} differs from the checkpoint in {directory} ({meta['config'].get(k)!r}); use another "
                "qat.checkpoint_dir or the same settings to resume"
            )
    if meta["layers"] != sorted(state.layers):
        raise ValueError(f"{meta_file}: the checkpoint's quantized layers differ from the model's")
    tensors = load_file(str(state_path))
    with torch.no_grad():
        for k, p in state.named_tensors().items():
            p.copy_(tensors[f"state.{k}"].to(p.device, p.dtype))
    sd = opt.state_dict()
    new_state = {}
    for i in sd["param_groups"][0]["params"] + [p for g in sd["param_groups"][1:] for p in g["params"]]:
        keys = [k for k in tensors if k.startswith(f"opt.{i}.")]
        if keys:
            new_state[i] = {k.split(".", 2)[2]: tensors[k] for k in keys}
    opt.load_state_dict({"state": new_state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["losses"])


def finetune_qat(
    model: nn.Module,
    fp_model: nn.Module,
    scheduler,
    config: QATConfig | None = None,
    *,
    x0: torch.Tensor | None = None,
    sample_shape: tuple[int, ...] | None = None,
    progress: bool = False,
    heldout_batches: int = 4,
) -> dict[str, Any]:
    r"""
    LSQ fine-tuning of a quantized, calibrated denoiser by output distillation from its FP model, in place.

    Trains the per-row weight step sizes, the per-bucket activation scales, (with `weight_lr > 0`) the float master
    weights and (with `lora_rank > 0`) float LoRA adapters; then writes the scales into the quantizers, puts every
    weight on its grid, so `tdq.save_quantization` and `tdq.to_backend` work unchanged (not with LoRA, which stays
    attached as a float forward wrapper, simulated only). With `config.checkpoint_dir`, checkpoints every
    `checkpoint_every` steps and resumes from the latest one there.

    Args:
        model (`nn.Module`): a model quantized by `tdq.quantize_` and calibrated (weights rounded if asked).
        fp_model (`nn.Module`): the float denoiser (not changed): the teacher and the source of `x0`.
        scheduler: the diffusers scheduler of the evaluation sampler (copied; `add_noise`, `set_timesteps`).
        config (`QATConfig`, *optional*): defaults to the model config's `qat`.
        x0 (`torch.Tensor`, *optional*): clean samples in model space; defaults to `fp_samples(fp_model, ...)`.
        sample_shape (`tuple[int, ...]`, *optional*): one sample's shape for drawing `x0`.
        progress (`bool`, *optional*, defaults to `False`): print the loss every `checkpoint_every` steps.
        heldout_batches (`int`, *optional*, defaults to `4`): batches of `distillation_error` before and after
            (`0` skips it: the report's errors are then NaN).

    Returns:
        `dict`: `steps`, `resumed_from`, `loss_first`/`loss_last` (mean of the first/last 10 steps' losses),
        `heldout_error_before`/`heldout_error_after` (`distillation_error`), `seconds` (training) and
        `seconds_samples` (drawing `x0`), the learned scale factors and the share of weight codes changed.
    """
    config = config or get_quantization(model).config.qat
    config.validate("qat")
    t_start = time.perf_counter()
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    t0 = time.perf_counter()
    if x0 is None:
        x0_file = ckpt / "x0.safetensors" if ckpt else None
        if x0_file is not None and x0_file.exists():
            from safetensors.torch import load_file

            x0 = load_file(str(x0_file))["x0"]
        else:
            x0 = fp_samples(fp_model, scheduler, config, sample_shape)
            if x0_file is not None:
                from safetensors.torch import save_file

                ckpt.mkdir(parents=True, exist_ok=True)
                save_file({"x0": x0.contiguous()}, str(x0_file))
    t_samples = time.perf_counter() - t0
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("finetune_qat: x0 holds NaN/inf")
    device = next(model.parameters()).device
    x0 = x0.to(device)
    pool = timestep_pool(scheduler, config)
    sched = copy.deepcopy(scheduler)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    fp_model.requires_grad_(False)
    err_before = _heldout(model, fp_model, sched, x0, pool, heldout_batches)
    state = LSQState(
        model,
        learn_weight_scales=config.learn_weight_scales,
        learn_act_scales=config.learn_act_scales,
        learn_weights=config.weight_lr > 0,
        lora_rank=config.lora_rank,
    )
    groups = state.param_groups(config.lr, config.weight_lr, config.lora_lr)
    if not groups:
        raise ConfigError(
            "qat: nothing to learn (learn_act_scales, learn_weight_scales, weight_lr and lora_rank off)"
        )
    opt = torch.optim.Adam(groups)
    start, losses = _load_checkpoint(ckpt, state, opt, config) if ckpt else (0, [])
    if start > config.steps:
        raise ConfigError(f"qat.steps={config.steps} is below the checkpoint's step {start} in {ckpt}")
    state.attach()
    t1 = time.perf_counter()
    try:
        with torch.enable_grad():
            for step in range(start, config.steps):
                x_t, t, eps = make_batch(x0, pool, sched, config.batch_size, config.seed, step)
                with torch.no_grad():
                    target = _output(fp_model(x_t, t))
                pred = _output(model(x_t, t))
                loss = torch.mean((pred - target) ** 2)
                if config.eps_loss_weight > 0:
                    loss = loss + config.eps_loss_weight * torch.mean((pred - eps) ** 2)
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"qat: the loss became non-finite at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                done = step + 1
                if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                    _save_checkpoint(ckpt, done, state, opt, config, losses)
                if progress and done % config.checkpoint_every == 0:
                    print(f"qat step {done}/{config.steps} loss {losses[-1]:.3e}", flush=True)
    except BaseException:
        state.detach()
        raise
    t_train = time.perf_counter() - t1
    report = state.finish()
    if config.lora_rank > 0:
        attach_lora(model, {n: st.lora.requires_grad_(False) for n, st in state.layers.items()})
    for n, p in model.named_parameters():
        p.requires_grad_(requires.get(n, True))
    err_after = _heldout(model, fp_model, sched, x0, pool, heldout_batches)
    k = min(10, len(losses))
    return {
        "steps": config.steps,
        "resumed_from": start,
        "loss_first": sum(losses[:k]) / max(k, 1),
        "loss_last": sum(losses[-k:]) / max(k, 1),
        "losses": losses,
        "heldout_error_before": err_before,
        "heldout_error_after": err_after,
        "seconds": round(t_train, 3),
        "seconds_samples": round(t_samples, 3),
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "lora_rank": config.lora_rank,
        **report,
    }
