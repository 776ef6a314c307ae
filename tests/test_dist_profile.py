"""Sensitivity profiling sharded across 2 gloo CPU processes equals the single-process profile (Fisher and
Hutchinson); a rank with other inputs is refused, naming the field; units cover every (bucket, batch) once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from tdq.mixed_precision.dist_profile import (
    ProfileUnit,
    check_same_inputs,
    input_fingerprints,
    profile_units,
    shard_plan,
)
from tdq.mixed_precision.fisher import profile_sensitivity
from tdq.mixed_precision.hutchinson import hutchinson_sensitivity
from tdq.sampling import ConditionedForward, Conditioning

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from test_distributed import _free_port, _launch_two_cpu_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 buckets x 5 samples in batches of 2: 9 units (batches of 2, 2, 1); rank 0 computes 5, rank 1 computes 4
GRID = {"units": "train_timestep", "num_buckets": 3, "t_min": 0.0, "t_max": 999.0}
ARGS = {"samples_per_bucket": 5, "batch_size": 2, "seed": 3}
FIELDS = ("act_fisher", "act_range", "weight_fisher", "weight_range", "macs", "num_samples")


class ClassNet(nn.Module):
    """A tiny class-conditional denoiser `f(x, timestep, class_labels)` (no diffusers model: quick to import)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.time = nn.Linear(1, 4)
        self.label = nn.Embedding(4, 4)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, timestep, class_labels=None):
        t = timestep.float().view(-1, 1) / 1000.0
        h = self.conv_in(x) + self.time(t).view(-1, 4, 1, 1)
        if class_labels is not None:
            h = h + self.label(class_labels).view(-1, 4, 1, 1)
        return self.conv_out(torch.tanh(h))


