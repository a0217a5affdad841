"""Sealing data to a device key with a bundle's own constructions. Internal API.

For what the other parts of edgeseal seal on a device (the agent's TensorRT engine
cache), so they reuse the audited constructions without reaching into core's hazmat
modules: a random key wrapped to a device public key with the HPKE suite of a bundle's
content key, and data sealed in chunks with the sections' STREAM construction
(AES-256-GCM). This module is the one door to ``_hpke`` and ``_stream`` from outside
core; it chooses the algorithms. Pure: bytes and keys in, bytes out.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core import _hpke, _stream
from edgeseal.core._stream import SectionCipher
from edgeseal.core.keystore import KeyStore

__all__ = [
    "KEY_LEN",
    "TAG_LEN",
    "WRAPPED_KEY_LEN",
    "SectionCipher",
    "chunk_cipher",
    "sealed_size",
    "unwrap_key",
    "wrap_key",
]

#: Bytes of a key for :func:`chunk_cipher`.
KEY_LEN = _stream.KEY_LEN
#: Bytes each sealed chunk adds to its plaintext.
TAG_LEN = _stream.TAG_LEN
#: Bytes of a :func:`wrap_key` result for a ``KEY_LEN`` key.
WRAPPED_KEY_LEN = _hpke.ENC_LEN + KEY_LEN + _hpke.TAG_LEN


def wrap_key(recipient: ec.EllipticCurvePublicKey, key: bytes, *, info: bytes) -> bytes:
    """``key`` sealed to ``recipient`` (HPKE base mode); ``info`` binds it to its use."""
    return _hpke.seal(recipient, key, info=info)


def unwrap_key(wrapped: bytes, key_store: KeyStore, *, info: bytes) -> bytes:
    """Open a :func:`wrap_key` result with the key store's ECDH; any failure but the key
    store's own is one :class:`~edgeseal.core.errors.DecryptError`."""
    return _hpke.open_with_ecdh(
        wrapped,
        ecdh=key_store.ecdh,
        recipient_point=_hpke.point_bytes(key_store.public_key),
        info=info,
    )


def chunk_cipher(
    key: bytes, *, bundle_id: str, name: str, plaintext_size: int, chunk_size: int
) -> SectionCipher:
    """The STREAM cipher for one named piece of data, bound to ``bundle_id`` and ``name``."""
    return SectionCipher(
        key,
        bundle_id=bundle_id,
        section=name,
        plaintext_size=plaintext_size,
        chunk_size=chunk_size,
        cipher=_stream.AES_256_GCM,
    )


def sealed_size(plaintext_size: int, chunk_size: int) -> int:
    """Bytes of ``plaintext_size`` bytes once sealed in chunks of ``chunk_size``."""
    return _stream.sealed_size(plaintext_size, chunk_size)
