"""Long run (issue #14): 1,000 denoiser calls with mixed batch sizes, CFG-style doubled batches and random (also
per-sample) timesteps keep memory flat (no growth in observers, caches, hooks or live tensors) and give, for every
call, exactly what a freshly loaded model gives for that call alone."""

import gc
import random

import torch

import tdq
from tdq import TDQConfig, TimestepGrid
from tdq import testing as T
from tdq.serialization import load_quantization, save_quantization


def _live_tensors(exclude=()):
    gc.collect()
    skip = {id(t) for t in exclude}
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in skip]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def _bookkeeping(model):
    state = tdq.get_quantization(model)
    layers = list(tdq.iter_quant_layers(model))
    return {
        "observers": sum(m.act_quantizer.observers is not None for _, m in layers),
        "param_cache": sum(len(m.act_quantizer._params or []) for _, m in layers),
        "weight_cache": sum(m._wq_cache is not None for _, m in layers),
        "pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "hooks": sum(len(m._forward_hooks) for m in model.modules()),
        "diffusers_hooks": len(getattr(getattr(model, "_diffusers_hook", None), "hooks", {}) or {}),
        "modules": len(list(model.modules())),
        "buffers": len(list(model.buffers())),
        "hook_installed": state.hook is not None,
    }


def _calls(model, n, seed, cond=False):
    """`n` random denoiser calls: batch 1-4, half of them CFG-doubled, shared or per-sample timesteps."""
    rng = random.Random(seed)
    for i in range(n):
        b = rng.randint(1, 4)
        if rng.random() < 0.5:
            sigmas = torch.full((b,), 10 ** rng.uniform(-2.5, 1.9))
        else:
            sigmas = torch.tensor([10 ** rng.uniform(-2.5, 1.9) for _ in range(b)])
        g = torch.Generator().manual_seed(seed * 100003 + i)
        inputs = T.denoiser_inputs(model, batch=b, t=sigmas, generator=g)
        if rng.random() < 0.5:  # classifier-free guidance: cond and uncond halves in one call, same timesteps
            inputs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            if cond:
                inputs["encoder_hidden_states"][b:] = 0
        yield inputs


def _run(model, inputs):
    with torch.no_grad():
        return T.output_tensor(model(**inputs))


def test_thousand_calls_keep_memory_flat_and_match_fresh_single_calls(tmp_path):
    torch.set_num_threads(1)
    config = TDQConfig(grid=TimestepGrid(num_buckets=8))
    model = tdq.quantize_(T.ToySigmaDenoiser(), config)
    with torch.no_grad(), tdq.calibration(model):
        for inputs in _calls(model, 40, seed=1):
            model(**inputs)
    save_quantization(model, tmp_path)
    fresh = load_quantization(T.ToySigmaDenoiser(), tmp_path)

    probe = T.denoiser_inputs(model, batch=2, t=torch.full((2,), 1.0))

    def run_chunk(first, n, kept):
        rng = random.Random(first)
        for inputs in _calls(model, n, seed=first):
            out = _run(model, inputs)
            assert torch.isfinite(out).all()
            if rng.random() < 0.03:
                kept.append((inputs, out))
        _run(model, probe)  # the same last call, so the context holds the same kind of bucket at each check

    def kept_tensors(kept):
        return [v for x, y in kept for v in [*x.values(), y] if isinstance(v, torch.Tensor)]

    kept = []
    run_chunk(0, 200, kept)
    start_tensors, start_books = _live_tensors(kept_tensors(kept)), _bookkeeping(model)
    run_chunk(200, 800, kept)
    # flat: the same live tensors (count and bytes, besides the calls kept for the check) and bookkeeping
    assert _live_tensors(kept_tensors(kept)) == start_tensors
    assert _bookkeeping(model) == start_books
    assert start_books["observers"] == 0 and start_books["pre_hooks"] == 1
    # every kept call, run alone on a freshly loaded model, gives the same output bit for bit
    assert len(kept) > 10
    for inputs, out in kept:
        assert torch.equal(_run(fresh, inputs), out)


def test_diffusers_model_hook_stays_single_over_cfg_calls():
    torch.set_num_threads(1)
    model = tdq.quantize_(T.tiny_unet2d_condition(), TDQConfig(grid=TimestepGrid(num_buckets=4)))
    with torch.no_grad(), tdq.calibration(model):
        for t in (20.0, 480.0, 950.0):
            model(**T.denoiser_inputs(model, t=t))
    rng = random.Random(0)

    def call(i):
        b = rng.randint(1, 2)
        t = torch.tensor([rng.uniform(0, 999) for _ in range(b)])
        g = torch.Generator().manual_seed(i)
        inputs = T.denoiser_inputs(model, batch=2 * b, t=torch.cat([t, t]), generator=g)
        inputs["sample"][b:] = inputs["sample"][:b]  # classifier-free guidance: cond and uncond halves
        inputs["encoder_hidden_states"][b:] = 0
        return _run(model, inputs)

    probe = T.denoiser_inputs(model, batch=2, t=300.0)
    for i in range(5):
        call(i)
    _run(model, probe)  # the same last call before each check
    start_tensors, start_books = _live_tensors(), _bookkeeping(model)
    registry = model._diffusers_hook
    for i in range(5, 30):
        call(i)
    _run(model, probe)
    assert _live_tensors() == start_tensors and _bookkeeping(model) == start_books
    assert list(registry.hooks) == ["tdq_timestep"]
