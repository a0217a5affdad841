"""Crash-safe file writes. Stable API.

A file edgeseal writes is either the old one or the complete new one, never a partial
one: write to a temporary file in the same directory, fsync, rename over, fsync the
directory. A write cut short (a kill, a power cut) can leave its temporary file behind;
:func:`leftover_temps` finds those, for an owner that knows no write is in progress.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgeseal.core.errors import PathError

__all__ = [
    "atomic_write",
    "atomic_writer",
    "describe_os_error",
    "fsync_dir",
    "leftover_temps",
    "reported_as_path_error",
    "synced_temp",
    "temp_path_for",
]

#: Random bytes in a temporary file's name (as hex digits), after the writer's pid.
_TEMP_TOKEN_BYTES = 4
#: The errors that mean the disk (or the user's quota) is full.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(e: OSError) -> str:
    """Why a file operation failed, for people: a full disk or quota reads "no space left
    on the device", anything else its system message."""
    if e.errno in _NO_SPACE:
        return "no space left on the device"
    return e.strerror or str(e)


def _concerns(failed: Path, path: Path) -> bool:
    """Whether an OS error on ``failed`` is about ``path``: the path itself, a directory on
    the way to it, something inside it, or the temporary file written beside it."""
    return (
        failed == path
        or failed in path.parents
        or path in failed.parents
        or (failed.parent == path.parent and failed.name.startswith(f".{path.name}."))
    )


@contextlib.contextmanager
def reported_as_path_error(path: Path, doing: str) -> Iterator[None]:
    """For a path the user gave (``--out``, ``--home``, ``--keys-dir``): an ``OSError``
    about it inside the block becomes a :class:`PathError` naming it ("cannot ``doing``
    PATH: why"). OS errors about other files pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.filename is None or not _concerns(Path(os.fsdecode(e.filename)), Path(path)):
            raise
        raise PathError.from_os_error(e, path, doing, creating=True) from e


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A new name for the temporary file a write of ``path`` goes through before it is
    renamed over ``path``: hidden, in the same directory, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp")


def leftover_temps(path: Path) -> list[Path]:
    """The temporary files of writes of ``path`` (:func:`temp_path_for`, any process) that
    are still on disk. Only the caller can tell they are stale: a write in progress has
    one too, so call this under whatever lock the writers of ``path`` hold."""
    hex_digits = 2 * _TEMP_TOKEN_BYTES
    name = re.compile(rf"\.{re.escape(path.name)}\.[0-9]+\.[0-9a-f]{{{hex_digits}}}\.tmp")
    try:
        return sorted(p for p in path.parent.iterdir() if name.fullmatch(p.name))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def synced_temp(path: Path, *, mode: int = 0o644) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield a new temporary file beside ``path`` to write, and its name. When the block
    finishes the file is synced and has ``mode``; on any failure it is removed. Putting
    it in ``path``'s place is the caller's (:func:`atomic_writer` does it at once; the
    model store writes its journal first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file to write; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    with synced_temp(path, mode=mode) as (f, tmp):
        yield f
    try:
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or pieces of it) to ``path`` atomically."""
    with atomic_writer(path, mode=mode) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            for piece in data:
                f.write(piece)
