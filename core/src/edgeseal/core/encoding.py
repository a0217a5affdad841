"""Canonical JSON, base64 and time stamps shared by every signed document. Stable API.

Signed documents are stored as the exact bytes that were signed, so canonical form only
matters when writing: sorted keys, no insignificant white space, UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "b64d",
    "b64e",
    "canonical_json",
    "format_time",
    "parse_json_object",
    "parse_time",
    "utcnow",
]


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` deterministically (sorted keys, compact, UTF-8, no NaN)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object strictly (no duplicate keys, no NaN); ``ValueError`` naming ``what``."""
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object")
    return obj


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, what: str) -> bytes:
    """Decode strict base64; ``ValueError`` naming ``what`` on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"{what} is not valid base64") from e


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, to the second."""
    if t.tzinfo is None:
        raise ValueError("time stamps must be timezone-aware")
    return t.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object, what: str) -> datetime:
    """Parse the form :func:`format_time` writes; ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(text, str) or not text.endswith("Z") or len(text) != 20:
        raise ValueError(f"{what} must be an RFC 3339 UTC time like 2026-01-31T12:00:00Z")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise ValueError(f"{what} is not a valid time: {text!r}") from e
