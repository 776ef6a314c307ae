"""Faults (issue #14): a process killed (SIGKILL) at a random point while saving a quantized state or writing the FP
reference cache leaves nothing half-written that a later run trusts, and two processes sharing the reference cache
do not lose or corrupt each other's entries; two processes fetching one metric weight into the asset cache download
it once and readers never see half a file. Writers run in forked children; every test is bounded (a few s)."""

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import tdq
from tdq import TDQConfig, TimestepGrid
from tdq import testing as T
from tdq.eval.reference import ReferenceCache
from tdq.serialization import load_quantization, save_quantization

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

CTX = mp.get_context("fork")


def _toy(bits):
    model = tdq.quantize_(
        T.ToySigmaDenoiser(), TDQConfig(weight=tdq.QuantSpec(bits=bits), grid=TimestepGrid(num_buckets=2))
    )
    with torch.no_grad(), tdq.calibration(model):
        for s in (0.01, 1.0, 50.0):
            model(**T.denoiser_inputs(model, t=s))
    return model


def _predict(model):
    with torch.no_grad():
        return model(**T.denoiser_inputs(model, t=1.0))


def _save_forever(models, directory, ready):
    torch.set_num_threads(1)
    ready.set()
    i = 0
    while True:
        save_quantization(models[i % 2], directory)
        i += 1


def _kill_at_random(target, args, ready, rng, max_delay=0.4):
    proc = CTX.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(20), "writer did not start"
        time.sleep(rng.uniform(0.0, max_delay))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


