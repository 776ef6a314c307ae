"""Multi-process sampling and feature extraction (accelerate, 2 CPU processes) equal the single-process results."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tdq.eval.distributed import distributed_extract_features, distributed_sample, shard_batches
from tdq.sampling import DiffusionSampler, make_scheduler

SEEDS = [3, 4, 5, 6, 7]  # batch_size 2 -> batches [3,4] [5,6] [7]: process 0 gets two, process 1 one
STEPS = 4

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from tdq.eval.distributed import distributed_extract_features, distributed_sample, get_process_state
    sys.path.insert(0, {tests!r})
    from test_distributed import SEEDS, make_sampler, make_feature

    state = get_process_state(cpu=True)
    assert state.num_processes == 2, state.num_processes
    res = distributed_sample(make_sampler(), SEEDS, state)
    feats = distributed_extract_features(res.images, make_feature(), state, batch_size=2)
    if state.is_main_process:
        save_file({{"images": res.images, "trajectory": torch.stack(res.trajectory), "features": feats,
                   "timesteps": torch.tensor(res.timesteps)}}, sys.argv[1])
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()  # else gloo's threads can abort the process at exit (seen once in CI)
    """
)


def make_sampler() -> DiffusionSampler:
    from diffusers import DDPMScheduler

    from tdq.testing import tiny_unet2d

    # DDPM is stochastic: its step noise comes from per-seed generators.
    sch = make_scheduler(DDPMScheduler(num_train_timesteps=1000), "ddpm")
    return DiffusionSampler(
        tiny_unet2d(), sch, (1, 16, 16), num_inference_steps=STEPS, batch_size=2, progress=False
    )


def make_feature() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 8))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_cpu_ranks(script, *args: str, cwd, timeout: float) -> subprocess.CompletedProcess:
    """Run `script args...` as two gloo CPU ranks under `accelerate launch --multi_gpu` (torchrun), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH")) if p
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


class _FakeState:
    """Mimics accelerate's contiguous `split_between_processes` for `shard_batches`."""

    def __init__(self, index, num):
        self.process_index, self.num_processes = index, num

    def split_between_processes(self, items):
        import contextlib

        from accelerate import PartialState

        n, r = divmod(len(items), self.num_processes)
        start = self.process_index * n + min(self.process_index, r)
        stop = start + n + (1 if self.process_index < r else 0)
        assert PartialState is not None
        return contextlib.nullcontext(items[start:stop])


@pytest.mark.parametrize("num", [2, 3, 4])
def test_shard_batches_covers_seeds_in_order(num):
    seeds = list(range(10, 17))
    shards = [shard_batches(seeds, 2, _FakeState(p, num)) for p in range(num)]
    assert sum(shards, []) == seeds
    for shard in shards:  # whole batches only (a shard starts on a batch boundary)
        assert not shard or (seeds.index(shard[0]) % 2 == 0)


def test_stochastic_sampler_is_per_seed():
    sampler = make_sampler()
    full = sampler(SEEDS[:4])
    alone = DiffusionSampler(
        sampler.denoiser,
        sampler.scheduler,
        (1, 16, 16),
        num_inference_steps=STEPS,
        batch_size=2,
        progress=False,
    )(SEEDS[2:4])
    # same batch composition ([5, 6]) -> identical, although it is sampled in another call
    assert torch.equal(full.images[2:4], alone.images)
    one = DiffusionSampler(
        sampler.denoiser,
        sampler.scheduler,
        (1, 16, 16),
        num_inference_steps=STEPS,
        batch_size=1,
        progress=False,
    )(SEEDS[2:3])
    # other batch composition: same random numbers, float noise only
    torch.testing.assert_close(one.images, full.images[2:3], atol=1e-4, rtol=0)


@pytest.mark.timeout(240)
def test_two_cpu_processes_equal_single_process(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        # accelerate 1.15 starts ONE process for `--cpu --num_processes 2` unless mpirun is configured; the
        # torchrun-based `--multi_gpu` launcher starts two, and `Accelerator(cpu=True)` makes them gloo CPU ranks.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = load_file(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes ran with one thread each
    try:
        ref = distributed_sample(make_sampler(), SEEDS)  # no state: plain single-process sampler call
        ref_feats = distributed_extract_features(ref.images, make_feature(), batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert got["images"].shape == (len(SEEDS), 1, 16, 16)
    assert torch.equal(got["images"], ref.images)
    assert torch.equal(got["trajectory"], torch.stack(ref.trajectory))
    assert torch.equal(got["features"], ref_feats)
    assert got["timesteps"].tolist() == ref.timesteps
