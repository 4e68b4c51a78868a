"""The 16-bit wire forms: bfloat16 and float16 (IEEE binary16).

A gradient narrowed here travels in half the bytes of float32; the daemon
widens it exactly to the session's dtype.  Params can come back the same
way.  The rounding is the daemon's (optim/vec.c): values are first rounded
to float32 (a float64 vector included), then to 16 bits, to nearest with
ties to even; NaN stays a quiet NaN (sign and top payload bits kept);
values beyond float16's range become Inf.  Widening is exact.

Each conversion exists twice: on plain ints (one float32 bit pattern at a
time, used without NumPy) and on NumPy arrays.  Both give the same bits.
"""

import array
import struct
import sys

from . import _vec

try:
    import numpy as _np
except ImportError:
    _np = None

WIRES = ("bfloat16", "float16")

#: The request header naming the form a binary answer's params come in.
PARAMS_DTYPE = "Optd-Params-Dtype"

_BIG_ENDIAN = sys.byteorder == "big"


def check_wire(wire):
    """None (the session's own dtype) or one of WIRES."""
    if wire is not None and wire not in WIRES:
        raise ValueError("wire must be None, 'bfloat16' or 'float16', not %r" % (wire,))
    return wire


# ------------------------------------------------ one value, as bit patterns

def f32_to_bf16(u):
    """float32 bits -> bfloat16 bits (round to nearest even)."""
    if (u & 0x7FFFFFFF) > 0x7F800000:            # NaN: keep it, make it quiet
        return ((u >> 16) | 0x0040) & 0xFFFF
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFFFFFF
    return u >> 16


def bf16_to_f32(h):
    """bfloat16 bits -> float32 bits (exact)."""
    return (h & 0xFFFF) << 16


def f32_to_f16(u):
    """float32 bits -> float16 bits (round to nearest even, subnormals,
    overflow to Inf, NaN quiet)."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00 | ((a >> 13) & 0x3FF)
    if a >= 0x477FF000:                          # rounds to 65520 or more
        return sign | 0x7C00
    if a < 0x38800000:                           # below 2^-14: subnormal or zero
        e = a >> 23
        if e < 102:                              # below 2^-25 (or a float32 subnormal): 0
            return sign
        sig = (a & 0x7FFFFF) | 0x800000
        shift = 126 - e                          # value * 2^24 = sig >> shift
        q = sig >> shift
        r = sig & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if r > half or (r == half and (q & 1)):
            q += 1
        return sign | q
    h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FF)
    rem = a & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1)):
        h += 1                                   # a carry into the exponent is right
    return sign | h


def f16_to_f32(h):
    """float16 bits -> float32 bits (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        if m == 0:
            return sign
        e = 113                                  # normalise the subnormal
        while not m & 0x400:
            m <<= 1
            e -= 1
        return sign | (e << 23) | ((m & 0x3FF) << 13)
    if e == 31:
        return sign | 0x7F800000 | (m << 13)
    return sign | ((e + 112) << 23) | (m << 13)


_NARROW = {"bfloat16": f32_to_bf16, "float16": f32_to_f16}
_WIDEN = {"bfloat16": bf16_to_f32, "float16": f16_to_f32}


# ------------------------------------------------------------ NumPy arrays

def _np_f32_bits(v):
    """v (any float array) rounded to float32, as uint32 bit patterns
    (values past float32's range become Inf, as a cast does)."""
    with _np.errstate(over="ignore", invalid="ignore"):
        a = _np.ascontiguousarray(_np.asarray(v).reshape(-1), dtype=_np.float32)
    return a.view(_np.uint32)


def _np_narrow_bf16(u):
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(_np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x0040).astype(_np.uint16)
    return r


def _np_narrow_f16(u):
    # NumPy's float32 -> float16 cast rounds to nearest even with
    # subnormals and overflow to Inf; NaNs are set the daemon's way.
    with _np.errstate(over="ignore", invalid="ignore"):
        h = u.view(_np.float32).astype(_np.float16).view(_np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        n = u[nan]
        h[nan] = (((n >> 16) & 0x8000) | 0x7E00 | ((n >> 13) & 0x3FF)).astype(_np.uint16)
    return h


# ------------------------------------------------------------ vectors

def narrow(v, wire, use_numpy=True):
    """The little-endian wire body of v (floats of any kind) in wire."""
    if _vec._is_ndarray_like(v) or (use_numpy and _np is not None
                                    and not isinstance(v, array.array)):
        u = _np_f32_bits(v)
        h = _np_narrow_bf16(u) if wire == "bfloat16" else _np_narrow_f16(u)
        return h.astype("<u2").tobytes()
    f32 = v if isinstance(v, array.array) and v.typecode == "f" else \
        array.array("f", (float(x) for x in v))
    u = array.array("I")
    u.frombytes(f32.tobytes())
    fn = _NARROW[wire]
    out = array.array("H", (fn(x) for x in u))
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tobytes()


def widen(data, wire, dtype, use_numpy):
    """A new vector of dtype ("float32" / "float64") from a wire body."""
    if len(data) % 2:
        raise ValueError("binary body of %d bytes is not a whole number of %s"
                         % (len(data), wire))
    if use_numpy and _np is not None:
        h = _np.frombuffer(data, dtype="<u2").astype(_np.uint32)
        if wire == "bfloat16":
            f = (h << 16).view(_np.float32)
        else:
            f = h.astype(_np.uint16).view(_np.float16).astype(_np.float32)
            nan = (h & 0x7C00) == 0x7C00
            nan &= (h & 0x3FF) != 0
            if nan.any():  # NaN payloads exactly as the daemon widens them
                hn = h[nan]
                f[nan] = (((hn & 0x8000) << 16) | 0x7F800000 | ((hn & 0x3FF) << 13)).view(
                    _np.float32)
        return f.astype(_vec.DTYPES[dtype][0])
    h = array.array("H")
    h.frombytes(data)
    if _BIG_ENDIAN:
        h.byteswap()
    fn = _WIDEN[wire]
    u = array.array("I", (fn(x) for x in h))
    f32 = array.array("f")
    f32.frombytes(u.tobytes())
    return f32 if dtype == "float32" else array.array("d", f32)


def round_trip(v, wire, dtype="float32", use_numpy=True):
    """v as it arrives after a trip through wire: narrowed, then widened."""
    return widen(narrow(v, wire), wire, dtype, use_numpy)


def float_bits(x):
    """A Python float's float32 bit pattern (rounded to float32 first)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]
