"""The STREAM chunk framing on its own: index, final flag and binding are authenticated."""

from __future__ import annotations

import secrets

import pytest

from edgeseal.core._stream import AES_256_GCM, CHACHA20_POLY1305, SectionCipher, sealed_size
from edgeseal.core.errors import DecryptError

KEY = secrets.token_bytes(32)


def cipher(
    cipher_name: str = AES_256_GCM,
    *,
    size: int = 100,
    section: str = "weights",
    bundle_id: str = "a" * 32,
    key: bytes = KEY,
) -> SectionCipher:
    return SectionCipher(
        key,
        bundle_id=bundle_id,
        section=section,
        plaintext_size=size,
        chunk_size=32,
        cipher=cipher_name,
    )


def seal_all(sc: SectionCipher, data: bytes) -> list[bytes]:
    return [sc.seal(i, data[i * 32 : i * 32 + sc.plaintext_len(i)]) for i in range(sc.count)]


@pytest.mark.parametrize("name", [AES_256_GCM, CHACHA20_POLY1305])
def test_chunks_round_trip_into_a_preallocated_buffer(name):
    data = secrets.token_bytes(100)
    sc = cipher(name)
    chunks = seal_all(sc, data)
    assert sum(map(len, chunks)) == sealed_size(100, 32)
    out = bytearray(100)
    for i, c in enumerate(chunks):
        sc.open_into(i, c, memoryview(out)[i * 32 : i * 32 + sc.plaintext_len(i)])
    assert bytes(out) == data


def test_a_chunk_opened_at_another_index_fails():
    sc = cipher()
    chunks = seal_all(sc, secrets.token_bytes(100))
    with pytest.raises(DecryptError):
        sc.open_into(1, chunks[0], memoryview(bytearray(32)))


def test_dropping_the_final_chunk_is_caught_by_the_final_flag():
    """A section cut after a full chunk: the new 'last' chunk was sealed as not-final."""
    data = secrets.token_bytes(96)
    sc = cipher(size=96)
    chunks = seal_all(sc, data)
    short = cipher(size=64)
    with pytest.raises(DecryptError):
        short.open_into(1, chunks[1], memoryview(bytearray(32)))


@pytest.mark.parametrize(
    "other",
    [
        {"section": "graph"},
        {"bundle_id": "b" * 32},
        {"key": secrets.token_bytes(32)},
        {"cipher_name": CHACHA20_POLY1305},
    ],
)
def test_a_chunk_from_another_section_bundle_key_or_cipher_fails(other):
    chunk = seal_all(cipher(), secrets.token_bytes(100))[0]
    with pytest.raises(DecryptError):
        cipher(**other).open_into(0, chunk, memoryview(bytearray(32)))


def test_an_empty_section_is_one_authenticated_chunk():
    sc = cipher(size=0)
    (chunk,) = seal_all(sc, b"")
    assert len(chunk) == 16
    sc.open_into(0, chunk, memoryview(bytearray(0)))
    with pytest.raises(DecryptError):
        sc.open_into(0, bytes(16), memoryview(bytearray(0)))
