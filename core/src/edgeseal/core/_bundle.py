"""What the bundle's writer and reader must agree on byte for byte. Internal.

Both sides import these from here, so the verifier never depends on the sealer: the
HPKE ``info`` that binds a wrapped content key to its bundle, and the exact bytes the
bundle signature covers. Pure: no I/O, no clock.
"""

from __future__ import annotations

__all__ = ["content_key_info", "signed_message"]


def content_key_info(bundle_id: str) -> bytes:
    """HPKE ``info`` for the content key: binds each wrapped key to its bundle."""
    return b"edgeseal/v1/content-key\x00" + bundle_id.encode("ascii")


def signed_message(header: bytes, manifest: bytes, trust: bytes) -> bytes:
    """What the bundle signature covers: every byte before the signature."""
    return header + manifest + trust