def make_inputs():
    """The model, clean samples (3 rows, cycled) and a `ConditionedForward` giving row `i` the class of seed `i`."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 6, 6, generator=g)
    sampler = types.SimpleNamespace(
        conditioning=Conditioning("class", ["a", "b", "c", "d"]), latent_shape=(1, 6, 6), device="cpu"
    )
    fwd = ConditionedForward(sampler, seeds=[0, 1, 2], samples_per_bucket=ARGS["samples_per_bucket"])
    return ClassNet(), DDPMScheduler(), x0, fwd


def profiles(shard, forward_fn=None, **override):
    net, sch, x0, fwd = make_inputs()
    args = {**ARGS, **override}
    fisher = profile_sensitivity(
        net, sch, x0, GRID, forward_fn=forward_fn or fwd, progress=False, shard=shard, **args
    )
    hutch = hutchinson_sensitivity(net, sch, x0, GRID, probes=2, shard=shard, **args)
    return fisher, hutch


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, out, port):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2)
        try:
            sys.path.insert(0, {tests!r})
            import tdq
            assert tdq.__file__.startswith({root!r}), tdq.__file__
            from safetensors.torch import save_file
            from test_dist_profile import FIELDS, profiles

            fisher, hutch = profiles(None)  # auto: sharded under an initialized 2-process group
            save_file({{f"{{name}}.{{f}}": getattr(p, f) for name, p in (("fisher", fisher), ("hutch", hutch))
                       for f in FIELDS}}, f"{{out}}.rank{{rank}}.safetensors")
            errors = {{}}
            for case, override in (("seed", {{"seed": 3 + rank}}), ("batch_size", {{"batch_size": 2 + rank}})):
                try:
                    profiles(True, **override)
                    errors[case] = None
                except ValueError as e:
                    errors[case] = str(e)
            meta = {{"fisher": fisher.meta["distribution"], "hutch": hutch.meta["distribution"], "errors": errors}}
            with open(f"{{out}}.rank{{rank}}.json", "w") as f:
                json.dump(meta, f)
        finally:
            dist.destroy_process_group()  # else gloo's threads can abort the process at exit

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
    """
)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_profile")
    script = tmp / "profile2.py"
    script.write_text(SCRIPT.format(tests=TESTS, root=os.path.dirname(TESTS)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(TESTS), env.get("PYTHONPATH")) if p)
    out = tmp / "out"
    cmd = [sys.executable, str(script), str(out), str(_free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from safetensors.torch import load_file

    return [
        (load_file(f"{out}.rank{r}.safetensors"), json.loads(open(f"{out}.rank{r}.json").read()))
        for r in (0, 1)
    ]


@pytest.mark.timeout(240)
def test_two_processes_equal_one_process(two_processes):
    fisher, hutch = profiles(False)
    assert fisher.meta["distribution"]["world_size"] == 1 and not fisher.meta["distribution"]["sharded"]
    assert float(fisher.act_fisher.sum()) > 0 and float(hutch.weight_fisher.sum()) > 0
    for rank, (got, meta) in enumerate(two_processes):
        for name, ref in (("fisher", fisher), ("hutch", hutch)):
            assert meta[name]["world_size"] == 2 and meta[name]["units_per_rank"] == [5, 4], meta
            for f in FIELDS:
                # per-unit sums gathered and added in unit order: the same float additions as one process
                assert torch.equal(got[f"{name}.{f}"], getattr(ref, f)), (rank, name, f)


@pytest.mark.timeout(240)
def test_mismatched_rank_is_refused_naming_the_field(two_processes):
    for _, meta in two_processes:
        for field, message in meta["errors"].items():
            assert message is not None, field
            assert f"differ in {field} (rank 0: " in message, message
            assert "model" not in message and "x0" not in message, message  # only the field that differs


def test_units_cover_every_bucket_batch_once():
    units = profile_units(3, 5, 2)
    assert [(u.bucket, u.batch, u.start, u.stop) for u in units] == [
        (k, j, s, min(s + 2, 5)) for k in range(3) for j, s in enumerate((0, 2, 4))
    ]
    assert [u.index for u in units] == list(range(9))
    for world in (1, 2, 3, 4, 11):
        shares = [units[r::world] for r in range(world)]
        flat = sorted(u.index for share in shares for u in share)
        assert flat == list(range(9))  # exactly once
    assert sum(u.size for u in units if u.bucket == 1) == 5
    assert profile_units(2, 4, 8) == [ProfileUnit(0, 0, 0, 0, 4), ProfileUnit(1, 1, 0, 0, 4)]


def test_shard_without_process_group():
    units = profile_units(2, 3, 2)
    plan = shard_plan(units, None)  # no process group: everything here
    assert (plan.rank, plan.world_size, plan.local) == (0, 1, units)
    assert plan.meta() == {
        "sharded": False,
        "world_size": 1,
        "assignment": "round_robin",
        "num_units": 4,
        "units_per_rank": [4],
    }
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        shard_plan(units, True)
    check_same_inputs({"seed": "1"}, plan)  # one process: nothing to compare


def test_input_fingerprints_see_weights_and_samples():
    net, _, x0, fwd = make_inputs()
    base = input_fingerprints(net, x0, seed=3)
    assert input_fingerprints(ClassNet(), x0.clone(), seed=3) == base
    with torch.no_grad():
        net.conv_out.bias[0] += 1e-6
    changed = input_fingerprints(net, x0 + 0, seed=3)
    assert changed["model"] != base["model"] and changed["x0"] == base["x0"]
    assert input_fingerprints(ClassNet(), x0 * 2, seed=3)["x0"] != base["x0"]
    assert input_fingerprints(ClassNet(), x0, seed=4)["seed"] == "4"
    assert "cond=sha256:" in fwd.fingerprint()


def test_conditioned_forward_seeks_to_a_unit_row():
    _, _, _, fwd = make_inputs()
    fwd.seek(3)
    assert fwd.rows(2).tolist() == [0, 1]  # rows 3, 4 of the bucket cycle the 3 seeds
    assert fwd.position == 0  # 5 samples per bucket: the next bucket starts again at row 0
    with pytest.raises(ValueError, match="outside"):
        fwd.seek(5)


RUN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    import tdq
    assert tdq.__file__.startswith({root!r}), tdq.__file__
    from tdq.run import stages
    from tdq.run.job import run_experiment
    sys.path.insert(0, {tests!r})
    from test_dist_profile import FIELDS, stop_after_profile

    def save_profile(ctx):
        out = sys.argv[2] + f".rank{{ctx.dist.process_index}}"
        save_file({{f: getattr(ctx.profile, f) for f in FIELDS}}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(ctx.sections["profile_distribution"], f)

    stop_after_profile(stages, save_profile)
    try:
        run_experiment(json.loads(sys.argv[1]), sys.argv[2])
    except FileNotFoundError:  # no report stage: run_experiment finds no report.json to return
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the process at exit
    """
)

RUN_CFG = {
    "model": {"name": "tiny-random", "source": "random", "sample_size": 16},
    "quant": {"grid": {"num_buckets": 3}},
    # 3 buckets x 3 samples in batches of 2: 6 units, 3 per process
    "schedule": {"planner": "uniform", "samples_per_bucket": 3, "batch_size": 2},
    "calibration": {"num_samples": 2, "num_inference_steps": 2, "batch_size": 2},
    "eval": {"num_samples": 2, "num_inference_steps": 2, "batch_size": 2, "feature": "none", "lpips_nets": [],
             "noise_floor": False, "cache": False, "dataset": "none"},
    "progress": False,
    "threads": 1,
}  # fmt: skip


def stop_after_profile(stages, last) -> None:
    """Cut `stages.STAGES` after `profile` and append the stage `last`."""
    names = [s.name for s in stages.STAGES]
    stages.STAGES[:] = stages.STAGES[: names.index("profile") + 1] + [stages.Stage("last", last)]


@pytest.mark.timeout(300)
def test_tdq_run_profile_sharded_under_accelerate(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tdq.run import stages
    from tdq.run.job import run_experiment

    script = tmp_path / "run_profile.py"
    script.write_text(RUN_SCRIPT.format(tests=TESTS, root=os.path.dirname(TESTS)))
    out = tmp_path / "multi"
    _launch_two_cpu_ranks(script, json.dumps(RUN_CFG), str(out), cwd=tmp_path, timeout=280)

    saved = {}

    def keep(ctx):
        saved.update({f: getattr(ctx.profile, f) for f in FIELDS}, dist=ctx.sections["profile_distribution"])

    monkeypatch.setattr(stages, "STAGES", list(stages.STAGES))
    stop_after_profile(stages, keep)
    with pytest.raises(FileNotFoundError, match="report.json"):  # stopped after profiling: no report
        run_experiment(RUN_CFG, tmp_path / "single")
    assert saved["dist"]["world_size"] == 1 and not saved["dist"]["sharded"]
    for rank in (0, 1):
        dist = json.loads(open(f"{out}.rank{rank}.json").read())
        assert dist["sharded"] and dist["world_size"] == 2 and dist["units_per_rank"] == [3, 3], dist
        got = load_file(f"{out}.rank{rank}.safetensors")
        for f in FIELDS:
            assert torch.equal(got[f], saved[f]), (rank, f)


def test_readme_quotes_the_measured_profile_sharding():
    """The README's sharding numbers are `experiments/results/dist_profile.json`'s: a median 2-process / 1-process
    wall-time ratio below 1 and a bit-equal profile in every pair (the benchmark measures, this test only reads)."""
    import re
    from pathlib import Path

    root = Path(TESTS).parent
    res = json.loads((root / "experiments" / "results" / "dist_profile.json").read_text())
    assert res["bit_equal"] and all(e["equal"] for e in res["equality"])
    assert res["median_ratio"] < 1.0
    ratios = sorted(p["ratio"] for p in res["pairs"])
    readme = (root / "README.md").read_text()
    m = re.search(
        r"two processes took (\d\.\d\d)× the single-process\s+wall time \(median of (\d+) interleaved "
        r"pairs, (\d\.\d\d)–(\d\.\d\d)",
        readme,
    )
    assert m, "README's sharded-profiling sentence not found"
    assert float(m.group(1)) == round(res["median_ratio"], 2)
    assert int(m.group(2)) == len(res["pairs"])
    assert (float(m.group(3)), float(m.group(4))) == (round(ratios[0], 2), round(ratios[-1], 2))
