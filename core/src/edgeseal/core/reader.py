"""Reading bundles: bounded parse, trust chain, signature, then decryption. Stable API.

The steps are numbered as in docs/bundle-format.md ("Verification") and cited at the
line that does them. :func:`verify_prelude` (V1-V11) is pure: bytes, a policy and a
reference time in, a :class:`VerifiedBundle` or a typed error out. :class:`BundleFile`
is the thin I/O shell that reads a bounded prefix and streams sealed chunks (V12-V14).
Nothing is decrypted before the signature and the trust chain have been checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeseal.core import _hpke
from edgeseal.core._stream import SectionCipher
from edgeseal.core.config import Limits
from edgeseal.core.encoding import format_time, parse_json_object
from edgeseal.core.errors import (
    DigestMismatchError,
    ExpiredError,
    MalformedBundleError,
    NotARecipientError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    TrustError,
)
from edgeseal.core.keys import verify_raw_signature
from edgeseal.core.keystore import KeyStore
from edgeseal.core.layout import HEADER_LEN, Header, parse_header
from edgeseal.core.manifest import Manifest, SectionEntry
from edgeseal.core.trust import (
    RevocationList,
    SignerCertificate,
    TrustAnchor,
    verify_signer_certificate,
)
from edgeseal.core.truststate import TrustState
from edgeseal.core.writer import content_key_info, signed_message

__all__ = [
    "BundleFile",
    "VerifiedBundle",
    "VerifyPolicy",
    "check_policy",
    "parse_version",
    "unwrap_content_key",
    "verify_prelude",
    "wipe",
]

Progress = Callable[[int], None]


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ``ValueError`` on anything else."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        raise ValueError(f"not a version number: {text!r}")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class VerifyPolicy:
    """What a reader checks a bundle against.

    ``now=None`` means "serving a bundle that was checked when it was installed": no time
    checks (expiry is checked when installing, never while serving). ``None`` for
    ``floor``, ``architecture``, ``agent_version`` or ``runtimes`` skips that check.
    ``trust`` is the device's whole trust state (root chain, revocations per root); when
    it is ``None`` the reader starts from ``anchor`` alone. ``known_revocations`` adds a
    list to the revoked signers either way.
    """

    anchor: TrustAnchor
    now: datetime | None
    known_revocations: RevocationList | None = None
    trust: TrustState | None = None
    floor: int | None = None
    architecture: str | None = None
    agent_version: str | None = None
    runtimes: tuple[str, ...] | None = None
    clock_skew: timedelta = timedelta(minutes=5)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose prelude passed V1-V11."""

    header: Header
    manifest: Manifest
    manifest_bytes: bytes
    signer: SignerCertificate
    anchor: TrustAnchor
    revocations: RevocationList | None
    trust: dict[str, Any]
    #: The device's trust state as it would be after accepting this bundle (root chain
    #: followed, carried list taken): the store merges it in when it commits.
    trust_state: TrustState
    #: SHA-256 of the verified prelude (header, manifest, trust block, signature): a copy
    #: of this bundle is checked against it (:meth:`BundleFile.check_copy_of`), not
    #: verified again.
    prelude_sha256: str = ""


def _unverified_trust(unverified_block: bytes) -> tuple[list[object], object, object]:
    try:
        block = parse_json_object(unverified_block, "trust block")
    except ValueError as e:
        raise MalformedBundleError(str(e)) from e
    rotations = block.get("rotations", [])
    if not isinstance(rotations, list) or "signer" not in block:
        raise MalformedBundleError("trust block lacks a signer certificate or rotation list")
    return rotations, block["signer"], block.get("revocations")


