"""Writing bundles: seal sections, wrap the content key per device, sign. Stable API.

:func:`seal_bundle` chooses the algorithms itself; callers give content, identities and
keys. The file appears complete or not at all (written beside the target, renamed over).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core import _hpke
from edgeseal.core._bundle import content_key_info, signed_message
from edgeseal.core._stream import AES_256_GCM, CIPHERS, KEY_LEN, SectionCipher
from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import PathError
from edgeseal.core.files import atomic_writer
from edgeseal.core.keys import Signer, key_id
from edgeseal.core.layout import FORMAT_VERSION, SIGNATURE_LEN, Header
from edgeseal.core.manifest import (
    SECTION_NAMES,
    Manifest,
    Recipient,
    SectionEntry,
    Target,
    TensorSpec,
    validate_name,
)

__all__ = ["RecipientKey", "content_key_info", "seal_bundle", "signed_message"]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RecipientKey:
    """A device a bundle is wrapped for: its id and its P-256 public key."""

    device: str
    public_key: ec.EllipticCurvePublicKey


def _seal_section(
    name: str,
    data: memoryview,
    content_key: bytes,
    *,
    bundle_id: str,
    chunk_size: int,
    cipher: str,
    offset: int,
    progress: Progress | None,
) -> tuple[SectionEntry, list[bytes]]:
    sc = SectionCipher(
        content_key,
        bundle_id=bundle_id,
        section=name,
        plaintext_size=len(data),
        chunk_size=chunk_size,
        cipher=cipher,
    )
    pieces: list[bytes] = []
    digests: list[str] = []
    plain_hash = hashlib.sha256()
    for i in range(sc.count):
        chunk = data[i * chunk_size : i * chunk_size + sc.plaintext_len(i)]
        plain_hash.update(chunk)
        sealed = sc.seal(i, chunk)
        pieces.append(sealed)
        digests.append(hashlib.sha256(sealed).hexdigest())
        if progress:
            progress(len(chunk))
    entry = SectionEntry(
        name, len(data), plain_hash.hexdigest(), offset, sum(len(p) for p in pieces), tuple(digests)
    )
    return entry, pieces


def seal_bundle(
    out: Path,
    *,
    sections: Mapping[str, bytes | bytearray | memoryview],
    model_name: str,
    version: int,
    model_format: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    signer: Signer,
    certificate: Mapping[str, Any],
    recipients: Sequence[RecipientKey],
    created: datetime,
    expires: datetime,
    target: Target | None = None,
    cipher: str = AES_256_GCM,
    chunk_size: int = 1024 * 1024,
    revocations: Mapping[str, Any] | None = None,
    root_rotations: Sequence[Mapping[str, Any]] = (),
    quantization: Mapping[str, Any] | None = None,
    sbom_digest: str | None = None,
    extra: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Seal ``sections`` for ``recipients``, sign with ``signer``, write ``out`` atomically."""
    validate_name(model_name, "model name")
    if not recipients:
        raise ValueError("a bundle needs at least one recipient device")
    if cipher not in CIPHERS:
        raise ValueError(f"cipher must be one of {CIPHERS}")
    if "graph" not in sections or not set(sections) <= set(SECTION_NAMES):
        raise ValueError(f"sections must include 'graph' and be among {SECTION_NAMES}")
    if expires <= created:
        raise ValueError("expires must come after created")
    bundle_id = uuid.uuid4().hex
    content_key = secrets.token_bytes(KEY_LEN)
    entries: list[SectionEntry] = []
    payload: list[bytes] = []
    offset = 0
    for name in SECTION_NAMES:
        if name not in sections:
            continue
        entry, pieces = _seal_section(
            name,
            memoryview(sections[name]).cast("B"),
            content_key,
            bundle_id=bundle_id,
            chunk_size=chunk_size,
            cipher=cipher,
            offset=offset,
            progress=progress,
        )
        entries.append(entry)
        payload.extend(pieces)
        offset += entry.sealed_size
    info = content_key_info(bundle_id)
    wrapped = tuple(
        Recipient(
            validate_name(r.device, "device id"),
            key_id(r.public_key),
            _hpke.seal(r.public_key, content_key, info=info),
        )
        for r in recipients
    )
    manifest = Manifest(
        bundle_id=bundle_id,
        model_name=model_name,
        version=version,
        model_format=model_format,
        created=created,
        expires=expires,
        target=target or Target(),
        cipher=cipher,
        chunk_size=chunk_size,
        sections=tuple(entries),
        recipients=wrapped,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        signer=signer.key_id,
        quantization=quantization,
        sbom_digest=sbom_digest,
        extra=dict(extra or {}),
    )
    manifest_bytes = manifest.to_bytes()
    trust_bytes = canonical_json(
        {
            "rotations": list(root_rotations),
            "signer": dict(certificate),
            "revocations": dict(revocations) if revocations else None,
        }
    )
    header = Header(
        FORMAT_VERSION, len(manifest_bytes), len(trust_bytes), SIGNATURE_LEN, offset
    ).to_bytes()
    signature = signer.sign(signed_message(header, manifest_bytes, trust_bytes))
    try:
        with atomic_writer(out) as f:
            f.write(header)
            f.write(manifest_bytes)
            f.write(trust_bytes)
            f.write(signature)
            for piece in payload:
                f.write(piece)
    except OSError as e:
        raise PathError.from_os_error(e, out, "write the bundle", creating=True) from e
    return manifest
