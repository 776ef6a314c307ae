"""Test fixtures with real activation outliers (issue #11).

The bundled zoo models have tame activations. These fixtures reproduce what real pretrained models do:

- [`EDMOutlierNet`]: a small EDM-preconditioned, σ- and label-conditioned UNet ``f(x, sigma, label)`` with
  scale-shift ``(1 + scale)`` time-embedding norms, residual sums and 1×1 skip convs, trained briefly on MNIST
  (weights shipped as safetensors + JSON, see [`load_edm_fixture`]). [`inject_stream_outliers`] rescales its whole
  residual stream to 1e3–1e6 (per-channel gains, folded into the producing weights and divided out of the
  consuming ones, so the float function is unchanged up to rounding and the norms' ``eps``) — the real model's
  case. [`inject_concat_outliers`] puts one input of the decoder's skip concatenation at 1e4 and leaves the
  other at 1e0.
- [`inject_ddpm_outlier_channels`]: a function-preserving rescaling of the bundled ``mnist-ddpm``: a few value
  channels of every attention block are scaled up by `gain` and the output projection's matching input channels
  down, so ``to_out.0`` sees a few huge outlier channels.
- [`edm_sample`]: a deterministic few-step Karras (EDM Heun) σ sampler.

Every fixture makes default per-tensor W8A8 lose the image; see ``experiments/outliers.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "mnist-edm-tiny"

__all__ = [
    "EDMOutlierNet",
    "edm_sample",
    "karras_sigmas",
    "load_edm_fixture",
    "train_edm_fixture",
    "inject_stream_outliers",
    "inject_concat_outliers",
    "inject_ddpm_outlier_channels",
    "FIXTURE_DIR",
]


class _ResBlock(nn.Module):
    """Pre-norm residual block with scale-shift time embedding and a 1×1 skip conv when the width changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(cin, cin, eps=eps)
        self.emb1 = nn.Linear(emb_dim, 2 * cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cout, cout, eps=eps)
        self.emb2 = nn.Linear(emb_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb1(emb)[:, :, None, None].chunk(2, dim=1)
        a = torch.relu(self.norm1(h) * (1 + scale) + shift)
        a = self.conv1(a)
        scale, shift = self.emb2(emb)[:, :, None, None].chunk(2, dim=1)
        a = torch.relu(self.norm2(a) * (1 + scale) + shift)
        a = self.conv2(a)
        return (h if self.skip is None else self.skip(h)) + a


class EDMOutlierNet(nn.Module):
    r"""
    A tiny EDM-preconditioned denoiser ``D(x, sigma, label)`` for 1×28×28 images in [-1, 1].

    Layout: Fourier σ embedding + label embedding → 2-layer MLP; stem conv; ResBlock (width) at 28×28; strided conv
    down; two ResBlocks (2·width) at 14×14; nearest upsample; concat with the 28×28 skip; ResBlock (3·width → width) with
    a 1×1 skip conv; per-channel GroupNorm; output conv. ReLU activations (positively homogeneous, so channel gains
    can be moved through them exactly).

    Args:
        width (`int`, *optional*, defaults to `16`): channels at 28×28 (twice that at 14×14).
        emb_dim (`int`, *optional*, defaults to `64`): embedding width.
        eps (`float`, *optional*, defaults to `1e-6`): GroupNorm epsilon.
    """

    def __init__(self, width: int = 16, emb_dim: int = 64, eps: float = 1e-6):
        super().__init__()
        self.config = {"width": width, "emb_dim": emb_dim, "eps": eps}
        w = width
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)
        self.emb_in = nn.Linear(16, emb_dim)
        self.emb_out = nn.Linear(emb_dim, emb_dim)
        self.label_emb = nn.Embedding(11, emb_dim)  # 10 = no label
        self.stem = nn.Conv2d(1, w, 3, padding=1)
        self.enc1 = _ResBlock(w, w, emb_dim, eps)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.enc2 = _ResBlock(2 * w, 2 * w, emb_dim, eps)
        self.mid = _ResBlock(2 * w, 2 * w, emb_dim, eps)
        self.dec = _ResBlock(3 * w, w, emb_dim, eps)
        self.out_norm = nn.GroupNorm(w, w, eps=eps)
        self.out = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma, label: torch.Tensor | None = None) -> torch.Tensor:
        """
        Denoise.

        Args:
            x (`torch.Tensor`): noisy images `[B, 1, 28, 28]`.
            sigma (`float` or `torch.Tensor`): noise level, scalar or `[B]`.
            label (`torch.LongTensor`, *optional*): digit labels `[B]` (0..9); `None` for unconditional.

        Returns:
            `torch.Tensor`: the denoised estimate of `x0`, same shape as `x`.
        """
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        s = sigma.view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
        c_noise = sigma.log() / 4
        if label is None:
            label = torch.full((b,), 10, dtype=torch.long, device=x.device)
        f = c_noise[:, None] * self.freqs[None]
        emb = torch.cat([f.sin(), f.cos()], dim=1)
        emb = self.emb_out(torch.relu(self.emb_in(emb))) + self.label_emb(label)
        emb = torch.relu(emb)
        h1 = self.stem(x * c_in)
        h1 = self.enc1(h1, emb)
        h = self.down(h1)
        h = self.enc2(h, emb)
        h = self.mid(h, emb)
        h = TF.interpolate(h, scale_factor=2, mode="nearest")
        h = self.dec(torch.cat([h, h1], dim=1), emb)
        h = self.out(torch.relu(self.out_norm(h)))
        return c_skip * x + c_out * h


