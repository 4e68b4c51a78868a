"""The safetensors layout of optd's state export (GET/PUT
/v1/sessions/{name}/state): an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw
little-endian data.  The header's "__metadata__" maps strings to strings.

Tensors are handed around as (dtype, shape, bytes) with dtype "F32" or
"F64"; NumPy and torch are left to the caller.
"""

import json
import struct
from typing import Any, Dict, List, Tuple

#: bytes per element of each dtype optd exports
ITEMSIZE = {"F32": 4, "F64": 8}
#: a header longer than this is refused when reading (100 MB, as safetensors)
MAX_HEADER = 100 * 1000 * 1000

Tensor = Tuple[str, List[int], bytes]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def dumps(tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> bytes:
    """The file for tensors (name -> (dtype, shape, data)) and metadata,
    tensors laid out in the order given."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks = []
    off = 0
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in ITEMSIZE:
            raise ValueError("tensor %s: dtype %r is not F32 or F64" % (name, dtype))
        if len(data) != _numel(shape) * ITEMSIZE[dtype]:
            raise ValueError("tensor %s: %d bytes for shape %r of %s"
                             % (name, len(data), list(shape), dtype))
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [off, off + len(data)]}
        chunks.append(data)
        off += len(data)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * (-len(text) % 8)       # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def loads(data: bytes) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """(tensors, metadata) of a file; tensors keep the file's order.
    Raises ValueError for anything that is not a well-formed file."""
    if len(data) < 8:
        raise ValueError("state file of %d bytes has no header length" % len(data))
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER or 8 + n > len(data):
        raise ValueError("state file header length %d does not fit its %d bytes"
                         % (n, len(data)))
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except ValueError as exc:
        raise ValueError("state file header is not JSON: %s" % exc) from None
    if not isinstance(header, dict):
        raise ValueError("state file header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("state file entry %r is malformed" % name) from None
        if dtype not in ITEMSIZE:
            raise ValueError("tensor %s: dtype %r is not F32 or F64" % (name, dtype))
        if not 0 <= begin <= end <= len(body) or end - begin != _numel(shape) * ITEMSIZE[dtype]:
            raise ValueError("tensor %s: byte range %d-%d does not hold shape %r of %s"
                             % (name, begin, end, shape, dtype))
        tensors[name] = (dtype, shape, bytes(body[begin:end]))
    return tensors, metadata
