"""TensorRT's engine cache, kept sealed to the device key. Internal API.

A TensorRT engine is the model compiled for one GPU with its weights folded in: an
engine file is the model's weights in another form. So the cache is off by default
(``[runtime] trt_engine_cache``). When it is on and ONNX Runtime really uses its
TensorRT execution provider:

1. Before the session is built, :meth:`EngineCache.prepare` makes a fresh directory on
   a RAM-only file system (tmpfs or ramfs: ``runtime.trt_engine_cache_ram_dir``, else
   ``$XDG_RUNTIME_DIR``, else ``/dev/shm``; mode 0700; a disk-backed one is refused),
   opens this bundle's sealed cache from the model store and writes its engine files
   there. ORT gets that directory as ``trt_engine_cache_path``.
2. After the session is built, and again when it closes, :meth:`EngineCache.persist`
   seals whatever engine files ORT wrote (merged with those sealed before) into
   ``<store>/<model>/trt-cache/<bundle id>.sealed`` (atomic write, 0600), then
   overwrites the plaintext files with zeros and unlinks them. The directory itself is
   removed at close.

Sealing (:func:`seal_cache`, :func:`open_cache`: bytes in, bytes out, no I/O). Each
seal draws a fresh random 32-byte cache key and seals it to the device's public key
with HPKE, exactly as a bundle's content key is wrapped (docs/bundle-format.md); the
HPKE ``info`` binds the digest of the cache header, which names the bundle id, the
device key id and every file's name and size. Each engine file is then sealed with the
bundle sections' STREAM construction under that key, its binding naming the bundle id
and the file. So a cache from another bundle (another model or version), another
device, or with any byte changed fails to open, with one :class:`DecryptError`, and
the agent lets TensorRT build its engines afresh. Sealing needs only the public key;
opening costs one ECDH on the key store (in the TPM or token for hardware stores).
This was chosen over a key derived from an ECDH with a fixed device-local point
because it needs no extra provisioned state and reuses the audited unwrap path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import DecryptError, RuntimeBackendError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import key_id
from edgeseal.core.keystore import KeyStore
from edgeseal.core.manifest import is_bundle_id
from edgeseal.core.sealing import (
    KEY_LEN,
    TAG_LEN,
    WRAPPED_KEY_LEN,
    SectionCipher,
    chunk_cipher,
    sealed_size,
    unwrap_key,
    wrap_key,
)

__all__ = [
    "MAX_FILES",
    "RAM_FILESYSTEMS",
    "EngineCache",
    "filesystem_type",
    "make_ram_directory",
    "open_cache",
    "ram_bases",
    "seal_cache",
    "wipe_directory",
]

log = logging.getLogger(__name__)

MAGIC = b"ESTRTC1\x00"
FORMAT = 1
#: Bounds checked before anything read from a sealed cache is allocated.
MAX_HEADER_BYTES = 64 * 1024
MAX_FILES = 256
CHUNK_BYTES = 1024 * 1024
SEALED_KEY_LEN = WRAPPED_KEY_LEN
#: File systems whose files live only in memory (tmpfs pages can go to swap; see docs).
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_NAME = re.compile(r"[A-Za-z0-9._+=-]{1,200}")
_KEY_INFO = b"edgeseal/v1/trt-cache-key\x00"


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in {".", ".."}:
        raise ValueError(f"not a plain engine file name: {name!r}")
    return name


def _header(bundle_id: str, device_key_id: str, sizes: Mapping[str, int]) -> bytes:
    return canonical_json(
        {
            "format": FORMAT,
            "bundle_id": bundle_id,
            "device_key_id": device_key_id,
            "chunk_size": CHUNK_BYTES,
            "files": [{"name": n, "size": sizes[n]} for n in sorted(sizes)],
        }
    )


def _key_info(prefix: bytes) -> bytes:
    return _KEY_INFO + hashlib.sha256(prefix).digest()


def _cipher(key: bytes, bundle_id: str, name: str, size: int) -> SectionCipher:
    return chunk_cipher(
        key,
        bundle_id=bundle_id,
        name=f"trt-cache/{name}",
        plaintext_size=size,
        chunk_size=CHUNK_BYTES,
    )


def seal_cache(
    files: Mapping[str, bytes | bytearray | memoryview],
    *,
    bundle_id: str,
    device_public_key: ec.EllipticCurvePublicKey,
) -> bytes:
    """Seal engine files (name -> bytes) for one bundle on one device."""
    sizes = {_check_name(n): len(data) for n, data in files.items()}
    if len(sizes) > MAX_FILES:
        raise ValueError(f"more than {MAX_FILES} engine files")
    header = _header(bundle_id, key_id(device_public_key), sizes)
    prefix = MAGIC + struct.pack(">I", len(header)) + header
    cache_key = bytearray(secrets.token_bytes(KEY_LEN))
    try:
        out = [prefix, wrap_key(device_public_key, bytes(cache_key), info=_key_info(prefix))]
        for name in sorted(sizes):
            data = memoryview(files[name])
            c = _cipher(bytes(cache_key), bundle_id, name, sizes[name])
            for i in range(c.count):
                out.append(c.seal(i, data[i * CHUNK_BYTES : i * CHUNK_BYTES + c.plaintext_len(i)]))
    finally:
        cache_key[:] = bytes(len(cache_key))
    return b"".join(out)


def _unverified_layout(
    blob: memoryview, bundle_id: str, device_key_id: str, max_bytes: int
) -> tuple[bytes, dict[str, int]]:
    """The header prefix and file sizes, read and bounded before any key is used: the
    AEAD then proves them (raises ``ValueError``)."""
    (n,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    if n > MAX_HEADER_BYTES or len(MAGIC) + 4 + n + SEALED_KEY_LEN > len(blob):
        raise ValueError("header length out of bounds")
    prefix = bytes(blob[: len(MAGIC) + 4 + n])
    unverified_header = json.loads(prefix[len(MAGIC) + 4 :])
    if (
        not isinstance(unverified_header, dict)
        or unverified_header.get("format") != FORMAT
        or unverified_header.get("bundle_id") != bundle_id
        or unverified_header.get("device_key_id") != device_key_id
        or unverified_header.get("chunk_size") != CHUNK_BYTES
    ):
        raise ValueError("header is for another bundle, device or format")
    entries = unverified_header.get("files")
    if not isinstance(entries, list) or len(entries) > MAX_FILES:
        raise ValueError("file list malformed or too long")
    sizes: dict[str, int] = {}
    for e in entries:
        size = e.get("size") if isinstance(e, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("file size malformed")
        sizes[_check_name(str(e.get("name")))] = size
    if len(sizes) != len(entries) or sum(sizes.values()) > max_bytes:
        raise ValueError("duplicate names or over the size limit")
    return prefix, sizes


def open_cache(
    unverified_blob: bytes | memoryview,
    *,
    bundle_id: str,
    key_store: KeyStore,
    max_bytes: int,
) -> dict[str, bytearray]:
    """Open a sealed cache for ``bundle_id`` with the device key: name -> plaintext.

    Any failure (format, bounds, another bundle or device, a changed byte) is one
    :class:`DecryptError`; the details go to the debug log only. The caller wipes the
    returned buffers when done.
    """
    blob = memoryview(unverified_blob)
    opened: dict[str, bytearray] = {}
    try:
        if len(blob) < len(MAGIC) + 4 or bytes(blob[: len(MAGIC)]) != MAGIC:
            raise ValueError("not a sealed engine cache")
        prefix, sizes = _unverified_layout(blob, bundle_id, key_store.key_id, max_bytes)
        body = len(prefix) + SEALED_KEY_LEN
        expected = body + sum(sealed_size(s, CHUNK_BYTES) for s in sizes.values())
        if expected != len(blob):
            raise ValueError("length does not match the header")
        cache_key = bytearray(
            unwrap_key(bytes(blob[len(prefix) : body]), key_store, info=_key_info(prefix))
        )
        try:
            if len(cache_key) != KEY_LEN:
                raise ValueError("cache key of the wrong length")
            pos = body
            for name in sorted(sizes):
                c = _cipher(bytes(cache_key), bundle_id, name, sizes[name])
                out = opened[name] = bytearray(sizes[name])
                view = memoryview(out)
                for i in range(c.count):
                    size = c.plaintext_len(i)
                    chunk = blob[pos : pos + size + TAG_LEN]
                    c.open_into(i, chunk, view[i * CHUNK_BYTES : i * CHUNK_BYTES + size])
                    pos += size + TAG_LEN
        finally:
            cache_key[:] = bytes(len(cache_key))
    except (ValueError, DecryptError, UnicodeDecodeError, AttributeError) as e:
        log.debug("sealed TensorRT engine cache refused: %r", e)
        for data in opened.values():
            data[:] = bytes(len(data))
        raise DecryptError("the sealed TensorRT engine cache failed to open") from None
    return opened


# --- RAM-only directories ----------------------------------------------------------


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def filesystem_type(path: Path, mountinfo: str) -> str:
    """The type of the file system ``path`` (absolute, resolved) lies on, from the text
    of ``/proc/self/mountinfo``: the last-mounted of the longest matching mount points."""
    best, kind = -1, ""
    target = str(path)
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if not sep or len(fields) < 5 or not post.split():
            continue
        mount = _unescape(fields[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:
            best, kind = len(mount), post.split()[0]
    return kind


def _mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")


def ram_bases(configured: str = "") -> list[Path]:
    """Where a RAM-only directory is looked for, in order."""
    if configured:
        return [Path(configured)]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    # /dev/shm is shared, but mkdtemp makes a fresh 0700 directory in it.
    shm = Path("/dev/shm")  # noqa: S108  # nosec B108 # a fresh mkdtemp dir, checked tmpfs
    return [*([Path(runtime)] if runtime else []), shm]


def make_ram_directory(bases: list[Path], *, mountinfo: str | None = None) -> Path:
    """A new mode-0700 directory on a RAM-only file system (tmpfs, ramfs) under the first
    of ``bases`` that is one; a disk-backed base is never used."""
    info = _mountinfo() if mountinfo is None else mountinfo
    seen = []
    for base in bases:
        resolved = base.resolve()
        kind = filesystem_type(resolved, info) if resolved.is_dir() else "missing"
        seen.append(f"{base} ({kind or 'unknown'})")
        if kind not in RAM_FILESYSTEMS:
            continue
        d = Path(tempfile.mkdtemp(prefix="edgeseal-trt-", dir=resolved))
        d.chmod(0o700)
        if filesystem_type(d, _mountinfo() if mountinfo is None else info) in RAM_FILESYSTEMS:
            return d
        d.rmdir()
    raise RuntimeBackendError(
        "no RAM-only directory for the TensorRT engine cache (tried: "
        f"{', '.join(seen)}); set [runtime] trt_engine_cache_ram_dir to a tmpfs"
    )


def _wipe_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        remaining = os.fstat(fd).st_size
        zeros = bytes(min(remaining, CHUNK_BYTES))
        while remaining > 0:
            remaining -= os.write(fd, zeros[:remaining])
    finally:
        os.close(fd)
    path.unlink()


def wipe_directory(directory: Path, *, remove: bool = True) -> None:
    """Overwrite every regular file under ``directory`` with zeros and unlink it (links
    are unlinked, never followed); remove the directory itself when ``remove``."""
    for entry in list(os.scandir(directory)):
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            wipe_directory(p)
        elif entry.is_file(follow_symlinks=False):
            _wipe_file(p)
        else:
            p.unlink()
    if remove:
        directory.rmdir()


# --- the store side ----------------------------------------------------------------


@dataclass
class EngineCache:
    """One bundle's engine cache: sealed in ``store_dir``, plaintext only in RAM."""

    store_dir: Path
    bundle_id: str
    key_store: KeyStore
    max_bytes: int
    ram_base: str = ""
    #: Kept sealed caches per model: this bundle's and the newest other (the other slot).
    keep: int = 2
    ram_dir: Path | None = None
    state: str = "not prepared"
    _sealed_digests: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_bundle_id(self.bundle_id):
            raise ValueError("bundle_id must be 32 hex digits")

    @property
    def sealed_path(self) -> Path:
        return self.store_dir / f"{self.bundle_id}.sealed"

    def _read_sealed(self) -> dict[str, bytearray]:
        try:
            size = self.sealed_path.stat().st_size
        except OSError:
            return {}
        # Largest possible sealed cache within max_bytes: header, key, one tag per chunk.
        bound = MAX_HEADER_BYTES + 12 + SEALED_KEY_LEN + self.max_bytes
        bound += TAG_LEN * (self.max_bytes // CHUNK_BYTES + MAX_FILES)
        if size > bound:
            log.warning("sealed TensorRT engine cache %s is too large: ignored", self.sealed_path)
            return {}
        try:
            unverified_blob = self.sealed_path.read_bytes()
        except OSError as e:
            log.warning("cannot read the sealed TensorRT engine cache: %s", e)
            return {}
        try:
            return open_cache(
                unverified_blob,
                bundle_id=self.bundle_id,
                key_store=self.key_store,
                max_bytes=self.max_bytes,
            )
        except DecryptError:
            log.warning(
                "sealed TensorRT engine cache %s does not open with this device key for "
                "bundle %s: ignored, TensorRT builds its engines afresh",
                self.sealed_path,
                self.bundle_id,
            )
            return {}

    def prepare(self) -> Path:
        """Make the RAM directory and fill it from the sealed cache; returns its path."""
        if self.ram_dir is not None:
            raise RuntimeError("the engine cache is already prepared")
        self.ram_dir = make_ram_directory(ram_bases(self.ram_base))
        files = self._read_sealed()
        try:
            self._write_plaintext(files)
        except BaseException:
            wipe_directory(self.ram_dir)  # never leave a partial plaintext directory
            self.ram_dir = None
            raise
        self.state = f"{len(files)} engine file(s) loaded from the sealed cache"
        return self.ram_dir

    def _write_plaintext(self, files: dict[str, bytearray]) -> None:
        assert self.ram_dir is not None
        try:
            for name, data in files.items():
                fd = os.open(
                    self.ram_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                )
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                self._sealed_digests[name] = hashlib.sha256(data).hexdigest()
        finally:
            for data in files.values():
                data[:] = bytes(len(data))

    def _plaintext_files(self) -> dict[str, bytes]:
        assert self.ram_dir is not None
        files: dict[str, bytes] = {}
        total = 0
        for entry in os.scandir(self.ram_dir):
            if not entry.is_file(follow_symlinks=False) or not _NAME.fullmatch(entry.name):
                log.warning("TensorRT engine cache: %s is not sealed (not a plain file)", entry)
                continue
            total += entry.stat(follow_symlinks=False).st_size
            if total > self.max_bytes or len(files) >= MAX_FILES:
                raise RuntimeBackendError(
                    "TensorRT's engine cache outgrew runtime.trt_engine_cache_max_bytes"
                )
            files[entry.name] = Path(entry.path).read_bytes()
        return files

    def persist(self) -> bool:
        """Seal new or changed engine files into the store, then wipe the plaintext
        (the directory stays for engines ORT builds later). True when written."""
        if self.ram_dir is None:
            return False
        try:
            files = self._plaintext_files()
            digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
            if all(self._sealed_digests.get(n) == d for n, d in digests.items()):
                return False
            merged: dict[str, bytes | bytearray] = {}
            if set(self._sealed_digests) - set(files):  # some were wiped after sealing
                merged.update(self._read_sealed())
            merged.update(files)
            sealed = seal_cache(
                merged, bundle_id=self.bundle_id, device_public_key=self.key_store.public_key
            )
            try:
                self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                atomic_write(self.sealed_path, sealed, mode=0o600)
            except OSError as e:  # a full disk costs the cache, not the model
                log.warning("cannot store the sealed TensorRT engine cache: %s", e)
                self.state = f"not stored ({e.strerror})"
                return False
            self._sealed_digests = {n: hashlib.sha256(d).hexdigest() for n, d in merged.items()}
            self.state = f"{len(merged)} engine file(s) sealed to the device key"
            self._prune()
            return True
        finally:
            wipe_directory(self.ram_dir, remove=False)

    def _prune(self) -> None:
        others = sorted(
            (p for p in self.store_dir.glob("*.sealed") if p != self.sealed_path),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for p in others[max(0, self.keep - 1) :]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def close(self) -> None:
        """Seal what is new, wipe the plaintext and remove the RAM directory."""
        if self.ram_dir is None:
            return
        try:
            self.persist()
        finally:
            with contextlib.suppress(FileNotFoundError):
                wipe_directory(self.ram_dir)
            self.ram_dir = None

    def status(self) -> str:
        return self.state
