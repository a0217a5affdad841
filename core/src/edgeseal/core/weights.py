"""The ``weights`` section: raw tensors, aligned, with an index. Pure. Stable API.

Layout (all inside the sealed section, so names and shapes are as secret as values)::

    0   4   magic "ESW1"
    4   4   index length N (big-endian)
    8   N   index: canonical JSON {"alignment": 64, "tensors": [{"name", "dtype",
            "shape", "offset", "nbytes"}, ...]}
    ..      zero padding; every tensor's bytes start at a multiple of 64 from the
            section start and hold the tensor in C order, little-endian

The agent decrypts the section into one locked buffer and hands each tensor to the
runtime as a view of that buffer, so the weights exist once in the process.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from edgeseal.core.encoding import canonical_json, parse_json_object
from edgeseal.core.errors import MalformedBundleError

__all__ = [
    "ALIGNMENT",
    "DTYPE_SIZES",
    "PLACEHOLDER_DIR",
    "PLACEHOLDER_LOCATION",
    "TensorEntry",
    "build_weights_section",
    "parse_weights_index",
]

MAGIC = b"ESW1"
#: In the ``graph`` section, an initializer whose data moved to the weights section keeps
#: its name, type and shape and points its external data at ``/dev/null`` (location
#: "null" under the folder "/dev"). The agent supplies the data from memory before ONNX
#: Runtime would ever read it; nothing is read from, or written to, any file.
PLACEHOLDER_DIR = "/dev"
PLACEHOLDER_LOCATION = "null"
ALIGNMENT = 64
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_RANK = 16
DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def build_weights_section(tensors: Iterable[tuple[str, str, tuple[int, ...], bytes]]) -> bytearray:
    """Lay out ``(name, dtype, shape, little-endian C-order bytes)`` tensors."""
    items = list(tensors)
    entries: list[dict[str, object]] = []
    # Offsets depend on the index length, which depends on the offsets' digits: settle it.
    base = 0
    for _ in range(8):
        entries, offset = [], base
        for name, dtype, shape, raw in items:
            if dtype not in DTYPE_SIZES:
                raise ValueError(f"tensor {name}: unsupported dtype {dtype}")
            if len(raw) != math.prod(shape) * DTYPE_SIZES[dtype]:
                raise ValueError(f"tensor {name}: {len(raw)} bytes do not match its shape")
            entries.append(
                {
                    "name": name,
                    "dtype": dtype,
                    "shape": list(shape),
                    "offset": offset,
                    "nbytes": len(raw),
                }
            )
            offset = _align(offset + len(raw))
        index = canonical_json({"alignment": ALIGNMENT, "tensors": entries})
        needed = _align(8 + len(index))
        if needed == base:
            break
        base = needed
    total = max(base, offset)
    out = bytearray(total)
    out[0:8] = MAGIC + struct.pack(">I", len(index))
    out[8 : 8 + len(index)] = index
    for (_, _, _, raw), entry in zip(items, entries, strict=False):
        start = int(entry["offset"])  # type: ignore[call-overload]
        out[start : start + len(raw)] = raw
    return out


def parse_weights_index(section: memoryview) -> list[TensorEntry]:
    """Read and check the index of a decrypted weights section."""
    if len(section) < 8 or bytes(section[:4]) != MAGIC:
        raise MalformedBundleError("weights section has no valid header")
    (n,) = struct.unpack(">I", section[4:8])
    if n > min(MAX_INDEX_BYTES, len(section) - 8):
        raise MalformedBundleError("weights index length is out of bounds")
    try:
        index = parse_json_object(bytes(section[8 : 8 + n]), "weights index")
        raw_entries = index["tensors"]
        if index.get("alignment") != ALIGNMENT or not isinstance(raw_entries, list):
            raise ValueError("bad alignment or tensor list")
        if len(raw_entries) > MAX_TENSORS:
            raise ValueError("too many tensors")
        entries = []
        floor = _align(8 + n)
        for e in raw_entries:
            shape = tuple(e["shape"])
            dtype, offset, nbytes, name = e["dtype"], e["offset"], e["nbytes"], e["name"]
            if not isinstance(name, str) or dtype not in DTYPE_SIZES or len(shape) > MAX_RANK:
                raise ValueError("bad tensor name, dtype or rank")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name}: bad shape")
            if not isinstance(offset, int) or offset % ALIGNMENT or offset < floor:
                raise ValueError(f"tensor {name}: bad offset")
            if nbytes != math.prod(shape) * DTYPE_SIZES[dtype] or offset + nbytes > len(section):
                raise ValueError(f"tensor {name}: size out of bounds")
            entries.append(TensorEntry(name, dtype, shape, offset, nbytes))
            floor = offset + nbytes
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedBundleError(f"weights index is invalid: {e}") from e
    return entries
