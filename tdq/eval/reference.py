"""On-disk cache of the full-precision reference: FP samples (and trajectories) and their features.

An entry is a folder ``<cache_dir>/<key[:2]>/<key>/`` holding safetensors files and a JSON ``manifest.json``. The
key is the sha256 of a canonical JSON *spec*: for samples the model fingerprint (sha256 of the denoiser's class,
config and float state dict), the scheduler class and config, step count, eta, guidance, seeds, sample shape, batch
size, device type, dtype and torch version (see [`reference_spec`]); a change of any of them is another entry.
Features are files of the same entry, one per feature-extractor id (name plus a fingerprint of its weights).

Integrity: the manifest records every file's size and sha256, and the tensors' shapes and dtypes. A missing,
truncated or altered file, a manifest that does not parse or does not match the spec, or tensors of the wrong
shape make the read fail with a reason; the entry (or the feature file) is then deleted and recomputed, never used.
Every file is written to a temporary name and renamed into place (atomic on POSIX), data files before the manifest,
so a crash leaves either the old entry, or data without a manifest record (a miss). Writers (and the deletion of
invalid entries) hold an exclusive lock on ``<cache_dir>/.lock``, so processes sharing the cache do not lose each
other's manifest records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdq.sampling import DiffusionSampler, SampleResult
from tdq.utils.io import atomic_write_bytes, file_lock, json_safe, remove_temporaries, sha256_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "CacheInfo",
    "ReferenceCache",
    "cached_features",
    "cached_samples",
    "feature_id",
    "model_fingerprint",
    "reference_spec",
    "scheduler_fingerprint",
    "state_dict_fingerprint",
]

#: Default location of the reference cache (override with `eval.cache_dir` / `ReferenceCache(root)`).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tdq" / "reference"
SCHEMA_VERSION = 1
_MANIFEST = "manifest.json"
_LOCK = ".lock"


# ----------------------------------------------------------------------------------------------------
# fingerprints


def _key_value(value: Any) -> Any:
    """A cache-key form of `value`: JSON-safe with exact float reprs, private (`_`-prefixed) config keys dropped."""
    if isinstance(value, Mapping):
        value = {k: v for k, v in value.items() if not str(k).startswith("_")}
    return json_safe(value, exact_floats=True)


def state_dict_fingerprint(state: Mapping[str, torch.Tensor], skip: str | None = "_quantizer.") -> str:
    r"""
    sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name).

    Args:
        state (`Mapping[str, torch.Tensor]`): e.g. `model.state_dict()`.
        skip (`str`, *optional*, defaults to `"_quantizer."`): leave out entries whose name contains this
            (tdq's quantizer buffers), so a quantized model fingerprints like its float model.

    Returns:
        `str`: hex digest.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        if skip and skip in name:
            continue
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        t = t.cpu().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    r"""
    Identity of a denoiser: sha256 of its class, its diffusers `config` (when it has one) and its float
    state dict (quantizer buffers left out).

    Compute it on the float model (before `tdq.quantize_`, or any time: quantizer buffers are ignored and
    `QuantLinear`/`QuantConv2d` keep the float weights under the same names).

    Args:
        model (`nn.Module`): the denoiser.

    Returns:
        `str`: hex digest.
    """
    head = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _key_value(dict(getattr(model, "config", {}) or {})),
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    h.update(state_dict_fingerprint(model.state_dict()).encode())
    return h.hexdigest()


def scheduler_fingerprint(scheduler: Any) -> dict[str, Any]:
    r"""
    The class and config of a diffusers scheduler, as JSON-safe data.

    Args:
        scheduler (`SchedulerMixin`): the scheduler.

    Returns:
        `dict`: ``{"class": ..., "config": {...}}`` (private ``_``-keys dropped).
    """
    return {"class": type(scheduler).__name__, "config": _key_value(dict(getattr(scheduler, "config", {})))}


def feature_id(name: str, module: nn.Module) -> str:
    r"""
    Identifier of a feature extractor for cache keys: `name` plus the first 16 hex digits of the sha256 of its
    state dict (so other weights give other cached features).

    Args:
        name (`str`): e.g. ``"inception_v3_tf_pool3"``.
        module (`nn.Module`): the extractor.

    Returns:
        `str`: e.g. ``"inception_v3_tf_pool3@3f1c..."``.
    """
    return f"{name}@{state_dict_fingerprint(module.state_dict(), skip=None)[:16]}"


def reference_spec(
    model: nn.Module | str,
    sampler: DiffusionSampler,
    seeds: Sequence[int],
    *,
    guidance_scale: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    r"""
    The cache spec of FP samples drawn by `sampler` for `seeds`.

    Args:
        model (`nn.Module` or `str`): the FP denoiser, or its [`model_fingerprint`].
        sampler (`DiffusionSampler`): gives scheduler, steps, eta, batch size, sample shape, device, trajectory flag.
        seeds (`Sequence[int]`): the seeds, in order.
        guidance_scale (`float`, *optional*): classifier-free guidance scale (conditional pipelines).
        extra (`Mapping[str, Any]`, *optional*): anything else that changes the samples (prompts, class labels).

    Returns:
        `dict`: JSON-safe; [`ReferenceCache.key`] hashes it.
    """
    return {
        "kind": "samples",
        "schema": SCHEMA_VERSION,
        "model": model if isinstance(model, str) else model_fingerprint(model),
        "scheduler": scheduler_fingerprint(sampler.scheduler),
        "num_inference_steps": int(sampler.num_inference_steps),
        "eta": repr(float(sampler.eta)),
        "guidance_scale": None if guidance_scale is None else repr(float(guidance_scale)),
        "seeds": [int(s) for s in seeds],
        "sample_shape": [int(s) for s in sampler.sample_shape],
        # batch composition and device change the last float bits of a sample
        "batch_size": int(sampler.batch_size),
        "device_type": sampler.device.type,
        "dtype": str(next(iter(sampler.denoiser.parameters())).dtype),
        "torch": torch.__version__.split("+")[0],
        "trajectory": bool(sampler.record_trajectory),
        "extra": _key_value(dict(extra or {})),
    }


# ----------------------------------------------------------------------------------------------------
# the cache


class CacheError(Exception):
    """A cache entry that cannot be used (the message says why)."""


@dataclass
class CacheInfo:
    r"""
    What a cache lookup did.

    Args:
        status (`str`): ``"hit"``, ``"miss"`` (absent), ``"invalid"`` (present but unusable: recomputed) or
            ``"disabled"``.
        key (`str`): the entry key.
        path (`str`): the entry folder.
        reason (`str`, *optional*): why an entry was invalid.
    """

    status: str
    key: str = ""
    path: str = ""
    reason: str | None = None

    @property
    def hit(self) -> bool:
        """Whether the cached data was used."""
        return self.status == "hit"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for reports."""
        d = {"status": self.status, "key": self.key, "path": self.path}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class ReferenceCache:
    r"""
    A folder of verified safetensors entries keyed by the sha256 of a JSON spec.

    Args:
        root (`str` or `os.PathLike`, *optional*): the folder (default ``~/.cache/tdq/reference``).
    """

    root: Path = field(default_factory=lambda: DEFAULT_CACHE_DIR)

    def __post_init__(self) -> None:
        self.root = Path(os.path.expanduser(str(self.root))) if self.root is not None else DEFAULT_CACHE_DIR

    @staticmethod
    def key(spec: Mapping[str, Any]) -> str:
        """sha256 of the canonical JSON of `spec`."""
        return sha256_bytes(json.dumps(_key_value(spec), sort_keys=True, separators=(",", ":")).encode())

    def entry_dir(self, spec: Mapping[str, Any]) -> Path:
        """The folder of `spec`'s entry."""
        key = self.key(spec)
        return self.root / key[:2] / key

    # -- manifest -------------------------------------------------------------------------------------------
    def _read_manifest(self, spec: Mapping[str, Any]) -> dict[str, Any] | None:
        path = self.entry_dir(spec) / _MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"unreadable manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
            raise CacheError("manifest has another schema")
        if manifest.get("key") != self.key(spec) or manifest.get("spec") != _key_value(spec):
            raise CacheError("manifest does not match the spec")
        if not isinstance(manifest.get("files"), dict):
            raise CacheError("manifest lists no files")
        return manifest

    def _write_manifest(self, spec: Mapping[str, Any], files: dict[str, Any]) -> None:
        manifest = {"schema": SCHEMA_VERSION, "key": self.key(spec), "spec": _key_value(spec), "files": files}
        atomic_write_bytes(self.entry_dir(spec) / _MANIFEST, json.dumps(manifest, indent=1).encode())

    # -- tensors --------------------------------------------------------------------------------------------
    @staticmethod
    def _file_name(name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.@=-]+", name) or name.startswith("."):
            raise ValueError(f"invalid cache file name {name!r}")
        return f"{name}.safetensors"

    def read(
        self,
        spec: Mapping[str, Any],
        name: str,
        expected: Mapping[str, Sequence[int] | None] | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, CacheInfo]:
        r"""
        Read and verify the tensors file `name` of `spec`'s entry.

        An invalid file is deleted (the whole entry when the manifest is bad) and reported as ``"invalid"``.

        Args:
            spec (`Mapping[str, Any]`): the entry spec.
            name (`str`): file name inside the entry (without extension).
            expected (`Mapping[str, Sequence[int] | None]`, *optional*): tensor names that must be present, with
                their shapes (`None`: any shape).

        Returns:
            `tuple`: the tensors (or `None`) and a [`CacheInfo`].
        """
        # under the writers' lock: a file is never checked against the manifest record of another write
        with file_lock(self.root / _LOCK):
            return self._read_locked(spec, name, expected)

    def _read_locked(self, spec, name, expected) -> tuple[dict[str, torch.Tensor] | None, CacheInfo]:
        from safetensors.torch import load

        key, folder = self.key(spec), self.entry_dir(spec)
        info = CacheInfo("miss", key, str(folder))
        try:
            manifest = self._read_manifest(spec)
        except CacheError as e:
            self._discard(folder, None, str(e), locked=True)
            return None, CacheInfo("invalid", key, str(folder), str(e))
        if manifest is None or name not in manifest["files"]:
            return None, info
        record = manifest["files"][name]
        path = folder / self._file_name(name)
        try:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise CacheError(f"{path.name}: missing ({e.__class__.__name__})") from e
            if len(data) != record.get("size"):
                raise CacheError(f"{path.name}: size {len(data)} != {record.get('size')} (truncated?)")
            if sha256_bytes(data) != record.get("sha256"):
                raise CacheError(f"{path.name}: sha256 mismatch")
            try:
                tensors = load(data)
            except Exception as e:  # noqa: BLE001 - any parse error means a bad file
                raise CacheError(f"{path.name}: not a safetensors file ({e})") from e
            shapes = record.get("tensors", {})
            for tname, t in tensors.items():
                if shapes.get(tname) != {"shape": list(t.shape), "dtype": str(t.dtype)}:
                    raise CacheError(f"{path.name}: tensor {tname!r} does not match the manifest")
            for tname, shape in (expected or {}).items():
                if tname not in tensors:
                    raise CacheError(f"{path.name}: tensor {tname!r} is missing")
                if shape is not None and list(tensors[tname].shape) != list(shape):
                    raise CacheError(
                        f"{path.name}: tensor {tname!r} has shape {list(tensors[tname].shape)}, "
                        f"expected {list(shape)}"
                    )
        except CacheError as e:
            self._discard(folder, name, str(e), locked=True)
            return None, CacheInfo("invalid", key, str(folder), str(e))
        return tensors, CacheInfo("hit", key, str(folder))

    def write(self, spec: Mapping[str, Any], name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        r"""
        Write the tensors file `name` of `spec`'s entry atomically and record it in the manifest.

        Args:
            spec (`Mapping[str, Any]`): the entry spec.
            name (`str`): file name inside the entry (without extension).
            tensors (`Mapping[str, torch.Tensor]`): the tensors (stored contiguous, on the CPU).

        Returns:
            `pathlib.Path`: the written file.
        """
        from safetensors.torch import save

        folder = self.entry_dir(spec)
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        data = save(cpu, metadata={"tdq_cache_key": self.key(spec), "name": name})
        path = folder / self._file_name(name)
        # Processes sharing the cache serialise the data-then-manifest update of an entry, so none loses another's
        # manifest record or records a file another process has since replaced.
        with file_lock(self.root / _LOCK):
            atomic_write_bytes(path, data)
            try:
                manifest = self._read_manifest(spec) or {"files": {}}
            except CacheError:
                manifest = {"files": {}}
            files = dict(manifest["files"])
            files[name] = {
                "size": len(data),
                "sha256": sha256_bytes(data),
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in cpu.items()},
            }
            self._write_manifest(spec, files)
            # temporaries of writers killed mid-write (no writer holds the lock now): never read, removed
            remove_temporaries(folder)
        return path

    def _discard(self, folder: Path, name: str | None, reason: str, locked: bool = False) -> None:
        logger.warning("reference cache entry %s is invalid (%s): recomputing", folder, reason)
        if locked:
            self._discard_locked(folder, name)
            return
        with file_lock(self.root / _LOCK):
            self._discard_locked(folder, name)

    def _discard_locked(self, folder: Path, name: str | None) -> None:
        try:
            if name is None:
                shutil.rmtree(folder, ignore_errors=True)
                return
            (folder / self._file_name(name)).unlink(missing_ok=True)
            manifest = json.loads((folder / _MANIFEST).read_text())
            files = {k: v for k, v in manifest.get("files", {}).items() if k != name}
            manifest["files"] = files
            atomic_write_bytes(folder / _MANIFEST, json.dumps(manifest, indent=1).encode())
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# high level: samples and features through the cache, multi-process aware


def _is_main(state: Any) -> bool:
    return state is None or bool(state.is_main_process)


def cached_samples(
    sampler: DiffusionSampler,
    seeds: Sequence[int],
    spec: Mapping[str, Any],
    cache: ReferenceCache | None,
    state: Any = None,
    desc: str = "FP reference",
) -> tuple[SampleResult, CacheInfo]:
    r"""
    FP samples for `seeds` from the cache, or sampled (sharded over processes) and stored.

    Only the main process reads and writes the cache; its hit/miss decision is broadcast. On a hit, the images
    are broadcast to every process; the trajectory is loaded on the main process only (other processes get an
    empty trajectory).

    Args:
        sampler (`DiffusionSampler`): the FP sampler (the denoiser must compute in floating point).
        seeds (`Sequence[int]`): the seeds.
        spec (`Mapping[str, Any]`): from [`reference_spec`].
        cache (`ReferenceCache`, *optional*): `None` disables caching.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).
        desc (`str`, *optional*): progress-bar label.

    Returns:
        `tuple[SampleResult, CacheInfo]`
    """
    from tdq.eval.distributed import broadcast_flag, broadcast_tensor, distributed_sample

    seeds = [int(s) for s in seeds]
    n, shape = len(seeds), tuple(sampler.sample_shape)
    # Latent samplers also return final latents; their trajectory lives in latent space.
    latent = sampler.keeps_latents
    tshape = tuple(sampler.model_shape)
    steps = len(sampler.timesteps())
    with_traj = bool(spec.get("trajectory", sampler.record_trajectory))
    result, info = None, CacheInfo("disabled")
    if cache is not None and _is_main(state):
        expected: dict[str, Any] = {"images": [n, *shape], "timesteps": [steps]}
        if latent:
            expected["latents"] = [n, *tshape]
        if with_traj:
            expected["trajectory"] = [steps, n, *tshape]
        tensors, info = cache.read(spec, "samples", expected)
        if tensors is not None:
            result = SampleResult(
                images=tensors["images"],
                trajectory=list(tensors["trajectory"].unbind(0)) if with_traj else [],
                timesteps=[float(t) for t in tensors["timesteps"].tolist()],
                seeds=seeds,
                latents=tensors.get("latents"),
            )
    if cache is not None and broadcast_flag(result is not None, state):
        images = broadcast_tensor(
            None if result is None else result.images, (n, *shape), torch.float32, state
        )
        latents = None
        if latent:
            latents = broadcast_tensor(
                None if result is None else result.latents, (n, *tshape), torch.float32, state
            )
        if result is None:
            result = SampleResult(images=images, timesteps=sampler.timesteps(), seeds=seeds, latents=latents)
        return result, info
    result = distributed_sample(sampler, seeds, state, desc=desc)
    if cache is not None and _is_main(state):
        tensors = {"images": result.images, "timesteps": torch.tensor(result.timesteps, dtype=torch.float64)}
        if latent:
            tensors["latents"] = result.latents
        if with_traj:
            tensors["trajectory"] = torch.stack(result.trajectory)
        cache.write(spec, "samples", tensors)
    return result, info


def cached_features(
    images: torch.Tensor,
    extractor: nn.Module,
    extractor_id: str,
    spec: Mapping[str, Any],
    cache: ReferenceCache | None,
    state: Any = None,
    *,
    batch_size: int = 32,
) -> tuple[torch.Tensor, CacheInfo]:
    r"""
    Features of the images of `spec`'s entry from the cache, or extracted (sharded over processes) and stored.

    Args:
        images (`torch.Tensor` of shape `[N, C, H, W]`): the images `spec` describes (on every process).
        extractor (`nn.Module`): maps images to `[n, D]` features.
        extractor_id (`str`): from [`feature_id`].
        spec (`Mapping[str, Any]`): the entry spec of the images.
        cache (`ReferenceCache`, *optional*): `None` disables caching.
        state (`Accelerator` or `PartialState`, *optional*): the process group (`None`: one process).
        batch_size (`int`, *optional*, defaults to `32`): images per forward.

    Returns:
        `tuple[torch.Tensor, CacheInfo]`: float64 `[N, D]` features (on every process) and the lookup result.
    """
    from tdq.eval.distributed import broadcast_flag, broadcast_tensor, distributed_extract_features

    name = "features-" + re.sub(r"[^A-Za-z0-9_.@=-]", "_", extractor_id)
    n = images.shape[0]
    feats, info = None, CacheInfo("disabled")
    if cache is not None and _is_main(state):
        tensors, info = cache.read(spec, name, {"features": None})
        if tensors is not None and (tensors["features"].ndim != 2 or tensors["features"].shape[0] != n):
            cache._discard(cache.entry_dir(spec), name, "features have the wrong row count")
            tensors, info = (
                None,
                CacheInfo("invalid", info.key, info.path, "features have the wrong row count"),
            )
        feats = None if tensors is None else tensors["features"].double()
    if cache is not None and broadcast_flag(feats is not None, state):
        dim = broadcast_tensor(
            None if feats is None else torch.tensor([feats.shape[1]]), (1,), torch.long, state
        )
        feats = broadcast_tensor(feats, (n, int(dim.item())), torch.float64, state)
        return feats, info
    feats = distributed_extract_features(images, extractor, state, batch_size=batch_size)
    if cache is not None and _is_main(state):
        cache.write(spec, name, {"features": feats})
    return feats, info
