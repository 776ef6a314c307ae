"""The simulator's fast fake quantizer (bit-exact, NaN/inf kept) and what a converted model holds in memory."""

from __future__ import annotations

import copy

import pytest
import torch

import tdq
from tdq.config import TDQConfig
from tdq.quant import functional as F
from tdq.quant.backends import get_cpu_capability, resident_bytes, to_backend
from tdq.testing import denoiser_inputs, output_tensor, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

needs_x86 = pytest.mark.skipif(
    not get_cpu_capability()["onednn_int8"], reason="PyTorch without oneDNN int8 kernels"
)

# (zero_point, qmin, qmax): 8-bit affine at the ends and the middle, 4-bit affine, symmetric narrow 8/4-bit ranges
RANGES = [(128, 0, 255), (0, 0, 255), (255, 0, 255), (3, 0, 15), (0, -127, 127), (0, -7, 7), (-3, -7, 7)]
SCALES = [1.0, 0.037, 1 / 3, 0.0078125, 1e-8, 3.0]


def _reference(x, scale, zp, qmin, qmax, keep_nonfinite=False):
    out = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return torch.where(torch.isfinite(x), out, x) if keep_nonfinite else out


def _inputs(scale):
    torch.manual_seed(0)
    ties = (torch.arange(-300, 300) + 0.5) * scale  # exact rounding ties k + 0.5
    return [
        torch.cat([torch.randn(4099) * scale * 200, ties, torch.tensor([0.0, -0.0, 1e-40])]),
        torch.randn(2, 3, 5, 5).mul(scale * 100).contiguous(memory_format=torch.channels_last),
        torch.randn(5, 6).t() * scale * 50,  # not contiguous
    ]


@pytest.mark.parametrize("scale", SCALES)
def test_fast_fake_quant_is_bit_exact(scale):
    for zp, qmin, qmax in RANGES:
        for x in _inputs(scale):
            assert torch.equal(
                F.fake_quantize_per_tensor(x, scale, zp, qmin, qmax), _reference(x, scale, zp, qmin, qmax)
            )


def test_fast_fake_quant_takes_the_fast_path(monkeypatch):
    # finite float32 inputs without autograd must not reach PyTorch's (20x slower) fused fake quantizer
    x = torch.randn(4, 8, 6, 6)
    ref = _reference(x, 0.02, 128, 0, 255)

    def boom(*a, **k):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(torch, "fake_quantize_per_tensor_affine", boom)
    assert torch.equal(F.fake_quantize_per_tensor(x, 0.02, 128, 0, 255, keep_nonfinite=True), ref)


@pytest.mark.parametrize("scale", [1.0, 0.1, 1e-3])
def test_fast_fake_quant_huge_inputs_clamp(scale):
    # |x / scale| >= 2^31 wraps in the vectorised float->int32 conversion (was code 0 instead of qmax)
    x = torch.tensor([2.0**31, 1e10, 3e38, -1e10, -3e38, 0.5]) * max(scale, 1.0)
    for zp, qmin, qmax in RANGES:
        got = F.fake_quantize_per_tensor(x, scale, zp, qmin, qmax)
        assert torch.equal(got, _reference(x, scale, zp, qmin, qmax))
        assert float(got[0]) == pytest.approx((qmax - zp) * scale, rel=1e-6)


@pytest.mark.parametrize("keep", [True, False], ids=["keep_nonfinite", "torch_behaviour"])
def test_fast_fake_quant_nonfinite(keep):
    for zp, qmin, qmax in RANGES:
        x = torch.randn(257) * 3
        x[[0, 100, 256]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
        got = F.fake_quantize_per_tensor(x, 0.05, zp, qmin, qmax, keep_nonfinite=keep)
        ref = _reference(x, 0.05, zp, qmin, qmax, keep_nonfinite=keep)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))
        finite = torch.isfinite(x)
        assert torch.isfinite(got[finite]).all()  # the quantizer creates no NaN/inf
        if keep:  # and hides none
            assert torch.isnan(got[0]) and got[100] == float("inf") and got[256] == float("-inf")


def test_fast_fake_quant_keeps_autograd():
    x = torch.randn(10, requires_grad=True)
    y = F.fake_quantize_per_tensor(x, 0.1, 0, -127, 127)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def _calibrated(model):
    model = tdq.quantize_(model, TDQConfig())
    with tdq.calibration(model), torch.no_grad():
        for t in (100.0, 500.0, 900.0):
            model(**denoiser_inputs(model, t=t, batch=2))
    return model


def test_simulator_output_unchanged_vs_reference_quantizer(monkeypatch):
    model = _calibrated(tiny_unet2d())
    inp = denoiser_inputs(model, t=480.0, batch=2)
    inp["sample"] = inp["sample"].clone()
    inp["sample"][0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), 1e12])
    with torch.no_grad():
        fast = output_tensor(model(**inp))
    # the reference: the quantizer before the fast path (PyTorch's fused fake quantizer, NaN/inf passed through)
    monkeypatch.setattr(
        F, "fake_quantize_per_tensor", lambda x, s, zp, lo, hi, **_: _reference(x, s, zp, lo, hi, True)
    )
    with torch.no_grad():
        ref = output_tensor(model(**inp))
    assert torch.equal(torch.isnan(fast), torch.isnan(ref))
    assert torch.equal(fast.nan_to_num(0.0), ref.nan_to_num(0.0))