def test_killed_save_leaves_the_old_or_the_new_state(tmp_path):
    models = [_toy(8), _toy(4)]
    outputs = [_predict(m) for m in models]
    save_quantization(models[0], tmp_path)
    rng = random.Random(0)
    for _ in range(4):
        _kill_at_random(_save_forever, (models, tmp_path), CTX.Event(), rng)
        out = _predict(load_quantization(T.ToySigmaDenoiser(), tmp_path))
        assert sum(torch.equal(out, o) for o in outputs) == 1
    # leftovers of killed saves (staged files, temporaries) are never read and are cleared by the next save
    save_quantization(models[1], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tdq_config.json", "tdq_state.safetensors"]


SPEC = {"model": "toy", "seeds": [0, 1, 2]}


def _versions():
    return [{"images": torch.full((64, 64), float(v))} for v in range(2)]


def _write_cache_forever(root, ready):
    torch.set_num_threads(1)
    cache = ReferenceCache(root)
    versions = _versions()
    ready.set()
    i = 0
    while True:
        cache.write(SPEC, "samples", versions[i % 2])
        cache.write(SPEC, f"features-{i % 3}", versions[(i + 1) % 2])
        i += 1


def test_killed_cache_writer_leaves_only_verified_entries(tmp_path):
    rng = random.Random(1)
    versions = _versions()
    for _ in range(4):
        _kill_at_random(_write_cache_forever, (tmp_path,), CTX.Event(), rng, max_delay=0.2)
        cache = ReferenceCache(tmp_path)
        for name in ("samples", "features-0", "features-1", "features-2"):
            tensors, info = cache.read(SPEC, name, {"images": [64, 64]})
            assert info.status in ("hit", "miss", "invalid")
            if info.hit:  # whatever is trusted is one of the written versions, whole
                assert any(torch.equal(tensors["images"], v["images"]) for v in versions)


def _write_names(root, prefix, barrier):
    torch.set_num_threads(1)
    cache = ReferenceCache(root)
    barrier.wait(20)
    for i in range(30):
        cache.write(SPEC, f"{prefix}-{i}", {"x": torch.full((8,), float(i))})


def test_two_processes_sharing_the_reference_cache_lose_nothing(tmp_path):
    barrier = CTX.Barrier(2)
    procs = [CTX.Process(target=_write_names, args=(tmp_path, p, barrier)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = ReferenceCache(tmp_path)
    for prefix in ("a", "b"):
        for i in range(30):
            tensors, info = cache.read(SPEC, f"{prefix}-{i}", {"x": [8]})
            assert info.hit, (prefix, i, info)
            assert torch.equal(tensors["x"], torch.full((8,), float(i)))


# ----------------------------------------------------------------------------------------------------
# two processes fetching the same metric weight into one asset cache


def _asset_fetcher(root, barrier, force):
    from tdq.assets import fetch

    barrier.wait(20)
    fetch(["test_asset"], cache_dir=root, sources=("reference",), force=force)


def _asset_reader(root, stop, bad_file):
    from tdq.assets import verify

    while not stop.is_set():
        reason = verify(["test_asset"], cache_dir=root)["test_asset"]
        if reason is not None and "does not exist" not in reason:  # a torn or foreign file seen by a reader
            with open(bad_file, "a") as f:
                f.write(reason + "\n")


@pytest.fixture
def test_asset(tmp_path, monkeypatch):
    """A 4 MB asset served from a file:// URL; every download is logged and takes 0.3 s (a race window)."""
    import hashlib
    import urllib.request

    from tdq.assets import registry

    src = tmp_path / "source.bin"
    src.write_bytes(os.urandom(4 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    package = registry.PackageSpec("none==0", "none.whl", "0" * 64)
    spec = registry.AssetSpec(
        "test_asset",
        "test_asset.bin",
        digest,
        "file",
        package,
        "x",
        digest,
        url=src.as_uri(),
        url_kind="file",
    )
    monkeypatch.setitem(registry.ASSETS, "test_asset", spec)
    log, real = tmp_path / "downloads.log", urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tmp_path / "assets", log


def test_two_processes_fetching_one_asset_download_it_once_and_readers_never_see_half(tmp_path, test_asset):
    from tdq.assets import verify

    root, log = test_asset
    bad = tmp_path / "bad.log"
    for force in (False, True):  # into an empty cache, then both re-fetching over a good file
        barrier, stop = CTX.Barrier(2), CTX.Event()
        reader = CTX.Process(target=_asset_reader, args=(root, stop, bad))
        reader.start()
        procs = [CTX.Process(target=_asset_fetcher, args=(root, barrier, force)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        stop.set()
        reader.join(20)
        downloads = log.read_text().split()
        # the second process waits for the first and finds its verified file (with force=True it fetches again,
        # after the first has finished)
        assert len(downloads) == (1 if not force else 3), downloads
        assert verify(["test_asset"], cache_dir=root) == {"test_asset": None}
        assert not bad.exists(), bad.read_text()
    assert sorted(p.name for p in root.iterdir()) == [".lock", "test_asset.bin"]


def _write_then_die(path):
    from safetensors.torch import save_file

    from tdq.utils.io import atomic_write

    def write(tmp):
        save_file({"x": torch.zeros(4)}, tmp)  # safetensors stages `.tmpXXXXXX` beside `tmp`, then renames it
        (Path(tmp).parent / ".tmpWriterOwn").write_bytes(
            b"half"
        )  # a writer's own temporary, as a kill leaves it
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(path, write)


def test_killed_atomic_write_leaves_only_removable_temporaries(tmp_path):
    """A writer killed inside `atomic_write` leaves its temporaries (its own and those safetensors stages beside the
    path it writes) only inside one `.<name>.*.tmp` folder, which `remove_temporaries` clears."""
    from tdq.utils.io import remove_temporaries

    (tmp_path / "keep.txt").write_text("kept")
    proc = CTX.Process(target=_write_then_die, args=(tmp_path / "state.safetensors",))
    proc.start()
    proc.join(20)
    assert proc.exitcode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[1] == "keep.txt" and left[0].startswith(".state.safetensors.")
    assert left[0].endswith(".tmp") and (tmp_path / left[0]).is_dir()
    remove_temporaries(tmp_path, ".state.safetensors.*.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
