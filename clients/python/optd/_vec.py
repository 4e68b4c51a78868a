"""Vectors in a session's dtype: NumPy arrays when NumPy is importable,
``array.array`` otherwise, and their two wire forms (raw little-endian bytes
and JSON lists of numbers).

Every value is rounded to the session dtype on the client side before it is
sent, whichever the wire form, so the JSON and binary paths hand the daemon
the very same numbers.
"""

import array
import math
import sys

from typing import Any, Optional

_np: Optional[Any] = None
try:
    import numpy as _numpy
    _np = _numpy
except ImportError:  # the client works without NumPy, on array.array
    pass

DTYPES = {
    # name: (array.array typecode, bytes per element, NumPy little-endian dtype)
    "float32": ("f", 4, "<f4"),
    "float64": ("d", 8, "<f8"),
}

_BIG_ENDIAN = sys.byteorder == "big"


def numpy_available():
    return _np is not None


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError("dtype must be float32 or float64, not %r" % (dtype,))
    return dtype


def _is_ndarray_like(v):
    return _np is not None and (isinstance(v, _np.ndarray) or hasattr(v, "__array__"))


class Codec:
    """Converts vectors for one dtype; use_numpy picks the type handed back."""

    def __init__(self, dtype, use_numpy=True):
        self.dtype = check_dtype(dtype)
        self.code, self.itemsize, self.np_dtype = DTYPES[dtype]
        self.use_numpy = bool(use_numpy) and _np is not None

    # ---------------------------------------------------------- inputs

    def _as_array(self, v):
        """v as a flat array.array of this dtype (native byte order)."""
        if isinstance(v, array.array) and v.typecode == self.code:
            return v
        if _is_ndarray_like(v):
            return array.array(self.code, self._as_ndarray(v).astype(self.code).tobytes())
        return array.array(self.code, (float(x) for x in v))

    def _as_ndarray(self, v):
        """v as a flat, contiguous little-endian NumPy array of this dtype."""
        a = _np.asarray(v)
        if a.ndim != 1:
            a = a.reshape(-1)
        return _np.ascontiguousarray(a, dtype=self.np_dtype)

    def to_bytes(self, v):
        """The raw little-endian body for v."""
        if _is_ndarray_like(v) or (self.use_numpy and not isinstance(v, array.array)):
            return self._as_ndarray(v).tobytes()
        a = self._as_array(v)
        if _BIG_ENDIAN:
            a = array.array(self.code, a)
            a.byteswap()
        return a.tobytes()

    def to_list(self, v):
        """v as Python floats, each already rounded to this dtype.  repr() of
        those doubles reads back exactly, so the JSON text is lossless."""
        if _is_ndarray_like(v):
            return self._as_ndarray(v).tolist()
        return self._as_array(v).tolist()

    def length(self, v):
        if _is_ndarray_like(v):
            return int(_np.asarray(v).size)
        return len(v)

    def finite(self, v):
        """True when every element is finite (after rounding to the dtype)."""
        if _is_ndarray_like(v):
            return bool(_np.isfinite(self._as_ndarray(v)).all())
        return all(math.isfinite(x) for x in self._as_array(v))

    # --------------------------------------------------------- outputs

    def from_bytes(self, data):
        """A new, writable vector from a raw little-endian body."""
        if len(data) % self.itemsize:
            raise ValueError("binary body of %d bytes is not a whole number of %s"
                             % (len(data), self.dtype))
        if self.use_numpy:
            return _np.frombuffer(data, dtype=self.np_dtype).astype(self.code)
        a = array.array(self.code)
        a.frombytes(data)
        if _BIG_ENDIAN:
            a.byteswap()
        return a

    def from_list(self, values):
        if self.use_numpy:
            return _np.array(values, dtype=self.code)
        return array.array(self.code, values)
