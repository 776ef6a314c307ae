"""Every supported architecture: the hook sees the right timestep, layers are swapped, calibration runs, W8A8 stays
close to FP."""

import pytest
import torch

import tdq
from tdq import testing as T
from tdq.quant import QuantMixin

# (factory, calibration timesteps as passed by a sampler, expected grid units, grid value of the first one)
CASES = {
    "unet2d": (T.tiny_unet2d, [999.0, 700.0, 400.0, 100.0], "train_timestep", 999.0),
    "unet2d_condition": (T.tiny_unet2d_condition, [999.0, 700.0, 400.0, 100.0], "train_timestep", 999.0),
    "dit": (T.tiny_dit, [999.0, 700.0, 400.0, 100.0], "train_timestep", 999.0),
    "pixart": (T.tiny_pixart, [999.0, 700.0, 400.0, 100.0], "train_timestep", 999.0),
    # SD3 pipelines pass t * 1000, Flux pipelines pass t.
    "sd3": (T.tiny_sd3, [1000.0, 700.0, 400.0, 100.0], "t", 1.0),
    "flux": (T.tiny_flux, [1.0, 0.7, 0.4, 0.1], "t", 1.0),
    "sigma_module": (T.ToySigmaDenoiser, [80.0, 5.0, 0.5, 0.01], "sigma", 80.0),
}


def _as_arg(model, t):
    # Transformers take per-batch tensors; UNets and the plain module take a scalar.
    if type(model).__name__ in ("UNet2DModel", "UNet2DConditionModel", "ToySigmaDenoiser"):
        return torch.tensor(t)
    return torch.full((2,), t)


@pytest.mark.parametrize("name", list(CASES))
def test_quantize_calibrate_close_to_fp(name):
    factory, ts, units, first = CASES[name]
    model = factory()
    n_float = len(tdq.select_layers(model))
    seeds = [0, 1, 2]
    inputs = [
        T.denoiser_inputs(model, t=_as_arg(model, t), generator=torch.Generator().manual_seed(s))
        for t in ts
        for s in seeds
    ]
    with torch.no_grad():
        refs = [T.output_tensor(model(**kw)) for kw in inputs]
        tdq.quantize_(model)
        assert sum(isinstance(m, QuantMixin) for m in model.modules()) == n_float > 0
        state = tdq.get_quantization(model)
        assert state.grid.units == units
        seen = []
        with tdq.calibration(model):
            for kw in inputs:
                model(**kw)
                seen.append(state.hook.last_value)
        assert seen[0] == pytest.approx(first, rel=1e-5)
        outs = [T.output_tensor(model(**kw)) for kw in inputs]
    err = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, refs, strict=True))
    assert err < 0.06, f"{name}: W8A8 relative error {err:.3f}"
    assert all(torch.isfinite(o).all() for o in outs)
    # The quantized output differs from FP (quantization really happens) ...
    assert max((o - r).abs().max().item() for o, r in zip(outs, refs, strict=True)) > 0
    # ... and removing the hook returns exactly the FP model.
    with torch.no_grad(), tdq.disabled(model):
        torch.testing.assert_close(T.output_tensor(model(**inputs[0])), refs[0], rtol=0, atol=0)