def verify_prelude(
    unverified_prefix: bytes, *, file_len: int, policy: VerifyPolicy
) -> VerifiedBundle:
    """Check everything before the sealed payload. Pure."""
    # V1: fixed header, every length within limits, the file exactly as long as declared.
    header = parse_header(unverified_prefix[:HEADER_LEN], file_len=file_len, limits=policy.limits)
    if len(unverified_prefix) < header.payload_offset:
        raise MalformedBundleError("truncated before the payload")
    unverified_manifest = unverified_prefix[header.manifest_offset : header.trust_offset]
    unverified_trust = unverified_prefix[header.trust_offset : header.signature_offset]
    unverified_sig = unverified_prefix[header.signature_offset : header.payload_offset]
    # V2: the trust block parses (its contents are not trusted yet).
    rotations, unverified_cert, unverified_revocations = _unverified_trust(unverified_trust)
    # V3: follow root rotations from the device's root (pinned, or as far as it followed
    # the chain; a pinned root found inside the chain takes its place there); later steps
    # use the resulting root.
    state = (policy.trust or TrustState.pinned_to(policy.anchor)).follow(rotations)
    anchor = state.anchor
    # V4: a carried revocation list must be signed by that root; it is merged with the
    # lists the device knows (newest per root); every signer any of them names is revoked.
    if unverified_revocations is not None:
        state = state.with_revocations(unverified_revocations)
    revocations = state.effective_revocations(policy.known_revocations)
    # V5: the signer certificate is signed by the root, valid now, not revoked, may pack.
    signer = verify_signer_certificate(
        unverified_cert, anchor, now=policy.now, revocations=revocations
    )
    if not signer.allows_role("pack"):
        raise TrustError(f"signer {signer.name!r} lacks the 'pack' role")
    # V6: the bundle signature covers header, manifest and trust block.
    message = signed_message(unverified_prefix[:HEADER_LEN], unverified_manifest, unverified_trust)
    if not verify_raw_signature(signer.public_key, unverified_sig, message):
        raise SignatureError(f"bundle signature does not verify with signer {signer.name!r}")
    manifest_bytes = unverified_manifest
    # V7: the manifest is well-formed, names this signer, and the model is in its scope.
    # (V11, the section layout, is checked while parsing: see Manifest.from_bytes.)
    manifest = Manifest.from_bytes(
        manifest_bytes, payload_len=header.payload_len, limits=policy.limits
    )
    if manifest.signer != signer.key_id:
        raise SignatureError("manifest names a different signer than the certificate")
    if not signer.allows_model(manifest.model_name):
        raise TrustError(
            f"signer {signer.name!r} may not sign model {manifest.model_name!r} "
            f"(allowed: {', '.join(signer.model_patterns)})"
        )
    check_policy(manifest, policy)
    trust = {
        "rotations": rotations,
        "signer": unverified_cert,
        "revocations": unverified_revocations,
    }
    prelude_sha256 = hashlib.sha256(unverified_prefix[: header.payload_offset]).hexdigest()
    return VerifiedBundle(
        header, manifest, manifest_bytes, signer, anchor, revocations, trust, state, prelude_sha256
    )


def check_policy(manifest: Manifest, policy: VerifyPolicy) -> None:
    """V8-V10 of a verified manifest against ``policy``. Pure. :func:`verify_prelude`
    runs it; an open of a copy of a verified bundle runs it again with its own policy."""
    # V8: at install time the bundle is not expired and not from the future.
    if policy.now is not None:
        if policy.now >= manifest.expires:
            raise ExpiredError(
                f"bundle expired at {format_time(manifest.expires)} "
                f"(trusted time is {format_time(policy.now)})"
            )
        # (now + skew, not created - skew: a signed "created" of year 1 must not overflow)
        if manifest.created > policy.now + policy.clock_skew:
            raise ExpiredError(
                f"bundle was created at {format_time(manifest.created)}, after the trusted "
                f"time {format_time(policy.now)}"
            )
    # V9: the bundle targets this device's architecture, runtime and agent version.
    target = manifest.target
    if policy.architecture is not None and policy.architecture not in target.architectures:
        raise TargetMismatchError(
            f"bundle targets {', '.join(target.architectures)}, this device is "
            f"{policy.architecture}"
        )
    if policy.runtimes is not None and target.runtime not in policy.runtimes:
        raise TargetMismatchError(f"bundle needs runtime {target.runtime!r}, not available here")
    if policy.agent_version is not None:
        try:
            needed = parse_version(target.min_agent_version)
        except ValueError as e:
            raise MalformedBundleError(f"manifest target: {e}") from e
        if parse_version(policy.agent_version) < needed:
            raise TargetMismatchError(
                f"bundle needs agent {target.min_agent_version} or newer, this is "
                f"{policy.agent_version}"
            )
    # V10: never below the version floor.
    if policy.floor is not None and manifest.version < policy.floor:
        raise RollbackError(
            f"{manifest.model_name} version {manifest.version} is below this device's floor "
            f"{policy.floor}"
        )


