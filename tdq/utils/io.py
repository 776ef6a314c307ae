"""File and value helpers shared by every layer: sha256, atomic writes, JSON-safe values, JSON sidecars.

Each helper exists once, here; the saved-state, profile, schedule, reference-cache, report and asset code call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_dir",
    "file_lock",
    "json_safe",
    "read_json_object",
    "remove_temporaries",
    "sha256_bytes",
    "sha256_file",
]


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


def sha256_bytes(data: bytes) -> str:
    """sha256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, mode: int | None = None) -> None:
    """
    Write `path` through a temporary file in the same directory, then rename, so readers never see half a file.

    The temporary file lies in a private temporary directory (`.<name>.<random>.tmp/`), so that writers which
    stage their own temporaries beside the path they are given (safetensors' `save_file` writes `.tmpXXXXXX` and
    renames it) leave nothing outside it when killed; `remove_temporaries` clears what killed writes left.

    Args:
        path (`str` or `os.PathLike`): the destination; its parent directory is created.
        write (`Callable[[str], Any]`): writes the content to the temporary path it is given.
        mode (`int`, *optional*): file mode to set before the rename (e.g. `0o644`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(
        tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{uuid.uuid4().hex[:8]}.", suffix=".tmp")
    )
    tmp = str(tmp_dir / path.name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_temporaries(directory: str | os.PathLike, pattern: str = ".*.tmp") -> None:
    """
    Remove the temporaries (files or directories) that killed `atomic_write`s left in `directory`. Call it only
    where no writer can be running (under the folder's lock, or right after this process's own write).

    Args:
        directory (`str` or `os.PathLike`): the folder.
        pattern (`str`, *optional*, defaults to `".*.tmp"`): glob of the temporaries' names.
    """
    for tmp in Path(directory).glob(pattern):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """
    Hold an exclusive advisory lock (`fcntl.flock`) on `path` (created if needed) for the `with` block, so that
    processes sharing a folder serialise their read-modify-write updates. A no-op where `fcntl` is unavailable.

    Args:
        path (`str` or `os.PathLike`): the lock file.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write `data` to `path` (see `atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, *, mode: int | None = 0o644) -> None:
    """Atomically copy the file `src` to `dst` (see `atomic_write`)."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), mode=mode)


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """
    Write the directory `path` through a temporary sibling directory, then swap it in, so readers see either the
    old directory or the complete new one (an existing `path` is replaced).

    Args:
        path (`str` or `os.PathLike`): the destination directory; its parent is created.
        write (`Callable[[pathlib.Path], Any]`): fills the (existing, empty) temporary directory it is given.

    Returns:
        `pathlib.Path`: `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.parent / f".tmp_{path.name}", path.parent / f".old_{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def json_safe(obj: Any, *, exact_floats: bool = False) -> Any:
    """Convert a value to strict-JSON-compatible Python objects.

    Tensors and numpy arrays become (nested) lists or scalars, paths become strings, dict keys are stringified,
    objects with `to_dict()` are converted through it.

    Args:
        obj (`Any`): the value.
        exact_floats (`bool`, *optional*, defaults to `False`):
            If `False`, NaN becomes `None` and ``±inf`` the strings ``"inf"`` / ``"-inf"``; if `True`, every float
            becomes its exact `repr` string (for cache keys that must not depend on float printing).

    Returns:
        `Any`: a value that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        obj = obj.item() if obj.ndim == 0 else obj.tolist()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        if exact_floats:
            return repr(obj)
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, exact_floats=exact_floats) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [json_safe(v, exact_floats=exact_floats) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict(), exact_floats=exact_floats)
    return str(obj)


def read_json_object(
    path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "JSON file"
) -> dict:
    """
    Read a JSON file that must hold one object. A missing file raises `FileNotFoundError`; an unreadable, invalid
    or non-object file raises `error`; every message names `what` and the file.

    Args:
        path (`str` or `os.PathLike`): the file.
        error (`type[Exception]`, *optional*, defaults to `ValueError`): the exception type for bad content.
        what (`str`, *optional*): what the file is, for the message (e.g. `"precision schedule file"`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(path)!r} is corrupted: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {str(path)!r} is corrupted: expected a JSON object, found {type(data).__name__}")
    return data
