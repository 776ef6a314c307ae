"""Sharded calibration under `accelerate launch` (2 CPU processes) equals the single-process calibration."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tdq.config import TDQConfig, WeightRounding
from tdq.eval.dist_calib import calibration_mode

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from test_distributed import _launch_two_cpu_ranks  # noqa: E402

CFG = {
    "model": {"name": "tiny-random", "source": "random", "sample_size": 16},
    # outlier handling decides on a snapshot sample that differs from one process's (documented); ranges are exact
    "quant": {"grid": {"num_buckets": 3}, "outliers": {"handle": False}},
    "schedule": {"planner": "none"},
    # 3 batches of 2 seeds: process 0 calibrates on seeds 0-3, process 1 on seeds 4-5
    "calibration": {"num_samples": 6, "num_inference_steps": 4, "batch_size": 2},
    "eval": {
        "num_samples": 2,
        "num_inference_steps": 2,
        "batch_size": 2,
        "feature": "none",
        "lpips_nets": [],
        "noise_floor": False,
        "cache": False,
        "dataset": "none",
    },
    "progress": False,
    "threads": 1,
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    import tdq
    assert tdq.__file__.startswith({root!r}), tdq.__file__
    from tdq.run import stages
    from tdq.run.job import run_experiment

    def save_ranges(ctx):
        # each process's own calibrated ranges (before any later stage), to compare with one process
        sd = {{k: v.detach().clone() for k, v in ctx.model.denoiser.state_dict().items()
              if "act_quantizer." in k and (k.endswith("min_val") or k.endswith("max_val"))}}
        save_file(sd, sys.argv[2] + f".rank{{ctx.dist.process_index}}.safetensors")
        with open(sys.argv[2] + f".rank{{ctx.dist.process_index}}.json", "w") as f:
            json.dump(ctx.sections["calibration_distribution"], f)

    names = [s.name for s in stages.STAGES]  # stop after calibration (sampling/evaluation are not under test)
    stages.STAGES[:] = stages.STAGES[: names.index("calibrate") + 1] + [stages.Stage("save_ranges", save_ranges)]
    # no broadcast after calibration: each process must reach the single-process ranges by the merge alone
    from tdq.eval.distributed import MultiProcess
    MultiProcess.sync_buffers = lambda self, module, contains="_quantizer.": 0
    try:
        run_experiment(json.loads(sys.argv[1]), sys.argv[2])
    except FileNotFoundError:  # no report stage: run_experiment finds no report.json to return
        pass
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo's threads can abort the process at exit
    """
)


def _ranges(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def _single(tmp_path, cfg) -> dict[str, torch.Tensor]:
    from tdq.run import stages
    from tdq.run.job import run_experiment

    saved = {}

    def save_ranges(ctx):
        assert ctx.sections["calibration_distribution"]["mode"] == "single"
        saved.update(
            {
                k: v.detach().clone()
                for k, v in ctx.model.denoiser.state_dict().items()
                if "act_quantizer." in k and (k.endswith("min_val") or k.endswith("max_val"))
            }
        )

    names = [s.name for s in stages.STAGES]
    new = stages.STAGES[: names.index("calibrate") + 1] + [stages.Stage("save_ranges", save_ranges)]
    orig = stages.STAGES
    stages.STAGES = new
    try:
        n = torch.get_num_threads()
        with pytest.raises(FileNotFoundError, match="report.json"):  # stopped after calibration: no report
            run_experiment(cfg, tmp_path / "single")
        torch.set_num_threads(n)
    finally:
        stages.STAGES = orig
    return saved


@pytest.mark.timeout(600)
def test_sharded_calibration_equals_one_process(tmp_path):
    script = tmp_path / "calib.py"
    script.write_text(SCRIPT.format(root=os.path.dirname(TESTS)))
    run_dir = tmp_path / "multi"
    _launch_two_cpu_ranks(script, json.dumps(CFG), str(run_dir), cwd=tmp_path, timeout=500)
    for rank, local in ((0, 4), (1, 2)):  # whole batches of 2: seeds 0-3 and 4-5
        sec = json.loads(open(f"{run_dir}.rank{rank}.json").read())
        assert sec["mode"] == "sharded" and sec["num_processes"] == 2 and sec["local_seeds"] == local, sec
    ref = _single(tmp_path, CFG)
    assert ref and all(torch.isfinite(v).all() for v in ref.values())
    for rank in (0, 1):
        got = _ranges(f"{run_dir}.rank{rank}.safetensors")
        assert got.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(got[k], ref[k])]
        assert not bad, (rank, bad[:3], got[bad[0]], ref[bad[0]])  # min/max merge exactly


def test_calibration_mode_names_the_reason():
    assert calibration_mode(TDQConfig(), 1) == ("single", "one process")
    assert calibration_mode(TDQConfig(), 2)[0] == "sharded"
    cfg = TDQConfig()
    cfg.activation.observer = "percentile"
    mode, why = calibration_mode(cfg, 2)
    assert mode == "replicated" and "percentile" in why
    cfg = TDQConfig(weight_rounding=WeightRounding(method="gptq"))
    mode, why = calibration_mode(cfg, 2)
    assert mode == "replicated" and "gptq" in why
    cfg = TDQConfig(weight_rounding=WeightRounding(corrections=["bias"]))
    assert calibration_mode(cfg, 2)[0] == "replicated"
