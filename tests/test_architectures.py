"""Every supported architecture: the hook sees the right timestep, layers are swapped, calibration runs, W8A8 stays
close to FP on inputs it was not calibrated with."""

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


# W8A8 relative output error on held-out inputs (calibration seeds 0-2, evaluation seeds 1000-1001, same
# timesteps), measured on these inputs: unet2d 0.049, unet2d_condition 0.095, dit 0.019, pixart 0.012, sd3 0.035,
# flux 0.015, sigma_module 0.016 (other held-out seed sets gave up to 1.6x these). Bounds: twice the measured value.
MAX_ERROR = {
    "unet2d": 0.10,
    "unet2d_condition": 0.19,
    "dit": 0.04,
    "pixart": 0.025,
    "sd3": 0.07,
    "flux": 0.03,
    "sigma_module": 0.031,
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

    def inputs_of(seeds):
        return [
            T.denoiser_inputs(model, t=_as_arg(model, t), generator=torch.Generator().manual_seed(s))
            for t in ts
            for s in seeds
        ]

    inputs, held_out = inputs_of([0, 1, 2]), inputs_of([1000, 1001])
    with torch.no_grad():
        refs = [T.output_tensor(model(**kw)) for kw in held_out]
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
        outs = [T.output_tensor(model(**kw)) for kw in held_out]
    err = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, refs, strict=True))
    # quantization really happens, and stays within twice the measured error
    assert 0 < err <= MAX_ERROR[name], f"{name}: W8A8 relative error {err:.4f}"
    # ... and removing the hook returns exactly the FP model.
    with torch.no_grad(), tdq.disabled(model):
        torch.testing.assert_close(T.output_tensor(model(**held_out[0])), refs[0], rtol=0, atol=0)
