"""Restricted unpickling: numpy arrays, numpy dtypes and builtin containers only, never arbitrary globals."""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["restricted_unpickle"]


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