def unwrap_content_key(manifest: Manifest, key_store: KeyStore) -> bytearray:
    """V12: find this device's wrapped key and unwrap it through the key store's ECDH."""
    # V12: a recipient entry for this key; HPKE with the ECDH done by the key store.
    recipient = manifest.recipient_for(key_store.key_id)
    if recipient is None:
        raise NotARecipientError(
            f"bundle {manifest.model_name} v{manifest.version} is not wrapped for key "
            f"{key_store.key_id[:16]}"
        )
    key = _hpke.open_with_ecdh(
        recipient.sealed_key,
        ecdh=key_store.ecdh,
        recipient_point=_hpke.point_bytes(key_store.public_key),
        info=content_key_info(manifest.bundle_id),
    )
    return bytearray(key)


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a writable buffer with zeros."""
    view = memoryview(buf).cast("B")
    if len(view):
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(view)), 0, len(view))


class BundleFile:
    """A bundle on disk (or any seekable binary file), read in bounded pieces."""

    def __init__(self, f: io.BufferedIOBase, size: int) -> None:
        self._f = f
        self.size = size

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: Path) -> Iterator[BundleFile]:
        try:
            f = Path(path).open("rb")  # noqa: SIM115 - closed by the with below
        except OSError as e:
            raise MalformedBundleError(f"cannot read bundle {path}: {e.strerror}") from e
        with f:
            yield cls(f, os.fstat(f.fileno()).st_size)

    def _read_exact(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        data = self._f.read(n)
        if len(data) != n:
            raise MalformedBundleError("truncated: the bundle ended early")
        return data

    def read_prefix(self, limits: Limits) -> bytes:
        """The header, manifest, trust block and signature (bounded by V1 before reading)."""
        first = self._read_exact(0, min(HEADER_LEN, self.size))
        header = parse_header(first, file_len=self.size, limits=limits)
        return first + self._read_exact(HEADER_LEN, header.payload_offset - HEADER_LEN)

    def verify(self, policy: VerifyPolicy) -> VerifiedBundle:
        return verify_prelude(self.read_prefix(policy.limits), file_len=self.size, policy=policy)

    def check_copy_of(self, bundle: VerifiedBundle) -> None:
        """This file is a copy of ``bundle`` (verified from another file moments ago), so
        it is checked by digest instead of verified again: its length is the one the
        verified header declares (V1) and its prelude hashes to the verified prelude's
        SHA-256, so the signature V6 checked covers it byte for byte. Its payload is
        checked chunk by chunk against the verified manifest's digests (V13) by
        :meth:`check_chunk_digests` or while decrypting."""
        h = bundle.header
        if not bundle.prelude_sha256:
            raise ValueError("the verified bundle carries no prelude digest")
        # V1 (by comparison): exactly as long as the verified bundle.
        if self.size != h.total_len:
            kind = "truncated" if self.size < h.total_len else "trailing data"
            raise MalformedBundleError(
                f"{kind}: the verified bundle has {h.total_len} bytes, this copy {self.size}"
            )
        # V6 (by comparison): the prelude is the one whose signature was verified.
        if hashlib.sha256(self._read_exact(0, h.payload_offset)).hexdigest() != (
            bundle.prelude_sha256
        ):
            raise SignatureError(
                "the copy's header, manifest or trust block differs from the verified "
                "bundle's: its signature does not cover them"
            )

    def check_chunk_digests(self, bundle: VerifiedBundle) -> None:
        """V13's first half, which needs no key: every sealed chunk is the one the signed
        manifest lists. A store runs it before copying a bundle in, so a corrupted or
        spliced payload never displaces anything."""
        m = bundle.manifest
        scratch = bytearray(m.chunk_size + 16)
        view = memoryview(scratch)
        for entry in m.sections:
            self._f.seek(bundle.header.payload_offset + entry.offset)
            for i, digest in enumerate(entry.chunks):
                n = min(m.chunk_size, entry.plaintext_size - i * m.chunk_size) + 16
                if self._f.readinto(view[:n]) != n:
                    raise MalformedBundleError("truncated: a sealed chunk ended early")
                # V13: the sealed chunk matches the digest the signed manifest lists.
                if hashlib.sha256(view[:n]).hexdigest() != digest:
                    raise DigestMismatchError(
                        f"chunk {i} of section {entry.name} does not match the manifest"
                    )

    def decrypt_section_into(
        self,
        bundle: VerifiedBundle,
        entry: SectionEntry,
        content_key: bytes | bytearray,
        out: memoryview,
        *,
        progress: Progress | None = None,
    ) -> None:
        """V13-V14: check each sealed chunk's digest, open it into ``out``, check the section
        digest. On any failure ``out`` is wiped before the error propagates."""
        m = bundle.manifest
        if len(out) != entry.plaintext_size:
            raise ValueError(f"buffer for {entry.name} must be {entry.plaintext_size} bytes")
        sc = SectionCipher(
            bytes(content_key),
            bundle_id=m.bundle_id,
            section=entry.name,
            plaintext_size=entry.plaintext_size,
            chunk_size=m.chunk_size,
            cipher=m.cipher,
        )
        scratch = bytearray(m.chunk_size + 16)
        view = memoryview(scratch)
        plain_hash = hashlib.sha256()
        try:
            self._f.seek(bundle.header.payload_offset + entry.offset)
            pos = 0
            for i in range(sc.count):
                n = sc.plaintext_len(i)
                unverified_chunk = view[: n + 16]
                if self._f.readinto(unverified_chunk) != n + 16:
                    raise MalformedBundleError("truncated: a sealed chunk ended early")
                # V13: the sealed chunk matches the digest the signed manifest lists ...
                if hashlib.sha256(unverified_chunk).hexdigest() != entry.chunks[i]:
                    raise DigestMismatchError(
                        f"chunk {i} of section {entry.name} does not match the manifest"
                    )
                # ... and opens under this section's key, index and final flag.
                sc.open_into(i, unverified_chunk, out[pos : pos + n])
                plain_hash.update(out[pos : pos + n])
                pos += n
                if progress:
                    progress(n)
            # V14: the whole section matches its plaintext digest.
            if plain_hash.hexdigest() != entry.sha256:
                raise DigestMismatchError(f"section {entry.name} does not match its digest")
        except BaseException:
            wipe(out)
            raise
        finally:
            wipe(scratch)

    def read_section(
        self, bundle: VerifiedBundle, name: str, content_key: bytes | bytearray
    ) -> bytearray:
        """Decrypt a whole section into a new ``bytearray`` (for small sections and tools)."""
        entry = bundle.manifest.section(name)
        if entry is None:
            raise MalformedBundleError(f"bundle has no {name!r} section")
        buf = bytearray(entry.plaintext_size)
        self.decrypt_section_into(bundle, entry, content_key, memoryview(buf))
        return buf
