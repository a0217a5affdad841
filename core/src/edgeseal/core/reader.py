"""Reading bundles: bounded parse, trust chain, signature, then decryption. Stable API.

The steps are numbered as in docs/bundle-format.md ("Verification") and cited at the
line that does them. The pure checks (V1-V12: :func:`verify_prelude`,
:func:`unwrap_content_key`, :class:`VerifyPolicy`, :class:`VerifiedBundle`) live in
:mod:`edgeseal.core._verify` and are re-exported here, the place to import them from.
:class:`BundleFile` is the thin I/O shell that reads a bounded prefix and streams sealed
chunks (V13-V14). Nothing is decrypted before the signature and the trust chain have
been checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeseal.core._stream import SectionCipher
from edgeseal.core._verify import (
    VerifiedBundle,
    VerifyPolicy,
    check_policy,
    parse_version,
    unwrap_content_key,
    verify_prelude,
)
from edgeseal.core.config import Limits
from edgeseal.core.errors import DigestMismatchError, MalformedBundleError, SignatureError
from edgeseal.core.layout import HEADER_LEN, parse_header
from edgeseal.core.manifest import SectionEntry

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
