"""The shared zoo training loop (`tdq.zoo.loop.train_loop`) on a tiny model: SIGTERM, checkpoints, atomic dirs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from tdq.utils.io import atomic_write_dir
from tdq.zoo.loop import checkpoint_dirs, train_loop

CFG = {
    "steps": 6,
    "batch_size": 4,
    "lr": 1e-2,
    "min_lr_ratio": 0.1,
    "warmup": 2,
    "ema_decay": 0.9,
    "grad_clip": 1.0,
    "seed": 0,
}


def _step_fn(model, step, gen):
    x = torch.randn(4, 3, generator=gen)
    return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()


def test_sigterm_finishes_the_step_checkpoints_exports_and_restores_handlers(tmp_path):
    exports = []

    def step_fn(model, step, gen):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now; the loop finishes this step, then stops
        return _step_fn(model, step, gen)

    def previous(signum, frame):
        raise AssertionError("the loop's handler should be active while it trains")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        torch.manual_seed(0)
        done = train_loop(
            nn.Linear(3, 1), CFG, tmp_path, step_fn, lambda ema, st: exports.append(st), ckpt_every=100
        )
        assert signal.getsignal(signal.SIGTERM) is previous  # restored on return
    finally:
        signal.signal(signal.SIGTERM, old)
    assert done == 3
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000003"]
    state = json.loads((tmp_path / "ckpt" / "step_0000003" / "state.json").read_text())
    assert state["step"] == 3 and exports[-1]["step"] == 3
    # a rerun resumes and completes the schedule
    torch.manual_seed(0)
    assert train_loop(nn.Linear(3, 1), CFG, tmp_path, _step_fn, lambda ema, st: None, ckpt_every=2) == 6
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_0000004", "step_0000006"]


def test_atomic_write_dir_replaces_whole_directory(tmp_path):
    dest = tmp_path / "export"
    atomic_write_dir(dest, lambda d: (d / "a.txt").write_text("1"))
    atomic_write_dir(dest, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .tmp_/.old_ left behind

    def fail(d):
        (d / "c.txt").write_text("3")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write_dir(dest, fail)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # the old directory is untouched
