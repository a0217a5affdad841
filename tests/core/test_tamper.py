"""The tamper matrix: every flipped bit, truncation, reordered or spliced chunk is rejected
with the expected error type, before any plaintext is released."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from edgeseal.core.config import Limits
from edgeseal.core.errors import (
    DecryptError,
    DigestMismatchError,
    EdgesealError,
    MalformedBundleError,
    SignatureError,
    TrustError,
)
from edgeseal.core.layout import HEADER_LEN, parse_header
from edgeseal.core.manifest import validate_name
from edgeseal.core.reader import BundleFile, unwrap_content_key


def open_all(fleet, data: bytes) -> None:
    """Verify, unwrap and decrypt every section of ``data`` as device dev-a."""
    bf = BundleFile(io.BytesIO(data), len(data))
    vb = bf.verify(fleet.policy())
    key = unwrap_content_key(vb.manifest, fleet.devices["dev-a"])
    for entry in vb.manifest.sections:
        bf.read_section(vb, entry.name, key)


@pytest.fixture
def sealed(fleet, onnx_model) -> tuple[bytes, object]:
    path, result = fleet.pack(onnx_model, chunk_size=256)
    data = Path(path).read_bytes()
    open_all(fleet, data)  # the untouched bundle opens
    return data, result


def _regions(data: bytes):
    h = parse_header(data[:HEADER_LEN], file_len=len(data), limits=Limits())
    return h, {
        "header": (0, HEADER_LEN),
        "manifest": (h.manifest_offset, h.trust_offset),
        "trust": (h.trust_offset, h.signature_offset),
        "signature": (h.signature_offset, h.payload_offset),
        "payload": (h.payload_offset, h.total_len),
    }


EXPECTED = {
    "header": (MalformedBundleError,),
    "manifest": (SignatureError,),
    "trust": (MalformedBundleError, SignatureError, TrustError),
    "signature": (SignatureError,),
    "payload": (DigestMismatchError,),
}


def _flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def _payload_offsets(data: bytes, result) -> list[int]:
    """In each sealed chunk: its first, middle and last ciphertext byte and each tag byte."""
    h, _ = _regions(data)
    out: list[int] = []
    for entry in result.manifest.sections:
        pos = h.payload_offset + entry.offset
        end = pos + entry.sealed_size
        while pos < end:
            n = min(result.manifest.chunk_size + 16, end - pos)
            out += [pos, pos + (n - 16) // 2, pos + n - 17, *list(range(pos + n - 16, pos + n))]
            pos += n
    return sorted({o for o in out if h.payload_offset <= o < h.total_len})


@pytest.mark.parametrize("region", ["header", "manifest", "trust", "signature"])
def test_a_flipped_bit_in_any_prelude_byte_is_rejected(fleet, sealed, region):
    data, _ = sealed
    _, regions = _regions(data)
    start, end = regions[region]
    for offset in range(start, end):
        bit = offset % 8
        with pytest.raises(EXPECTED[region]):
            open_all(fleet, _flip(data, offset, bit))


def test_a_flipped_bit_in_every_chunk_ciphertext_and_tag_is_rejected(fleet, sealed):
    data, result = sealed
    offsets = _payload_offsets(data, result)
    assert len(offsets) > 40
    for offset in offsets:
        with pytest.raises(DigestMismatchError):
            open_all(fleet, _flip(data, offset, offset % 8))


def test_flips_at_every_region_boundary_are_rejected(fleet, sealed):
    data, _ = sealed
    _, regions = _regions(data)
    for start, end in regions.values():
        for offset in {start - 1, start, start + 1, end - 1, end}:
            if 0 <= offset < len(data):
                with pytest.raises(EdgesealError):
                    open_all(fleet, _flip(data, offset, 7))


def test_truncation_at_any_offset_is_rejected(fleet, sealed):
    data, _ = sealed
    _, regions = _regions(data)
    cuts = set(range(HEADER_LEN + 8))
    for start, end in regions.values():
        cuts |= {start - 1, start, start + 1, end - 1}
    cuts |= set(range(0, len(data), 97))
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(MalformedBundleError):
            open_all(fleet, data[:cut])


def test_trailing_bytes_are_rejected(fleet, sealed):
    data, _ = sealed
    with pytest.raises(MalformedBundleError, match="trailing"):
        open_all(fleet, data + b"\x00")


def test_reordered_chunks_are_rejected(fleet, sealed):
    data, result = sealed
    h, _ = _regions(data)
    weights = result.manifest.section("weights")
    size = result.manifest.chunk_size + 16
    assert len(weights.chunks) >= 3
    a = h.payload_offset + weights.offset
    b = bytearray(data)
    b[a : a + size], b[a + size : a + 2 * size] = data[a + size : a + 2 * size], data[a : a + size]
    with pytest.raises(DigestMismatchError):
        open_all(fleet, bytes(b))


def test_chunks_spliced_from_another_bundle_are_rejected(fleet, onnx_model, sealed):
    data, result = sealed
    other_path, other = fleet.pack(onnx_model, chunk_size=256)
    other_data = Path(other_path).read_bytes()
    h, _ = _regions(data)
    oh, _ = _regions(other_data)
    w, ow = result.manifest.section("weights"), other.manifest.section("weights")
    assert w.sealed_size == ow.sealed_size
    b = bytearray(data)
    start, ostart = h.payload_offset + w.offset, oh.payload_offset + ow.offset
    b[start : start + 272] = other_data[ostart : ostart + 272]
    with pytest.raises(DigestMismatchError):
        open_all(fleet, bytes(b))


def test_recipients_spliced_from_another_bundle_fail_to_unwrap(fleet, onnx_model):
    """Mix-and-match: a wrapped key from another bundle is bound to that bundle's id."""
    from dataclasses import replace

    p1, r1 = fleet.pack(onnx_model)
    _, r2 = fleet.pack(onnx_model)
    foreign = replace(r1.manifest, recipients=r2.manifest.recipients)
    with pytest.raises(DecryptError):
        unwrap_content_key(foreign, fleet.devices["dev-a"])
    assert p1.exists()


@pytest.mark.parametrize("name", ["clf\n", "clf\n\n", "\nclf", "UPPER", "a/b", ""])
def test_a_name_with_a_trailing_newline_or_other_stray_character_is_refused(name):
    """Names become file and topic names: ``$`` alone would let ``"clf\\n"`` through."""
    with pytest.raises(ValueError):
        validate_name(name, "model name")
