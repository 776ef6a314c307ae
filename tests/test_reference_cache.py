"""FP reference cache: keys, hits, corruption detection, atomic layout; exact FID trace."""

import json

import pytest
import torch

import tdq
from tdq.eval.data import frechet_distance
from tdq.eval.reference import (
    ReferenceCache,
    cached_features,
    cached_samples,
    feature_id,
    model_fingerprint,
    reference_spec,
)
from tdq.sampling import DiffusionSampler, make_scheduler
from tdq.testing import tiny_unet2d

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d(sample_size=8)


def _sampler(unet, steps=3, name="ddim", trajectory=True):
    from diffusers import DDPMScheduler

    sch = make_scheduler(DDPMScheduler(num_train_timesteps=1000), name)
    return DiffusionSampler(
        unet,
        sch,
        (1, 8, 8),
        num_inference_steps=steps,
        batch_size=2,
        record_trajectory=trajectory,
        progress=False,
    )


class _Feat(torch.nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_miss_then_hit_returns_identical_samples(tmp_path, unet):
    cache = ReferenceCache(tmp_path)
    smp = _sampler(unet)
    spec = reference_spec(unet, smp, SEEDS)
    a, info = cached_samples(smp, SEEDS, spec, cache)
    assert info.status == "miss"
    b, info = cached_samples(smp, SEEDS, spec, cache)
    assert info.hit
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.trajectory, b.trajectory, strict=True))
    assert a.timesteps == b.timesteps
    files = {p.name for p in cache.entry_dir(spec).iterdir()}
    assert files == {"manifest.json", "samples.safetensors"}  # no temporary files left behind


def test_key_changes_with_everything_that_changes_samples(unet):
    smp = _sampler(unet)
    base = ReferenceCache.key(reference_spec(unet, smp, SEEDS))
    other_model = tiny_unet2d(sample_size=8)
    with torch.no_grad():
        other_model.conv_in.weight[0, 0, 0, 0] += 1e-3
    variants = [
        reference_spec(unet, _sampler(unet, steps=4), SEEDS),
        reference_spec(unet, _sampler(unet, name="ddpm"), SEEDS),
        reference_spec(unet, smp, [0, 1, 3]),
        reference_spec(unet, smp, SEEDS[:2]),
        reference_spec(unet, smp, SEEDS, guidance_scale=2.0),
        reference_spec(other_model, smp, SEEDS),
    ]
    keys = {ReferenceCache.key(v) for v in variants}
    assert base not in keys and len(keys) == len(variants)
    assert ReferenceCache.key(reference_spec(unet, _sampler(unet), SEEDS)) == base


def test_fingerprint_ignores_quantizer_state():
    model = tiny_unet2d(sample_size=8)
    before = model_fingerprint(model)
    tdq.quantize_(model, tdq.TDQConfig(), num_train_timesteps=1000)
    assert model_fingerprint(model) == before


def _corrupt_truncate(folder):
    p = folder / "samples.safetensors"
    p.write_bytes(p.read_bytes()[:-10])


def _corrupt_flip(folder):
    p = folder / "samples.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def _corrupt_missing(folder):
    (folder / "samples.safetensors").unlink()


def _corrupt_manifest(folder):
    (folder / "manifest.json").write_text("{not json")


def _corrupt_spec(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["spec"]["num_inference_steps"] = 99
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_missing, _corrupt_manifest, _corrupt_spec]
)
def test_corrupted_entry_is_detected_and_recomputed(tmp_path, unet, corrupt):
    cache = ReferenceCache(tmp_path)
    smp = _sampler(unet, trajectory=False)
    spec = reference_spec(unet, smp, SEEDS)
    a, _ = cached_samples(smp, SEEDS, spec, cache)
    corrupt(cache.entry_dir(spec))
    b, info = cached_samples(smp, SEEDS, spec, cache)
    assert info.status == "invalid" and info.reason
    assert torch.equal(a.images, b.images)
    _, info = cached_samples(smp, SEEDS, spec, cache)
    assert info.hit  # rewritten


def test_wrong_shapes_are_rejected(tmp_path, unet):
    cache = ReferenceCache(tmp_path)
    smp = _sampler(unet, trajectory=False)
    spec = reference_spec(unet, smp, SEEDS)
    cache.write(spec, "samples", {"images": torch.zeros(2, 1, 8, 8), "timesteps": torch.zeros(3)})
    _, info = cached_samples(smp, SEEDS, spec, cache)
    assert info.status == "invalid" and "shape" in info.reason


def test_feature_cache(tmp_path, unet):
    cache = ReferenceCache(tmp_path)
    smp = _sampler(unet, trajectory=False)
    spec = reference_spec(unet, smp, SEEDS)
    res, _ = cached_samples(smp, SEEDS, spec, cache)
    net = _Feat()
    fid = feature_id("toy", net)
    f1, info = cached_features(res.images, net, fid, spec, cache, batch_size=2)
    assert info.status == "miss" and f1.shape == (3, 4) and f1.dtype == torch.float64
    f2, info = cached_features(res.images, net, fid, spec, cache)
    assert info.hit and torch.equal(f1, f2)
    # samples entry is still valid after adding features
    assert cached_samples(smp, SEEDS, spec, cache)[1].hit
    # another extractor (other weights) is another file
    net2 = _Feat()
    with torch.no_grad():
        net2.lin.bias += 1
    assert feature_id("toy", net2) != fid
    assert cached_features(res.images, net2, feature_id("toy", net2), spec, cache)[1].status == "miss"
    # a damaged feature file is recomputed; the samples survive
    path = next(p for p in cache.entry_dir(spec).iterdir() if p.name.startswith("features-toy@" + fid[4:8]))
    path.write_bytes(path.read_bytes()[:20])
    f3, info = cached_features(res.images, net, fid, spec, cache, batch_size=2)
    assert info.status == "invalid" and torch.equal(f1, f3)
    assert cached_samples(smp, SEEDS, spec, cache)[1].hit


@pytest.mark.parametrize("n,m,d", [(5, 4, 32), (40, 30, 8)])
def test_frechet_distance_matches_torchmetrics(n, m, d):
    from tdq.eval import fid_from_features

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ref = fid_from_features(a, b)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a[:1], b) is None
