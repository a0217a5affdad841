"""The ``extras`` section: what the device needs to check the model by itself. Stable API.

Canonical JSON, sealed like every section::

    {"golden":     {"format": 2, "seed": int,
                    "inputs": {name: {"draw": "verbatim", "values": [array]} | draw spec},
                    "vectors": [{"outputs": {name: {"shape": [...], "values": array}}}],
                    "tolerances": {output: {"atol": float}}},
                   (format 1, no "format": vectors of full "inputs" and "outputs";
                    edgeseal.core.golden reads both)
     "profile":    {"inputs": {name: {"dtype", "shape", "min", "max", "axis",
                                      "mean": [...] | array, "std": [...] | array,
                                      "model": {...}}}},
                   (a vector over 16 values is a float32 array, a shorter one a list)
     "provenance": {...},
     "sbom":       {CycloneDX 1.5 JSON}}

An array is ``{"dtype", "shape", "data": base64 of little-endian C-order bytes}``.
numpy is imported only by the array helpers (every part that runs models has it).
"""

from __future__ import annotations

import hashlib
from typing import Any

from edgeseal.core.encoding import b64d, b64e, canonical_json, parse_json_object
from edgeseal.core.errors import MalformedBundleError

__all__ = ["array_from_obj", "array_to_obj", "decode_extras", "encode_extras", "sbom_digest"]

MAX_ARRAY_BYTES = 64 * 1024 * 1024


def array_to_obj(array: Any) -> dict[str, Any]:
    import numpy as np

    a = np.ascontiguousarray(array).reshape(np.shape(array))  # a scalar stays rank 0
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": b64e(le.tobytes())}


def array_from_obj(obj: Any) -> Any:
    """The numpy array an :func:`array_to_obj` object describes (checked)."""
    import numpy as np

    try:
        dtype = np.dtype(obj["dtype"]).newbyteorder("<")
        shape = tuple(int(d) for d in obj["shape"])
        raw = b64d(obj["data"], "array data")
        if len(raw) > MAX_ARRAY_BYTES or any(d < 0 for d in shape):
            raise ValueError("array too large or negative shape")
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != len(raw) or dtype.kind not in "biuf":
            raise ValueError("array data does not match its dtype and shape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedBundleError(f"extras: malformed array: {e}") from e


def encode_extras(extras: dict[str, Any]) -> bytes:
    return canonical_json(extras)


def decode_extras(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        return parse_json_object(bytes(data), "extras section")
    except ValueError as e:
        raise MalformedBundleError(str(e)) from e


def sbom_digest(sbom: dict[str, Any]) -> str:
    """The manifest's ``sbom_digest``: SHA-256 of the SBOM's canonical JSON."""
    return hashlib.sha256(canonical_json(sbom)).hexdigest()