def karras_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0):
    """The Karras et al. (2022) σ schedule of `steps` levels, followed by 0."""
    i = torch.arange(steps, dtype=torch.float64)
    s = (
        sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sample(
    model: nn.Module,
    seeds: list[int],
    labels: torch.Tensor | None = None,
    steps: int = 6,
    sigma_max: float = SIGMA_MAX,
) -> torch.Tensor:
    r"""
    Deterministic EDM Heun sampling (Karras schedule) with one seeded noise tensor per image.

    Args:
        model (`nn.Module`): a denoiser ``D(x, sigma, label)``.
        seeds (`list[int]`): one seed per image.
        labels (`torch.LongTensor`, *optional*): labels `[N]`; defaults to `seed % 10`.
        steps (`int`, *optional*, defaults to `6`): σ levels (2·steps − 1 model calls).
        sigma_max (`float`, *optional*, defaults to `80.0`): the first σ.

    Returns:
        `torch.Tensor`: samples `[N, 1, 28, 28]` in [-1, 1] (clamped).
    """
    x = torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    if labels is None:
        labels = torch.tensor([int(s) % 10 for s in seeds])
    sig = karras_sigmas(steps, sigma_max=sigma_max)
    x = x * float(sig[0])
    for i in range(steps):
        s0, s1 = float(sig[i]), float(sig[i + 1])
        d = (x - model(x, torch.full((len(seeds),), s0), labels)) / s0
        x1 = x + (s1 - s0) * d
        if s1 > 0:
            d1 = (x1 - model(x1, torch.full((len(seeds),), s1), labels)) / s1
            x1 = x + (s1 - s0) * (d + d1) / 2
        x = x1
    return x.clamp(-1, 1)


def train_edm_fixture(out_dir: str | Path = FIXTURE_DIR, steps: int = 1500, batch: int = 32, seed: int = 0):
    r"""
    Train [`EDMOutlierNet`] with the EDM loss on MNIST (1 thread; a few minutes) and save it.

    Args:
        out_dir (`str` or `Path`, *optional*): where `model.safetensors` and `config.json` go.
        steps (`int`, *optional*, defaults to `1500`): optimizer steps.
        batch (`int`, *optional*, defaults to `32`): batch size.
        seed (`int`, *optional*, defaults to `0`): seed of init, batches and noise.
    """
    import time

    from safetensors.torch import save_file

    from tdq.zoo.data import load_mnist

    torch.manual_seed(seed)
    images, labels = load_mnist("train")
    data = torch.from_numpy(images) * 2 - 1
    targets = torch.from_numpy(labels)
    model = EDMOutlierNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0, y = data[idx], targets[idx].clone()
        y[torch.rand(batch, generator=g) < 0.1] = 10
        sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
        n = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
        w = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        loss = (w.view(-1, 1, 1, 1) * (model(x0 + n, sigma, y) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0:
            print(f"step {step} loss {sum(losses[-200:]) / len(losses[-200:]):.4f} {time.time() - t0:.0f}s")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))
    info = {
        "class": "tdq.testing.outliers.EDMOutlierNet",
        "config": model.config,
        "training": {
            "steps": steps,
            "batch": batch,
            "seed": seed,
            "lr": 2e-3,
            "loss": "EDM (P_mean -1.2, P_std 1.2, sigma_data 0.5), 10% label dropout",
            "final_loss_mean_last200": sum(losses[-200:]) / 200,
            "wall_s": time.time() - t0,
            "command": "python -m tdq.testing.outliers",
        },
    }
    (out_dir / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    return model.eval()


def load_edm_fixture(path: str | Path = FIXTURE_DIR) -> EDMOutlierNet:
    """Load the shipped, briefly trained [`EDMOutlierNet`] (tame: no outliers injected yet), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    info = json.loads((path / "config.json").read_text())
    model = EDMOutlierNet(**info["config"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(
        math.log(lo) + torch.rand(n, generator=g, dtype=torch.float64) * (math.log(hi) - math.log(lo))
    )


@torch.no_grad()
def _scale_out(layer: nn.Module, gain: torch.Tensor) -> None:
    """Multiply output channels (rows) of a conv/linear by `gain`."""
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(gain.view(shape).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.mul_(gain.to(layer.bias.dtype))


@torch.no_grad()
def _scale_in(layer: nn.Module, gain: torch.Tensor) -> None:
    """Divide input channels (columns) of a conv/linear by `gain`."""
    shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
    layer.weight.div_(gain.view(shape).to(layer.weight.dtype))


@torch.no_grad()
def _scale_emb(block: _ResBlock, which: int, gain: torch.Tensor) -> None:
    """Make ``norm(h)·(1+scale)+shift`` come out `gain` times larger per channel (scale' = g(1+scale) − 1)."""
    lin = block.emb1 if which == 1 else block.emb2
    c = gain.numel()
    g = gain.to(lin.weight.dtype)
    lin.weight[:c].mul_(g[:, None])
    lin.bias[:c].copy_(g * (lin.bias[:c] + 1) - 1)
    lin.weight[c:].mul_(g[:, None])
    lin.bias[c:].mul_(g)


@torch.no_grad()
def inject_stream_outliers(
    model: EDMOutlierNet,
    lo: float = 1e3,
    hi: float = 1e6,
    act_lo: float = 1e1,
    act_hi: float = 1e3,
    seed: int = 0,
) -> EDMOutlierNet:
    r"""
    Put the whole residual stream of [`EDMOutlierNet`] at `lo`–`hi` (per-channel gains, log-uniform) and the
    scale-shift outputs feeding every conv at `act_lo`–`act_hi`, in place, without changing the float function.

    Gains are folded into the producing layers' weights (stem, strided conv, each block's second conv and skip
    conv, the ``(1 + scale)``/shift embedding projections) and divided out of the consuming layers' input
    channels; per-channel GroupNorms and ReLU pass them through (up to the norms' `eps`).

    Args:
        model (`EDMOutlierNet`): the model (changed in place).
        lo, hi (`float`, *optional*): range of the residual-stream gains.
        act_lo, act_hi (`float`, *optional*): range of the scale-shift gains.
        seed (`int`, *optional*, defaults to `0`): seed of the gains.

    Returns:
        The same model.
    """
    g = torch.Generator().manual_seed(seed)
    w = model.config["width"]
    g1, g2, g3 = _log_uniform(w, lo, hi, g), _log_uniform(2 * w, lo, hi, g), _log_uniform(w, lo, hi, g)
    # level-1 stream (stem -> enc1 -> down, concat skip)
    _scale_out(model.stem, g1)
    _scale_out(model.enc1.conv2, g1)
    _scale_in(model.down, g1)
    # level-2 stream (down -> enc2 -> mid -> upsample -> concat)
    _scale_out(model.down, g2)
    _scale_out(model.enc2.conv2, g2)
    _scale_out(model.mid.conv2, g2)
    _scale_in(model.dec.skip, torch.cat([g2, g1]))
    # decoder stream
    _scale_out(model.dec.skip, g3)
    _scale_out(model.dec.conv2, g3)
    # scale-shift outputs (inputs of every block's conv1/conv2)
    for blk in (model.enc1, model.enc2, model.mid, model.dec):
        a1 = _log_uniform(blk.conv1.in_channels, act_lo, act_hi, g)
        _scale_emb(blk, 1, a1)
        _scale_in(blk.conv1, a1)
        a2 = _log_uniform(blk.conv2.in_channels, act_lo, act_hi, g)
        _scale_emb(blk, 2, a2)
        _scale_in(blk.conv2, a2)
    # time-embedding MLP hidden units and the embedding itself
    e1 = _log_uniform(model.emb_in.out_features, act_lo, act_hi, g)
    _scale_out(model.emb_in, e1)
    _scale_in(model.emb_out, e1)
    e2 = _log_uniform(model.emb_out.out_features, act_lo, act_hi, g)
    _scale_out(model.emb_out, e2)
    model.label_emb.weight.mul_(e2.to(model.label_emb.weight.dtype)[None])
    for blk in (model.enc1, model.enc2, model.mid, model.dec):
        _scale_in(blk.emb1, e2)
        _scale_in(blk.emb2, e2)
    return model


@torch.no_grad()
def inject_concat_outliers(model: EDMOutlierNet, gain: float = 1e4) -> EDMOutlierNet:
    r"""
    Put the 14×14 stream (strided conv → enc2 → mid → upsample) at `gain`× while the 28×28 skip it is concatenated
    with stays at 1×, in place and function-preserving: the decoder's first conv and 1×1 skip conv see one
    concatenated input whose two halves differ by `gain`.

    Args:
        model (`EDMOutlierNet`): the model (changed in place).
        gain (`float`, *optional*, defaults to `1e4`): scale of the 14×14 stream.

    Returns:
        The same model.
    """
    w = model.config["width"]
    g2 = torch.full((2 * w,), float(gain), dtype=torch.float64)
    _scale_out(model.down, g2)
    _scale_out(model.enc2.conv2, g2)
    _scale_out(model.mid.conv2, g2)
    _scale_in(model.dec.skip, torch.cat([g2, torch.ones(w, dtype=torch.float64)]))
    return model


@torch.no_grad()
def inject_ddpm_outlier_channels(
    unet: nn.Module, gain: float = 1e3, channels: int = 4, seed: int = 0
) -> list[str]:
    r"""
    Give a diffusers UNet a few outlier channels without changing its function: in every attention block, scale
    `channels` value-projection output channels by `gain` and the output projection's matching input channels by
    ``1/gain`` (attention is linear in V, so ``to_out(softmax(QKᵀ)·V)`` is unchanged up to rounding).

    Args:
        unet (`nn.Module`): e.g. the UNet of the bundled ``mnist-ddpm`` (changed in place).
        gain (`float`, *optional*, defaults to `1e3`): outlier gain.
        channels (`int`, *optional*, defaults to `4`): outlier channels per attention block.
        seed (`int`, *optional*, defaults to `0`): which channels.

    Returns:
        `list[str]`: names of the output projections that now see outlier channels.
    """
    g = torch.Generator().manual_seed(seed)
    touched = []
    for name, m in unet.named_modules():
        if hasattr(m, "to_v") and hasattr(m, "to_out"):
            c = m.to_v.out_features
            idx = torch.randperm(c, generator=g)[:channels]
            gains = torch.ones(c, dtype=torch.float64)
            gains[idx] = gain
            _scale_out(m.to_v, gains)
            _scale_in(m.to_out[0], gains)
            touched.append(f"{name}.to_out.0" if name else "to_out.0")
    if not touched:
        raise ValueError(f"{type(unet).__name__} has no attention block (to_v/to_out) to rescale")
    return touched


if __name__ == "__main__":  # pragma: no cover - training entry point
    import argparse

    p = argparse.ArgumentParser(description="train the EDM outlier fixture on MNIST")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default=str(FIXTURE_DIR))
    a = p.parse_args()
    torch.set_num_threads(1)
    train_edm_fixture(a.out, steps=a.steps)
