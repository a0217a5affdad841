"""The byte layout of a bundle's fixed header (docs/bundle-format.md, "Layout"). Pure.

    offset size  field
    0      8     magic  89 45 53 42 0D 0A 1A 0A  ("\\x89ESB\\r\\n\\x1a\\n")
    8      2     format version (big-endian), 1
    10     2     flags, 0 (any other value is refused)
    12     4     manifest length
    16     4     trust block length
    20     4     signature length (64: ECDSA P-256 r||s)
    24     8     payload length (the sealed sections)

The manifest, trust block, signature and payload follow in that order, and the file ends
exactly where the payload ends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edgeseal.core.config import Limits
from edgeseal.core.errors import MalformedBundleError, UnsupportedFormatError

__all__ = ["FORMAT_VERSION", "HEADER_LEN", "MAGIC", "SIGNATURE_LEN", "Header", "parse_header"]

MAGIC = b"\x89ESB\r\n\x1a\n"
FORMAT_VERSION = 1
SIGNATURE_LEN = 64
_STRUCT = struct.Struct(">8sHHIIIQ")
HEADER_LEN = _STRUCT.size


@dataclass(frozen=True)
class Header:
    format_version: int
    manifest_len: int
    trust_len: int
    signature_len: int
    payload_len: int

    @property
    def manifest_offset(self) -> int:
        return HEADER_LEN

    @property
    def trust_offset(self) -> int:
        return HEADER_LEN + self.manifest_len

    @property
    def signature_offset(self) -> int:
        return self.trust_offset + self.trust_len

    @property
    def payload_offset(self) -> int:
        return self.signature_offset + self.signature_len

    @property
    def total_len(self) -> int:
        return self.payload_offset + self.payload_len

    def to_bytes(self) -> bytes:
        return _STRUCT.pack(
            MAGIC,
            self.format_version,
            0,
            self.manifest_len,
            self.trust_len,
            self.signature_len,
            self.payload_len,
        )


def parse_header(unverified_header: bytes, *, file_len: int, limits: Limits) -> Header:
    """V1: parse the fixed header and check every length before anything else is read."""
    if len(unverified_header) < HEADER_LEN:
        raise MalformedBundleError(
            f"truncated: {len(unverified_header)} bytes, a bundle header alone is {HEADER_LEN}"
        )
    magic, version, flags, m_len, t_len, s_len, p_len = _STRUCT.unpack_from(unverified_header)
    if magic != MAGIC:
        raise MalformedBundleError("not an edgeseal bundle (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"bundle format version {version} is not supported (this reader knows {FORMAT_VERSION})"
        )
    if flags != 0:
        raise MalformedBundleError(f"unknown header flags {flags:#06x}")
    if not 0 < m_len <= limits.max_manifest_bytes:
        raise MalformedBundleError(
            f"manifest length {m_len} outside 1..{limits.max_manifest_bytes} "
            "(limits.max_manifest_bytes)"
        )
    if not 0 < t_len <= limits.max_trust_bytes:
        raise MalformedBundleError(
            f"trust block length {t_len} outside 1..{limits.max_trust_bytes} "
            "(limits.max_trust_bytes)"
        )
    if s_len != SIGNATURE_LEN:
        raise MalformedBundleError(f"signature length {s_len}, expected {SIGNATURE_LEN}")
    max_payload = limits.max_sections * (
        limits.max_section_bytes + (limits.max_section_bytes >> 10)
    )
    if p_len > max_payload:
        raise MalformedBundleError(f"payload length {p_len} exceeds the limits")
    header = Header(version, m_len, t_len, s_len, p_len)
    if header.total_len != file_len:
        kind = "truncated" if file_len < header.total_len else "trailing data"
        raise MalformedBundleError(
            f"{kind}: the header declares {header.total_len} bytes, the bundle has {file_len}"
        )
    return header
