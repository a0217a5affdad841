"""Hazmat room: the STREAM construction for sealing sections in chunks. Internal API.

Each section gets its own key, derived from the bundle's content key with HKDF-SHA256
(info binds the bundle id and the section name). Chunk ``i`` of ``n`` is sealed with
the nonce ``0x00 * 7 || i (4 bytes, big-endian) || last`` where ``last`` is 1 for the
final chunk and 0 otherwise (Hoang, Reyhanitabar, Rogaway, Vizár 2015), and with the
section's binding digest as associated data. So reordering, dropping, duplicating or
truncating chunks, or splicing chunks from another section or bundle, fails the tag.

Callers never see why a chunk failed: every failure is one :class:`DecryptError`.
"""

from __future__ import annotations

import hashlib
import logging

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import DecryptError

log = logging.getLogger(__name__)

AES_256_GCM = "AES-256-GCM"
CHACHA20_POLY1305 = "ChaCha20-Poly1305"
CIPHERS = (AES_256_GCM, CHACHA20_POLY1305)
TAG_LEN = 16
KEY_LEN = 32
MAX_CHUNKS = 2**32


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Number of chunks; an empty section is one empty chunk."""
    return max(1, -(-plaintext_size // chunk_size))


def sealed_size(plaintext_size: int, chunk_size: int) -> int:
    return plaintext_size + TAG_LEN * chunk_count(plaintext_size, chunk_size)


def binding(
    *, bundle_id: str, section: str, plaintext_size: int, chunk_size: int, cipher: str
) -> bytes:
    """The associated data bound into every chunk of one section."""
    doc = {
        "bundle_id": bundle_id,
        "section": section,
        "plaintext_size": plaintext_size,
        "chunk_size": chunk_size,
        "cipher": cipher,
    }
    return hashlib.sha256(b"edgeseal/v1/section-binding\x00" + canonical_json(doc)).digest()


def _nonce(index: int, last: bool) -> bytes:
    return b"\x00" * 7 + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class SectionCipher:
    """Seals or opens the chunks of one section."""

    def __init__(
        self,
        content_key: bytes,
        *,
        bundle_id: str,
        section: str,
        plaintext_size: int,
        chunk_size: int,
        cipher: str,
    ) -> None:
        if len(content_key) != KEY_LEN:
            raise ValueError("content key must be 32 bytes")
        if cipher not in CIPHERS:
            raise ValueError(f"unknown cipher {cipher!r}")
        info = b"edgeseal/v1/section-key\x00" + bundle_id.encode() + b"\x00" + section.encode()
        key = HKDF(hashes.SHA256(), KEY_LEN, salt=None, info=info).derive(content_key)
        self._aead: AESGCM | ChaCha20Poly1305 = (
            AESGCM(key) if cipher == AES_256_GCM else ChaCha20Poly1305(key)
        )
        self.chunk_size = chunk_size
        self.plaintext_size = plaintext_size
        self.count = chunk_count(plaintext_size, chunk_size)
        if self.count > MAX_CHUNKS:
            raise ValueError("too many chunks for the 32-bit chunk counter")
        self._ad = binding(
            bundle_id=bundle_id,
            section=section,
            plaintext_size=plaintext_size,
            chunk_size=chunk_size,
            cipher=cipher,
        )

    def plaintext_len(self, index: int) -> int:
        if index == self.count - 1:
            return self.plaintext_size - index * self.chunk_size
        return self.chunk_size

    def seal(self, index: int, plaintext: bytes | memoryview) -> bytes:
        if len(plaintext) != self.plaintext_len(index):
            raise ValueError(f"chunk {index} must hold {self.plaintext_len(index)} bytes")
        return self._aead.encrypt(_nonce(index, index == self.count - 1), plaintext, self._ad)

    def open_into(self, index: int, unverified_chunk: bytes | memoryview, out: memoryview) -> None:
        """Authenticate and decrypt chunk ``index`` into ``out`` (exactly its plaintext length)."""
        try:
            if not 0 <= index < self.count or len(out) != self.plaintext_len(index):
                raise ValueError("chunk index or length does not fit the section")
            self._aead.decrypt_into(
                _nonce(index, index == self.count - 1), unverified_chunk, self._ad, out
            )
        except (InvalidTag, ValueError) as e:
            log.debug("chunk %d of section failed to open: %r", index, e)
            raise DecryptError("a sealed chunk failed authentication") from None