def _held_bytes(model) -> int:
    """Bytes of every tensor reachable from `model`'s modules through attributes, tuples, lists and dicts (storages
    counted once; oneDNN's opaque packed weights as numel x element size)."""
    seen_obj, seen_storage = set(), set()

    def walk(obj, depth):
        if id(obj) in seen_obj or depth > 8:
            return 0
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_mkldnn or obj.is_meta:
                return obj.numel() * obj.element_size() if obj.is_mkldnn else 0
            st = obj.untyped_storage()
            key = st.data_ptr() or id(st)
            if key in seen_storage:
                return 0
            seen_storage.add(key)
            return st.nbytes()
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            items = list(vars(obj).values())
        else:
            return 0
        return sum(walk(v, depth + 1) for v in items)

    # every module from the top (nesting depth does not count), then what each one holds
    return sum(walk(m, 0) for m in model.modules())


@needs_x86
def test_converted_model_holds_no_float_weight_copies():
    fp = tiny_unet2d(block_out_channels=(64, 128), norm_num_groups=16)
    fp_bytes = resident_bytes(fp)
    model = _calibrated(copy.deepcopy(fp))
    with torch.no_grad():
        model(**denoiser_inputs(model, t=300.0))  # fills the simulator's fake-quant weight cache
    to_backend(model, "x86")
    with torch.no_grad():
        model(**denoiser_inputs(model, t=300.0))
    # parameters, buffers and anything else the model's modules, quantizers, hook and records hold: no float weight,
    # fake-quant cache, observer or calibration statistics survive conversion
    held = _held_bytes(model)
    assert resident_bytes(model) <= 0.27 * fp_bytes
    assert held <= 0.27 * fp_bytes, f"converted model holds {held / fp_bytes:.3f}x the FP32 bytes"


def _map_into_file(model, path):
    """Every float parameter and buffer of `model` moved into one private file mapping (as diffusers'
    `from_pretrained` leaves a model on its memory-mapped safetensors checkpoint)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    flat.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=flat.numel(), dtype=torch.float32)
    off = 0
    for t in tensors:
        t.data = mapped[off : off + t.numel()].view(t.shape)
        off += t.numel()


def _mapped_paths():
    with open("/proc/self/maps") as f:
        return {p[5].strip() for p in (line.split(maxsplit=5) for line in f) if len(p) == 6}


@needs_x86
def test_conversion_releases_a_memory_mapped_checkpoint(tmp_path):
    ref = _calibrated(tiny_unet2d())
    model = tiny_unet2d()
    _map_into_file(model, tmp_path / "ckpt.bin")
    model = _calibrated(model)
    assert str(tmp_path / "ckpt.bin") in _mapped_paths()
    to_backend(model, "x86")
    to_backend(ref, "x86")
    import gc

    gc.collect()
    # the biases and norms left in float were copied out: the checkpoint (and every weight page read from it) is gone
    assert str(tmp_path / "ckpt.bin") not in _mapped_paths()
    inp = denoiser_inputs(model, t=300.0)
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**inp)), output_tensor(ref(**inp)))


@needs_x86
def test_conversion_frees_each_simulated_layer_as_it_goes(monkeypatch):
    import gc
    import weakref

    from tdq.quant.backends import BACKENDS
    from tdq.quant.modules import QuantMixin

    model = _calibrated(tiny_unet2d())
    refs = {n: weakref.ref(m) for n, m in model.named_modules() if isinstance(m, QuantMixin)}
    impl = BACKENDS["x86"]
    lower, done, alive = impl.lower, [], []

    def spy(self, name, m, codes):
        gc.collect()
        # every layer converted before this one is gone already (not held until the whole model is converted)
        alive.extend(d for d in done if refs[d]() is not None and refs[d]() is not model.get_submodule(d))
        done.append(name)
        return lower(self, name, m, codes)

    monkeypatch.setattr(impl, "lower", spy)
    to_backend(model, "x86")
    assert len(done) == len(refs) > 2
    assert not alive, f"simulated layers still alive during conversion: {alive}"


def test_load_from_saved_state_estimates_no_weight_range(tmp_path, monkeypatch):
    from tdq.quant.quantizers import WeightQuantizer
    from tdq.serialization import load_quantization, save_quantization

    torch.manual_seed(0)
    ref = _calibrated(tiny_unet2d())
    save_quantization(ref, tmp_path / "q")
    fresh = tiny_unet2d()
    fresh.load_state_dict(
        {k: v for k, v in ref.state_dict().items() if k in fresh.state_dict()}, strict=False
    )

    def boom(self, *a, **k):
        raise AssertionError("weight range estimated although the saved state sets it")

    monkeypatch.setattr(WeightQuantizer, "calibrate_", boom)
    loaded = load_quantization(fresh, tmp_path / "q")
    inp = denoiser_inputs(ref, t=300.0)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inp)), output_tensor(ref(**inp)))


def test_config_to_plain_does_not_import_omegaconf():
    import subprocess
    import sys

    code = (
        "import sys, tdq.config as c\n"
        "assert c._to_plain({'a': [1]}) == {'a': [1]}\n"
        "print('omegaconf' in sys.modules)\n"
        "import omegaconf\n"
        "print(c._to_plain(omegaconf.OmegaConf.create({'a': [1]})) == {'a': [1]})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]
