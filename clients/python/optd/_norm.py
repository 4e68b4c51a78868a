"""The gradient norm exactly as the daemon computes it (docs/api.md, "The
exact norm"): blocks of 8192 elements cut per tensor, 16 lane sums in
float64 within a block, the lanes combined in a fixed tree, the blocks
combined in order, then sqrt for the 2-norm.  Every addition happens in that
order, so the result is the daemon's double bit for bit -- what a sharded
session sends in Optd-Grad-Norm so that each part clips as the whole vector
would.

NumPy vectorises it across blocks and lanes (one pass of 512 row additions
over every block at once); without NumPy a plain loop gives the same double,
slowly.
"""

import math
from typing import Any, Optional, Sequence

from . import _vec

#: Elements per block (optim/optim.h OPTIM_VEC_BLOCK).
BLOCK = 8192
#: Partial sums per block (OPTIM_VEC_LANES).
LANES = 16

_INF = float("inf")


def _norm_kind(norm_type):
    p = float(norm_type)
    if p == 2.0:
        return 2
    if p == 1.0:
        return 1
    if math.isinf(p) and p > 0:
        return 0
    raise ValueError("norm_type must be 1, 2 or inf, not %r" % (norm_type,))


def _segments(n, tensor_sizes, absent):
    """(start, length) of every present tensor, in order."""
    if tensor_sizes is None:
        sizes = [n]
    else:
        sizes = [int(s) for s in tensor_sizes]
    if sum(sizes) != n:
        raise ValueError("the tensors hold %d elements; grad has %d" % (sum(sizes), n))
    skip = set(int(a) for a in absent or ())
    out, off = [], 0
    for t, s in enumerate(sizes):
        if t not in skip and s > 0:
            out.append((off, s))
        off += s
    return out


def _combine_blocks(partials, kind):
    acc = 0.0
    if kind == 0:
        for x in partials:
            acc = x if (x != x or x > acc) else acc
        return acc
    for x in partials:
        acc = acc + x
    return math.sqrt(acc) if kind == 2 else acc


#: Blocks converted to float64 at a time (16 MiB of work space).
_CHUNK = 256


def _block_partials(np, x, kind):
    """x: float64 of shape (blocks, BLOCK), already squared / made absolute
    (whole blocks: a short block padded with zeros, which add nothing to a
    sum and lose to any |x| in a max, exactly like the C loop's lanes that
    a short block never reaches).  Each block's partial, as floats."""
    rows = x.reshape(x.shape[0], BLOCK // LANES, LANES)
    acc = np.zeros((x.shape[0], LANES), dtype=np.float64)
    if kind == 0:
        for r in range(BLOCK // LANES):
            np.maximum(acc, rows[:, r, :], out=acc)
        return acc.max(axis=1).tolist()
    for r in range(BLOCK // LANES):  # lane k: its elements in order
        np.add(acc, rows[:, r, :], out=acc)
    w = LANES // 2
    while w >= 1:  # lanes_sum: a[k] += a[k + w] for w = 8, 4, 2, 1
        acc = acc[:, :w] + acc[:, w:2 * w]
        w //= 2
    return acc[:, 0].tolist()


def _partials_numpy(np, g, segs, kind):
    """Every block's partial, in order, as a list of floats."""
    out = []

    def prepare(x):
        if kind == 2:
            np.multiply(x, x, out=x)
        else:
            np.abs(x, out=x)
        return x

    for start, size in segs:
        full = size // BLOCK
        for b in range(0, full, _CHUNK):
            nb = min(_CHUNK, full - b)
            lo = start + b * BLOCK
            x = g[lo:lo + nb * BLOCK].astype(np.float64).reshape(nb, BLOCK)
            out += _block_partials(np, prepare(x), kind)
        tail = size - full * BLOCK
        if tail:
            x = np.zeros((1, BLOCK), dtype=np.float64)
            x[0, :tail] = g[start + full * BLOCK:start + size]
            out += _block_partials(np, prepare(x), kind)
    return out


def _partials_python(g, segs, kind):
    out = []
    for start, size in segs:
        for b in range(0, size, BLOCK):
            n = min(BLOCK, size - b)
            a = [0.0] * LANES
            for i in range(n):
                x = float(g[start + b + i])
                k = i % LANES
                if kind == 2:
                    a[k] = a[k] + x * x
                elif kind == 1:
                    a[k] = a[k] + abs(x)
                else:
                    a[k] = abs(x) if abs(x) > a[k] else a[k]
            if kind == 0:
                out.append(max(a))
                continue
            w = LANES // 2
            while w >= 1:
                for k in range(w):
                    a[k] = a[k] + a[k + w]
                w //= 2
            out.append(a[0])
    return out


def grad_norm(grad: Any, dtype: str = "float32", tensor_sizes: Optional[Sequence[int]] = None,
              norm_type: float = 2.0, absent: Optional[Sequence[int]] = None,
              use_numpy: Optional[bool] = None) -> float:
    """The norm of grad (rounded to dtype first) as the daemon computes it
    for a session of that dtype with these tensors (their sizes, in order;
    None: one tensor) when the tensors listed in ``absent`` (indices) have
    no gradient -- grad then still holds the whole vector, absent tensors'
    elements included and ignored.  ``norm_type``: the session's
    clip.norm_type (1, 2 or inf).  Raises ValueError when grad is not
    finite: there is no norm to send then."""
    kind = _norm_kind(norm_type)
    np = _vec._np
    numpy = np is not None if use_numpy is None else bool(use_numpy)
    if numpy and np is None:
        raise ValueError("use_numpy=True but NumPy cannot be imported")
    codec = _vec.Codec(dtype, numpy)
    if numpy:
        assert np is not None
        g = codec._as_ndarray(grad)
        if not np.isfinite(g).all():
            raise ValueError("grad contains NaN or Inf")
        segs = _segments(g.size, tensor_sizes, absent)
        return _combine_blocks(_partials_numpy(np, g, segs, kind), kind)
    g = codec._as_array(grad)
    if not all(math.isfinite(x) for x in g):
        raise ValueError("grad contains NaN or Inf")
    segs = _segments(len(g), tensor_sizes, absent)
    return _combine_blocks(_partials_python(g, segs, kind), kind)
