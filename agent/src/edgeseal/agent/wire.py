"""The local API's wire format, shared by the agent's server (:mod:`edgeseal.agent.api`)
and the client apps import (:mod:`edgeseal.agent.client`). Stable: agents and clients of
different releases speak it to each other.

What travels over the socket besides HTTP/1.1 itself:

* tensor bodies: ``application/x-edgeseal-tensors`` (:func:`encode_tensors`,
  :func:`decode_tensors`), ``.npz`` (``application/x-npz``, the older encoding) and JSON
  ``{"inputs": {name: {dtype, shape, data}}}``, all read by :func:`decode_arrays`;
* error answers: JSON ``{"error": type, "message": text}`` (:func:`error_body`,
  :func:`read_error`).

This module imports numpy, the standard library and :mod:`edgeseal.core.errors` only, so
an application's client stays light: no runtimes, no key stores, no TPM code.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.errors import EdgesealError, InputTooLargeError

__all__ = [
    "JSON",
    "NPZ",
    "TENSORS",
    "BadRequestError",
    "decode_arrays",
    "decode_tensors",
    "encode_arrays",
    "encode_tensors",
    "error_body",
    "read_error",
]

NPZ = "application/x-npz"
JSON = "application/json"


class BadRequestError(EdgesealError):
    """The request body is not a valid encoding of arrays."""


#: The compact tensor body: a fixed header, a JSON index, raw little-endian arrays.
TENSORS = "application/x-edgeseal-tensors"
_TENSORS_MAGIC = b"EST1"
_MAX_INDEX_BYTES = 64 * 1024
_MAX_TENSORS = 256
_MAX_RANK = 16
_ALIGN = 64
#: dtypes a tensor body may carry (numeric and bool only: nothing that unpickles).
_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)


_NAMES = {np.dtype(n): n for n in _DTYPES}
_LE = {n: np.dtype(n).newbyteorder("<") for n in _DTYPES}
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=256)
def _layout(tensors: tuple[tuple[str, str, tuple[int, ...], int], ...]) -> tuple[bytes, ...]:
    """The index part and the zero padding after each tensor, for tensors given as
    (name, dtype, shape, nbytes): made once per layout (a caller sends the same
    shapes call after call)."""
    index: list[dict[str, Any]] = []
    pads: list[bytes] = []
    offset = 0
    for name, dtype, shape, size in tensors:
        index.append({"name": name, "dtype": dtype, "shape": shape, "offset": offset})
        end = offset + size
        pads.append(bytes(_aligned(end) - end))
        offset = _aligned(end)
    head = _COMPACT.encode({"tensors": index}).encode()
    start = _aligned(8 + len(head))
    return (
        _TENSORS_MAGIC + struct.pack("<I", len(head)) + head + bytes(start - 8 - len(head)),
        *pads,
    )


def encode_tensors(arrays: Mapping[str, npt.NDArray[Any]]) -> list[bytes | memoryview]:
    """The ``application/x-edgeseal-tensors`` body of ``arrays``, as parts to send with
    one ``sendmsg`` (an array's bytes are not copied when already C-ordered and
    little-endian).

    Layout::

        0   4   magic "EST1"
        4   4   index length N (little-endian u32)
        8   N   index: JSON {"tensors": [{"name", "dtype", "shape", "offset"}, ...]}
        ..      zero padding to D, the first multiple of 64 at or after 8 + N
        D   ..  the data: each tensor at D + offset (offset a multiple of 64), C order,
                little-endian, prod(shape) * itemsize bytes
    """
    described = []
    datas = []
    for name, value in arrays.items():
        a = value if isinstance(value, np.ndarray) else np.asarray(value)
        dtype = _NAMES.get(a.dtype)
        if dtype is None:  # big-endian or not a numeric dtype
            dtype = a.dtype.name
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be sent")
            a = a.astype(_LE[dtype])
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        described.append((name, dtype, a.shape, a.nbytes))
        datas.append(a)
    head, *pads = _layout(tuple(described))
    parts: list[bytes | memoryview] = [head]
    for a, pad in zip(datas, pads, strict=True):
        if a.nbytes:
            parts.append(memoryview(a).cast("B"))  # type: ignore[arg-type]
        if pad:
            parts.append(pad)
    return parts


@functools.lru_cache(maxsize=64)  # at most 64 x 64 KB of untrusted index text held
def _read_index(
    raw: bytes,
) -> tuple[int, tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]]:
    """The checked entries of a tensor index: the body length they need, and per tensor
    (name, dtype, shape, offset from the body's start, count). Raises ValueError for
    anything malformed; made once per distinct index."""
    index = json.loads(raw)
    entries = index.get("tensors") if isinstance(index, dict) else None
    if not isinstance(entries, list) or len(entries) > _MAX_TENSORS:
        raise ValueError("the index needs a list of at most 256 tensors")
    data = _aligned(8 + len(raw))
    out: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    need = 0
    for e in entries:
        name, dtype, shape, offset = e["name"], e["dtype"], e["shape"], e["offset"]
        if not isinstance(name, str) or name in seen:
            raise ValueError("tensor names must be distinct strings")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name}: dtype {dtype!r} is not allowed")
        if not isinstance(shape, list) or len(shape) > _MAX_RANK:
            raise ValueError(f"tensor {name}: bad shape")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name}: bad shape")
        if type(offset) is not int or offset < 0:
            raise ValueError(f"tensor {name}: bad offset")
        seen.add(name)
        count = math.prod(shape)
        dt = _LE[dtype]
        out.append((name, dt, tuple(shape), data + offset, count))
        need = max(need, data + offset + count * dt.itemsize)
    return need, tuple(out)


def decode_tensors(unverified_body: bytes | bytearray | memoryview) -> dict[str, npt.NDArray[Any]]:
    """Arrays viewing an ``application/x-edgeseal-tensors`` body (no copy); every length,
    offset, dtype and shape is checked against the body before an array is made."""
    body = memoryview(unverified_body)
    if len(body) < 8 or body[:4] != _TENSORS_MAGIC:
        raise ValueError("no tensor body header")
    (n,) = struct.unpack_from("<I", body, 4)
    if n > min(_MAX_INDEX_BYTES, len(body) - 8):
        raise ValueError("tensor index length out of bounds")
    need, entries = _read_index(bytes(body[8 : 8 + n]))
    if need > len(body):
        name = next(e[0] for e in entries if e[3] + e[4] * e[1].itemsize > len(body))
        raise ValueError(f"tensor {name}: data out of bounds")
    return {name: np.ndarray(shape, dt, body, start) for name, dt, shape, start, _ in entries}


def encode_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """An ``.npz`` body (the older, slower encoding; still accepted and answered)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def decode_arrays(
    body: bytes | bytearray | memoryview, content_type: str, *, max_elements: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Arrays from a tensor body (:data:`TENSORS`), an .npz body (no pickles) or JSON
    ``{"inputs": {name: {dtype, shape, data}}}``. With ``max_elements``, an .npz body
    declaring more elements is refused from its array headers, before any is inflated
    (InputTooLargeError); a tensor body's arrays are views, made without allocating."""
    try:
        if content_type == TENSORS:
            return decode_tensors(body)
        if content_type == JSON:
            obj = json.loads(bytes(body))
            out = {}
            for name, t in obj["inputs"].items():
                # Named numeric types only, looked up rather than parsed: np.dtype() on
                # untrusted text runs numpy's own parser ("U400000000" allocates 1.6 GB
                # from 60 bytes of JSON; ",int8" raises SyntaxError).
                dtype_name = t["dtype"]
                if not isinstance(dtype_name, str) or dtype_name not in _LE:
                    raise ValueError(f"dtype {str(dtype_name)[:40]!r} is not one of {sorted(_LE)}")
                dtype = _LE[dtype_name]
                out[name] = np.asarray(t["data"], dtype=dtype).reshape(t["shape"])
            return out
        return _decode_npz(body, max_elements)
    except InputTooLargeError:
        raise
    # OverflowError: a JSON number out of its dtype's range (657 as int8).
    # RecursionError: JSON nested thousands deep ("[" * 50000).
    except (
        ValueError,
        KeyError,
        TypeError,
        OSError,
        AttributeError,
        OverflowError,
        RecursionError,
        struct.error,
    ) as e:
        raise BadRequestError(
            f"the body is not a valid {content_type or NPZ} of arrays: {e}"
        ) from e


_NUMERIC_KINDS = frozenset("biuf")


def _npz_elements(body: bytes | bytearray | memoryview) -> int:
    """The elements an .npz body's arrays declare, from their .npy headers only."""
    import zipfile

    total = 0
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        if len(z.infolist()) > _MAX_TENSORS:
            raise ValueError(f"more than {_MAX_TENSORS} arrays")
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            total += math.prod(shape)
    return total


def _decode_npz(
    body: bytes | bytearray | memoryview, max_elements: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    try:
        if max_elements is not None:
            declared = _npz_elements(body)
            if declared > max_elements:
                raise InputTooLargeError(
                    f"the arrays declare {declared} elements, at most {max_elements} per "
                    "call for this model"
                )
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, KeyError, TypeError, OSError, AttributeError, struct.error):
        raise
    except InputTooLargeError:
        raise
    # zipfile and numpy's header parser raise whatever they meet in hostile bytes
    # (BadZipFile, NotImplementedError, RuntimeError, tokenize errors, zlib.error...):
    # every one of them means "not a valid .npz", never a server error.
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
    for k, a in out.items():
        if a.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"array {k!r} has dtype {a.dtype}, not a numeric tensor type")
    return out


def error_body(kind: str, message: str) -> bytes:
    """The body of an error answer: ``{"error": kind, "message": message}``."""
    return json.dumps({"error": kind, "message": message}).encode()


def read_error(body: bytes | bytearray) -> tuple[str, str]:
    """(kind, message) of an error answer's body; a body that is not the agent's JSON
    (a proxy's page, a truncated answer) is kind ``Error`` with its first 200 bytes."""
    try:
        err = json.loads(body)
        return str(err.get("error", "Error")), str(err.get("message", ""))
    except (ValueError, AttributeError):
        return "Error", bytes(body[:200]).decode(errors="replace")
