"""Buffers for decrypted model bytes: locked in RAM, out of core dumps, wiped on close.

:class:`SecretBuffer` prefers ``memfd_secret`` (Linux 5.14+: the pages leave the
kernel's direct map and are locked), else an anonymous mapping with ``mlock`` and
``MADV_DONTDUMP``. What it managed to get is reported in :meth:`SecretBuffer.status`,
never silently assumed: an ``mlock`` refused by ``RLIMIT_MEMLOCK`` is stated there.

:class:`LockedBytes` is for an API that takes plaintext only as ``bytes`` (LiteRT's
``model_content``): a ``bytes`` object whose pages are locked and ``MADV_DONTDUMP``
before the plaintext is copied in, and wiped on close.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import platform
import sys
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["LockedBytes", "MemoryStatus", "SecretBuffer", "make_process_undumpable"]

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_SYS_MEMFD_SECRET = {"x86_64": 447, "aarch64": 447}.get(platform.machine())
PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class MemoryStatus:
    kind: str  # "memfd_secret" or "anonymous"
    locked: bool
    excluded_from_core_dumps: bool
    note: str

    def to_obj(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "locked": self.locked,
            "excluded_from_core_dumps": self.excluded_from_core_dumps,
            "note": self.note,
        }


def make_process_undumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: no core dumps, no same-uid ptrace of this process."""
    return bool(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def _memfd_secret(size: int) -> tuple[mmap.mmap, str] | None:
    if _SYS_MEMFD_SECRET is None or os.environ.get("EDGESEAL_NO_MEMFD_SECRET"):
        return None
    fd = int(_libc.syscall(_SYS_MEMFD_SECRET, 0))
    if fd < 0:
        return None
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size), ""
    except OSError as e:
        log.info("memfd_secret of %d bytes refused (%s); using mlock", size, e)
        return None
    finally:
        os.close(fd)


class SecretBuffer:
    """A writable buffer of ``size`` bytes for plaintext that must not reach disk or dumps."""

    def __init__(self, size: int) -> None:
        self.size = size
        mapped = _memfd_secret(size) if size else None
        if mapped is not None:
            self._mm = mapped[0]
            self._status = MemoryStatus(
                "memfd_secret", True, True, "pages removed from the kernel direct map"
            )
            self._locked = False  # memfd_secret pages are locked by the kernel itself
        else:
            self._mm = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            dontdump = False
            with contextlib.suppress(OSError, AttributeError):
                self._mm.madvise(mmap.MADV_DONTDUMP)
                dontdump = True
            self._locked = _libc.mlock(self._address(), max(size, 1)) == 0
            note = (
                ""
                if self._locked
                else (
                    f"mlock refused ({os.strerror(ctypes.get_errno())}): raise RLIMIT_MEMLOCK "
                    "(LimitMEMLOCK= in the unit) or the pages may be swapped"
                )
            )
            self._status = MemoryStatus("anonymous", self._locked, dontdump, note)
        self._base = memoryview(self._mm)
        self.view = self._base[:size]

    def _address(self) -> int:
        holder = ctypes.c_char.from_buffer(self._mm)
        try:
            return ctypes.addressof(holder)
        finally:
            del holder

    def status(self) -> MemoryStatus:
        return self._status

    def wipe(self) -> None:
        if self.size and not self._mm.closed:
            ctypes.memset(self._address(), 0, self.size)

    def close(self) -> None:
        """Wipe and unmap. Every view (numpy arrays, OrtValues) must be gone by now."""
        if self._mm.closed:
            return
        self.wipe()
        if self._locked:
            _libc.munlock(self._address(), max(self.size, 1))
        self.view.release()
        self._base.release()
        try:
            self._mm.close()
        except BufferError:
            # A view still exists (e.g. held by a traceback): the pages are already zero;
            # the mapping goes when the last view does.
            log.debug("secret buffer wiped; unmapping deferred until its views are released")

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Pages at the ends of a :class:`LockedBytes` may hold other heap objects, including
#: another LockedBytes: each one is unlocked, and given back to core dumps, only when the
#: last LockedBytes on it closes.
_edge_pages: dict[int, int] = {}
_edge_lock = threading.Lock()
_PAGE = mmap.PAGESIZE


def _address_of(data: bytes | memoryview) -> int:
    return int(np.frombuffer(data, np.uint8).ctypes.data)


def _protect(lo: int, hi: int) -> MemoryStatus:
    """MADV_DONTDUMP and mlock the heap pages [lo, hi), and say what was granted."""
    notes = []
    dontdump = _libc.madvise(lo, hi - lo, mmap.MADV_DONTDUMP) == 0
    if not dontdump:
        notes.append(f"MADV_DONTDUMP refused ({os.strerror(ctypes.get_errno())})")
    locked = _libc.mlock(lo, hi - lo) == 0
    if not locked:
        notes.append(
            f"mlock refused ({os.strerror(ctypes.get_errno())}): raise RLIMIT_MEMLOCK "
            "(LimitMEMLOCK= in the unit) or the pages may be swapped"
        )
    return MemoryStatus("heap", locked, dontdump, "; ".join(notes))


def _release(lo: int, hi: int) -> None:
    _libc.munlock(lo, hi - lo)
    _libc.madvise(lo, hi - lo, mmap.MADV_DODUMP)


class LockedBytes:
    """A ``bytes`` copy of ``source`` in locked, ``MADV_DONTDUMP`` pages, wiped on close.

    For an API that takes plaintext only as an immutable ``bytes`` and keeps that object
    as its storage (LiteRT's ``Interpreter(model_content=...)``). The object is allocated
    zero-filled, its pages are locked and excluded from core dumps, and only then is the
    plaintext copied in, straight from ``source``: no other copy is made. The pages at
    either end may also hold other heap objects; they are locked and left out of dumps
    with it. :meth:`close` zeroes the object in place (CPython ``bytes`` keep their data
    inline, so the holder sees zeros), and expects its holders to be gone by then.
    """

    def __init__(self, source: memoryview) -> None:
        self.size = source.nbytes
        self.data = bytes(self.size)  # calloc: zero pages, none of them written yet
        self._closed = False
        self._address = _address_of(self.data) if self.size else 0
        end = self._address + self.size
        self._lo = self._address // _PAGE * _PAGE
        self._hi = -(-end // _PAGE) * _PAGE
        self._status = MemoryStatus("heap", False, False, "empty: nothing to protect")
        if self.size:
            with _edge_lock:  # a LockedBytes closing now must not release a shared end
                self._status = _protect(self._lo, self._hi)
                for page in {self._lo, self._hi - _PAGE}:
                    _edge_pages[page] = _edge_pages.get(page, 0) + 1
            ctypes.memmove(self._address, _address_of(source), self.size)

    def status(self) -> MemoryStatus:
        return self._status

    def close(self) -> None:
        """Wipe the bytes in place, then give the pages back (the ends once no other
        LockedBytes shares them)."""
        if self._closed:
            return
        self._closed = True
        if not self.size:
            return
        ctypes.memset(self._address, 0, self.size)
        holders = sys.getrefcount(self.data) - 2  # this attribute and the call's argument
        if holders:
            log.debug("LockedBytes wiped while %d other references to it remain", holders)
        first, last = self._lo, self._hi - _PAGE
        with _edge_lock:
            for page in {first, last}:
                _edge_pages[page] -= 1
                if not _edge_pages[page]:
                    del _edge_pages[page]
                    _release(page, page + _PAGE)
        if last > first + _PAGE:
            _release(first + _PAGE, last)
        self.data = b""

    def __enter__(self) -> LockedBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
