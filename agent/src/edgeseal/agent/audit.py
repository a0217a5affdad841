"""A tamper-evident audit log of inference calls, kept on the device. Provisional API.

Files, side by side::

    <path>          the current segment: one canonical-JSON record per line
    <path>.1 ...    rotated segments, ``.1`` the newest; at most ``keep`` of them
    <path>.anchor   {"count", "head", "first_seq"}, replaced atomically after each fsync
    <path>.lock     held (``flock``) by the one :class:`AuditLog` writing this log

Each line is ``canonical_json(record)`` followed by ``\\n``. A record holds the caller's
fields plus ``seq`` (0, 1, 2, ... across rotations), ``time`` (UTC, to the second) and
``prev``: the SHA-256 (hex) of the previous line's bytes without their newline, the
previous segment's last line across a rotation, and 64 zeros for the very first record.
Editing or removing a line breaks ``prev`` in the line after it.

The anchor says how many records were written (``count``, which is also the next
``seq``), the hash of the last of them (``head``) and the first ``seq`` still kept after
rotation (``first_seq``). It catches what the chain cannot: a tail cut off, or the
oldest records removed. When a :class:`~edgeseal.hardware.floors.VersionFloors` is
given, ``count`` is also written to its ``"audit-log"`` counter, which only rises, so
putting back an older copy of the log *and* its anchor is caught as well.

Durability. Every record is written to the file at once (a process crash loses
nothing); ``fsync`` and the anchor update happen every ``flush_every`` records, so a power
cut loses at most the last ``flush_every - 1`` records, never anchored ones. Records
written after the last anchor update are reported as ``unanchored`` by
:func:`verify_log`, not as a problem: they are the ones that could still be lost.

A torn last line (a power cut mid-write leaves a line with no newline) is a normal crash
outcome, not an attack: it was never anchored. :func:`verify_log` reports it ("torn last
line") because it sees files, not history; reopening :class:`AuditLog` truncates it away
and chains the next record to the last complete line. We chose truncation over keeping
the fragment because a fragment cannot be part of the chain and appending after it would
merge two records into one unreadable line. Anything else :class:`AuditLog` finds on
opening that does not match the anchor or the counter (a tail shorter than the anchor, an
anchored record edited, the anchor missing beside records, a count below the counter)
makes it raise :class:`AuditError` instead of appending over the evidence: run
:func:`verify_log`, keep the files for inspection, and move the log and its anchor aside.
A log started from nothing begins at ``seq`` = the counter, so it verifies against it.

Limits, stated plainly:

- The chain is a hash chain, not a signature: anyone who can write the files can compute
  it. Root on the device can rewrite the whole log and the anchor consistently, and add
  forged records after the last real one, and :func:`verify_log` will not notice.
- With a hardware counter (``TpmFloors``, a TPM 2.0 NV counter) root cannot move the
  count back, so removing records is caught; a full rewrite with at least as many records
  still goes undetected. A ``FileFloors`` counter is just another file root can edit.
- ``TpmFloors`` raises a counter one increment at a time (one TPM command each, capped at
  4096 per raise), so a TPM-backed log costs one NV increment per record whatever
  ``flush_every`` is: mind the TPM's speed and NV wear at high inference rates.
- For stronger guarantees, ship the log off the device (each line as it is written, or
  the anchor's ``head`` periodically) to a collector the device cannot rewrite.

Cost, measured on the development machine (2-vCPU x86-64 VM, ext4 on a virtio disk
shared with other jobs, so the fsync figures vary run to run; 5-field record; five runs):

- ``flush_every=1``: 0.8-3.5 ms per append without a counter (median about 1.3 ms: an
  fsync of the log plus the anchor's atomic replace); 1.5-9 ms with a ``FileFloors``
  counter (median about 3.5 ms: the counter file is a second atomic replace).
- ``flush_every=100``: 32-52 µs per append, with or without the counter.

An SD card or eMMC on a board is slower per fsync; measure there before choosing.

One writer per log: a second :class:`AuditLog` on the same path, in this process or
another, raises :class:`AuditError`. Appends from many threads are serialised by a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from edgeseal.core.encoding import (
    canonical_json,
    format_time,
    parse_json_object,
    parse_time,
    utcnow,
)
from edgeseal.core.errors import EdgesealError
from edgeseal.core.files import atomic_write, fsync_dir
from edgeseal.hardware.floors import FileFloors, VersionFloors

__all__ = [
    "COUNTER",
    "AuditError",
    "AuditLog",
    "AuditReport",
    "audit_location",
    "read_records",
    "verify_log",
]

log = logging.getLogger(__name__)

#: The name of the monotonic counter the log's record count is written to.
COUNTER = "audit-log"
#: ``prev`` of the very first record.
ZERO_HASH = "0" * 64
#: The longest line (one record, without its newline) written or read.
MAX_RECORD_BYTES = 64 * 1024
#: :func:`verify_log` lists at most this many problems, then says how many more it found.
MAX_PROBLEMS = 100
_RESERVED = frozenset({"seq", "time", "prev"})
_HEX = frozenset("0123456789abcdef")


class AuditError(EdgesealError):
    """The audit log cannot be read, written, or safely appended to."""

    #: Where the log is broken (the default); reads and locks say their own hint.
    hint = (
        "check the log with `edgeseal agent audit verify`; keep the files for inspection and "
        "move the log and its anchor aside to start a new one"
    )


@dataclass(frozen=True)
class AuditReport:
    """The outcome of :func:`verify_log`. ``ok`` is true exactly when ``problems`` is empty.

    ``records`` counts the complete, readable lines. ``unanchored`` counts the records
    written after the anchor's last update (a crash between fsyncs): not a problem, but
    nothing vouches for them yet.
    """

    ok: bool
    records: int
    problems: list[str]
    unanchored: int = 0


# -- records and the anchor --------------------------------------------------------------


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_record(unverified_line: bytes) -> tuple[int, str]:
    """``(seq, prev)`` of one line; ``ValueError`` if it is not an audit record."""
    obj = parse_json_object(unverified_line, "the line")
    seq, prev = obj.get("seq"), obj.get("prev")
    if not _is_count(seq):
        raise ValueError("seq is missing or not a non-negative integer")
    if not _is_hash(prev):
        raise ValueError("prev is missing or not a SHA-256 hex digest")
    assert isinstance(seq, int)
    assert isinstance(prev, str)
    return seq, prev


@dataclass(frozen=True)
class _Anchor:
    count: int
    head: str
    first_seq: int

    def __post_init__(self) -> None:
        if not (_is_count(self.count) and _is_count(self.first_seq)):
            raise ValueError("anchor count and first_seq must be non-negative integers")
        if self.first_seq > self.count:
            raise ValueError("anchor first_seq is beyond its count")
        if not _is_hash(self.head):
            raise ValueError("anchor head must be a SHA-256 hex digest")

    @classmethod
    def parse(cls, unverified: bytes) -> _Anchor:
        obj = parse_json_object(unverified, "the anchor")
        if set(obj) != {"count", "head", "first_seq"}:
            raise ValueError("the anchor must hold exactly count, head and first_seq")
        return cls(obj["count"], obj["head"], obj["first_seq"])

    def to_bytes(self) -> bytes:
        return canonical_json({"count": self.count, "head": self.head, "first_seq": self.first_seq})


# -- the checks: lines and an anchor in, a report out (no I/O) ---------------------------


@dataclass
class _ChainCheck:
    """Fed every line of the log, oldest first; :meth:`finish` gives the report."""

    anchor: _Anchor | None
    anchor_error: str | None
    floor: int | None
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    anchored_hash: str | None = None
    prev_hash: str | None = None  # hash of the line before; None before the first line
    prev_seq: int | None = None  # its seq; None if it was unreadable
    prev_where: str = ""
    seen_line: bool = False

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1

    def line(
        self, where: str, unverified_line: bytes | None, *, complete: bool, final: bool
    ) -> None:
        """One line (``None``: longer than the limit); ``complete``: it ended in a newline."""
        if not complete:
            if final:
                self.problem(f"{where}: torn last line (no newline: a write was cut off)")
            else:
                self.problem(f"{where}: line without a newline inside a rotated segment")
            return  # a torn line is not a record; the next segment chains to the line before
        first_line, self.seen_line = not self.seen_line, True
        if unverified_line is None:
            self.problem(f"{where}: longer than {MAX_RECORD_BYTES} bytes")
            self.prev_hash, self.prev_seq, self.prev_where = None, None, where
            return
        line_hash = _line_hash(unverified_line)
        try:
            seq, prev = _parse_record(unverified_line)
        except ValueError as e:
            self.problem(f"{where}: not an audit record ({e})")
            self.prev_hash, self.prev_seq, self.prev_where = line_hash, None, where
            return
        self.records += 1
        if first_line:
            self.first_seq = seq
            if seq == 0 and prev != ZERO_HASH:
                self.problem(f"{where}: the first record's prev is not 64 zeros")
        else:
            if self.prev_seq is not None and seq != self.prev_seq + 1:
                self.problem(
                    f"{where}: seq {seq} follows seq {self.prev_seq} in {self.prev_where} "
                    "(records removed, duplicated or reordered)"
                )
            if self.prev_hash is not None and prev != self.prev_hash:
                self.problem(f"{where}: prev does not match {self.prev_where} (edited or removed)")
        if self.anchor is not None and seq == self.anchor.count - 1:
            self.anchored_hash = line_hash
        self.last_seq = seq
        self.prev_hash, self.prev_seq, self.prev_where = line_hash, seq, where

    def finish(self) -> AuditReport:
        log_count = 0 if self.last_seq is None else self.last_seq + 1
        unanchored = 0
        anchor = self.anchor
        if self.anchor_error is not None:
            self.problem(self.anchor_error)
        elif anchor is None:
            if self.seen_line or self.floor:
                self.problem("the anchor file is missing (deleted, or the log was replaced)")
        else:
            if self.first_seq is not None and self.first_seq > anchor.first_seq:
                self.problem(
                    f"log starts at seq {self.first_seq} but the anchor says records from seq "
                    f"{anchor.first_seq} are kept (oldest records removed)"
                )
            if log_count < anchor.count:
                self.problem(
                    f"log ends at {log_count} records but the anchor says {anchor.count} "
                    "(tail cut off)"
                )
            else:
                unanchored = log_count - anchor.count
                if anchor.count > anchor.first_seq and self.anchored_hash != anchor.head:
                    self.problem(
                        f"record seq {anchor.count - 1} does not match the anchor's head hash "
                        "(the last anchored record was edited)"
                    )
        if self.floor is not None:
            claimed = anchor.count if anchor is not None else log_count
            if claimed < self.floor:
                what = "anchor count" if anchor is not None else "log count"
                self.problem(
                    f"{what} {claimed} is below the monotonic counter {self.floor} "
                    "(log and anchor rolled back)"
                )
        if self.more_problems:
            self.problems.append(f"... and {self.more_problems} more problems")
        return AuditReport(not self.problems, self.records, self.problems, unanchored)


# -- files -------------------------------------------------------------------------------


def _anchor_path(path: Path) -> Path:
    return path.with_name(path.name + ".anchor")


def _segment_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def _segments(path: Path) -> dict[int, Path]:
    """Rotated segments by number (``.1`` newest); gaps are allowed (a crash mid-rotation)."""
    out: dict[int, Path] = {}
    prefix = path.name + "."
    if not path.parent.is_dir():
        return out
    for p in path.parent.iterdir():
        suffix = p.name[len(prefix) :]
        if p.name.startswith(prefix) and suffix.isascii() and suffix.isdigit():
            n = int(suffix)
            if n >= 1 and str(n) == suffix:
                out[n] = p
    return out


def _read_lines(f: BinaryIO) -> Iterator[tuple[bytes | None, bool]]:
    """``(line without newline or None if over the limit, ended with a newline)``."""
    while True:
        chunk = f.readline(MAX_RECORD_BYTES + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n"):
            yield chunk[:-1], True
        elif len(chunk) <= MAX_RECORD_BYTES:
            yield chunk, False  # end of file without a newline
            return
        else:
            while chunk and not chunk.endswith(b"\n"):
                chunk = f.readline(1 << 16)
            yield None, bool(chunk)


def _read_tail(path: Path) -> tuple[bytes | None, int]:
    """The last complete line of ``path`` (or ``None``) and the offset where it ends."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (2 * MAX_RECORD_BYTES + 2))  # a torn fragment + a whole line
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        if start > 0:
            raise AuditError(f"{path} ends in more than {MAX_RECORD_BYTES} bytes without a newline")
        return None, 0
    begin = data.rfind(b"\n", 0, end) + 1
    if begin == 0 and start > 0:
        raise AuditError(f"{path} ends in a line longer than {MAX_RECORD_BYTES} bytes")
    return data[begin:end], start + end + 1


def _first_seq(path: Path) -> int | None:
    with path.open("rb") as f:
        for line, complete in _read_lines(f):
            if line is None or not complete:
                break
            try:
                return _parse_record(line)[0]
            except ValueError:
                break
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- verification ------------------------------------------------------------------------


def audit_location(home: Path, configured: str) -> tuple[Path, FileFloors]:
    """The agent's log (``[agent] audit_log`` or ``<home>/audit.log``) and its counter, a
    file: a TPM NV counter would take one increment per record."""
    return (
        Path(configured) if configured else home / "audit.log",
        FileFloors(home / "audit-counter.json"),
    )


def verify_log(path: Path, floors: VersionFloors | None = None) -> AuditReport:
    """Check the log at ``path``: rotated segments oldest first, then the current file.

    Every line must be a record, ``seq`` consecutive and ``prev`` chained; the anchor's
    count and head must match the log; with ``floors``, the anchor's count must not be
    below the ``"audit-log"`` counter. Problems are reported, not raised; an unreadable
    file, or no log and no anchor at ``path``, raises :class:`AuditError`.
    """
    path = Path(path)
    try:
        files = [p for _, p in sorted(_segments(path).items(), reverse=True)]
        if path.exists():
            files.append(path)
        anchor: _Anchor | None = None
        anchor_error: str | None = None
        try:
            unverified_anchor = _anchor_path(path).read_bytes()
        except FileNotFoundError:
            if not files:
                raise AuditError(f"no audit log and no anchor at {path}", hint="") from None
        else:
            try:
                anchor = _Anchor.parse(unverified_anchor)
            except ValueError as e:
                anchor_error = f"the anchor file is unreadable ({e})"
        floor = floors.get(COUNTER) if floors is not None else None
        check = _ChainCheck(anchor, anchor_error, floor)
        for i, segment in enumerate(files):
            with segment.open("rb") as f:
                for number, (line, complete) in enumerate(_read_lines(f), 1):
                    where = f"{segment.name} line {number}"
                    check.line(where, line, complete=complete, final=i == len(files) - 1)
    except OSError as e:
        raise AuditError(f"cannot read the audit log at {path}: {e}", hint="") from e
    return check.finish()


def read_records(
    path: Path, *, since: datetime | None = None, model: str | None = None
) -> Iterator[dict[str, Any]]:
    """The records of the log at ``path``, oldest first (rotated segments, then the
    current file): those at or after ``since`` (timezone-aware) and of ``model``, when
    given. For reading only: it checks nothing (:func:`verify_log` does). A line that is
    not a record (torn, over the limit, not JSON, no valid ``time``) is skipped; an
    unreadable file raises :class:`AuditError`, and no log at all as well.
    """
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    path = Path(path)
    files = [p for _, p in sorted(_segments(path).items(), reverse=True)]
    if path.exists():
        files.append(path)
    if not files:
        raise AuditError(f"no audit log at {path}", hint="")
    for segment in files:
        try:
            with segment.open("rb") as f:
                for unverified_line, complete in _read_lines(f):
                    if unverified_line is None or not complete:
                        continue
                    try:
                        record = parse_json_object(unverified_line, "the line")
                        when = parse_time(record.get("time"), "time")
                    except ValueError:
                        continue
                    if since is not None and when < since:
                        continue
                    if model is not None and record.get("model") != model:
                        continue
                    yield record
        except FileNotFoundError:
            continue  # rotated away while being read
        except OSError as e:
            raise AuditError(f"cannot read the audit log at {segment}: {e}", hint="") from e


# -- appending ---------------------------------------------------------------------------


class AuditLog:
    """Append records to the log at ``path``; see the module docstring for the format.

    ``flush_every``: fsync and update the anchor (and the counter) every so many records.
    ``max_bytes``: rotate the current file once it is larger. ``keep``: rotated segments
    kept (at least 1). Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: Path,
        floors: VersionFloors | None = None,
        *,
        flush_every: int = 1,
        max_bytes: int = 16 * 1024 * 1024,
        keep: int = 5,
    ) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if keep < 1:
            raise ValueError("keep must be at least 1 (the chain continues across segments)")
        self.path = Path(path)
        self._floors = floors
        self._flush_every = flush_every
        #: Why the last append or sync failed; None once one succeeds again.
        self.last_error: str | None = None
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending = 0
        self._size = 0
        self._next_seq = 0
        self._head = ZERO_HASH
        self._first_seq = 0
        self._time_second = -1
        self._time_text = ""
        self._written = 0
        self._last_written: float | None = None
        self._writer_fd: int | None = self._take_writer_lock()
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    @property
    def written(self) -> tuple[int, float | None]:
        """(records this log object wrote, the Unix time of the last; None before any):
        what /metrics reports."""
        with self._lock:
            return self._written, self._last_written

    @property
    def batched(self) -> bool:
        """Records are fsync'd in batches (``flush_every`` > 1), not one by one."""
        return self._flush_every > 1

    # -- opening

    def _take_writer_lock(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise AuditError(
                f"the audit log {self.path} is already open for writing (lock {lock_path})",
                hint="another edgeseal agent runs on this home: stop it first, "
                "or give this one a home of its own (--home)",
            ) from e
        return fd

    def _open(self) -> None:
        try:
            self._recover()
            self._open_segment()
        except OSError as e:
            raise AuditError(f"cannot open the audit log {self.path}: {e}", hint="") from e
        anchor = self._load_anchor()
        if anchor is None or anchor.count != self._next_seq:
            self._sync_locked()  # a new log, or records written after the last anchor

    def _open_segment(self) -> None:
        """Open the current segment for appending; its size is what is on disk."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _load_anchor(self) -> _Anchor | None:
        try:
            unverified = _anchor_path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _Anchor.parse(unverified)
        except ValueError as e:
            raise AuditError(f"the anchor of {self.path} is unreadable: {e}") from e

    def _last_complete_line(self) -> bytes | None:
        """The line the chain continues from, after truncating a torn last line away."""
        tail: bytes | None = None
        if self.path.exists():
            tail, end = _read_tail(self.path)
            size = self.path.stat().st_size
            if end < size:
                log.warning(
                    "audit log %s: truncating a torn last line (%d bytes)", self.path, size - end
                )
                with self.path.open("r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        segments = _segments(self.path)
        for n in sorted(segments):  # newest rotated segment first
            if tail is not None:
                break
            tail, _ = _read_tail(segments[n])
        return tail

    def _recover(self) -> None:
        """Find where the chain ends; check it against the anchor and the counter before
        anything is appended."""
        tail = self._last_complete_line()
        anchor = self._load_anchor()
        floor = self._floors.get(COUNTER) if self._floors is not None else 0
        where = f"the audit log {self.path}"
        if tail is None:
            if anchor is None:  # a new log: start at the counter so it verifies against it
                self._next_seq = self._first_seq = floor
                self._head = ZERO_HASH
            elif anchor.count > anchor.first_seq:
                raise AuditError(f"{where} is empty but its anchor says {anchor.count} records")
            else:
                self._next_seq, self._first_seq = anchor.count, anchor.first_seq
                self._head = anchor.head
        else:
            try:
                seq, _ = _parse_record(tail)
            except ValueError as e:
                raise AuditError(f"the last line of {where} is not a record: {e}") from e
            self._next_seq, self._head = seq + 1, _line_hash(tail)
            if anchor is None:
                raise AuditError(f"{where} has records but its anchor file is missing")
            if self._next_seq < anchor.count:
                raise AuditError(
                    f"{where} ends at {self._next_seq} records but its anchor says "
                    f"{anchor.count} (tail cut off)"
                )
            if anchor.count > anchor.first_seq and anchor.head != self._hash_of(anchor.count - 1):
                raise AuditError(
                    f"record seq {anchor.count - 1} of {where} does not match its anchor"
                )
            self._first_seq = anchor.first_seq
        claimed = anchor.count if anchor is not None else self._next_seq
        if claimed < floor:
            raise AuditError(
                f"the anchor count {claimed} of {where} is below the monotonic counter {floor} "
                "(log and anchor rolled back)"
            )

    def _hash_of(self, seq: int) -> str | None:
        """The hash of the line with ``seq`` (the last one, unless a crash left records
        after the anchor: then the log is read from the start)."""
        if seq == self._next_seq - 1:
            return self._head
        files = [p for _, p in sorted(_segments(self.path).items(), reverse=True)]
        for segment in [*files, self.path]:
            with segment.open("rb") as f:
                for line, complete in _read_lines(f):
                    if line is None or not complete:
                        continue
                    with contextlib.suppress(ValueError):
                        if _parse_record(line)[0] == seq:
                            return _line_hash(line)
        return None

    # -- writing

    def _now(self) -> str:
        """The record time (UTC, to the second), formatted once per second."""
        second = int(time.time())
        if second != self._time_second:
            self._time_second = second
            self._time_text = format_time(utcnow())
        return self._time_text

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record (the caller's fields plus ``seq``, ``time``, ``prev``); return it.

        ``TypeError``/``ValueError`` for fields that are not JSON, use a reserved name, or
        make a line longer than ``MAX_RECORD_BYTES``; :class:`AuditError` if the write fails.
        """
        fields = dict(record)
        if not all(isinstance(k, str) for k in fields):
            raise TypeError("audit record field names must be strings")
        clash = _RESERVED & fields.keys()
        if clash:
            raise ValueError(f"audit record fields {sorted(clash)} are set by the log")
        with self._lock:
            if self._writer_fd is None:  # released by close()
                raise RuntimeError("the audit log is closed")
            try:
                out = self._append_locked(fields)
            except AuditError as e:
                self.last_error = str(e)
                raise
            self.last_error = None
        return out

    def _append_locked(self, fields: dict[str, Any]) -> dict[str, Any]:
        if self._fd is None:  # a rotation failed after closing the old file: reopen
            try:
                self._open_segment()
            except OSError as e:
                raise AuditError(f"cannot reopen the audit log {self.path}: {e}") from e
        if self._size > self._max_bytes:
            self._rotate_locked()
        out = {
            **fields,
            "seq": self._next_seq,
            "time": self._now(),
            "prev": self._head,
        }
        line = canonical_json(out)
        if len(line) > MAX_RECORD_BYTES:
            raise ValueError(f"audit record is longer than {MAX_RECORD_BYTES} bytes")
        fd = self._fd
        assert fd is not None  # opened above, or by the rotation
        try:
            _write_all(fd, line + b"\n")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)  # no partial line left behind
            raise AuditError(f"cannot write the audit log {self.path}: {e}") from e
        self._next_seq += 1
        self._head = _line_hash(line)
        self._size += len(line) + 1
        self._pending += 1
        self._written += 1
        self._last_written = time.time()
        if self._pending >= self._flush_every:
            self._sync_locked()
        return out

    def flush(self) -> None:
        """fsync the records written so far and update the anchor and the counter."""
        with self._lock:
            if self._fd is not None and self._pending:
                try:
                    self._sync_locked()
                except AuditError as e:
                    self.last_error = str(e)
                    raise

    def _sync_locked(self) -> None:
        assert self._fd is not None
        anchor = _Anchor(self._next_seq, self._head, self._first_seq)
        try:
            os.fsync(self._fd)
            atomic_write(_anchor_path(self.path), anchor.to_bytes(), mode=0o600)
        except OSError as e:
            raise AuditError(f"cannot sync the audit log {self.path}: {e}") from e
        # The counter rises only after the anchor is written: a crash between the two
        # leaves the counter below the anchor (fine), never above it (a false rollback).
        if self._floors is not None:
            self._floors.raise_to(COUNTER, self._next_seq)
        self._pending = 0

    def _rotate_locked(self) -> None:
        """Current file -> ``.1``, ``.n`` -> ``.n+1``, beyond ``keep`` dropped.

        The anchor's ``first_seq`` is raised before anything is dropped, so a crash midway
        leaves extra old records (allowed), never missing ones.
        """
        assert self._fd is not None
        if self._pending:
            self._sync_locked()
        segments = _segments(self.path)
        survivors = [segments[n] for n in sorted(segments, reverse=True) if n + 1 <= self._keep]
        try:
            for candidate in [*survivors, self.path]:  # oldest kept first
                first = _first_seq(candidate)
                if first is not None:
                    self._first_seq = first
                    break
            anchor = _Anchor(self._next_seq, self._head, self._first_seq)
            atomic_write(_anchor_path(self.path), anchor.to_bytes(), mode=0o600)
            for n in sorted(segments, reverse=True):
                if n + 1 > self._keep:
                    segments[n].unlink()
                else:
                    segments[n].replace(_segment_path(self.path, n + 1))
            self.path.replace(_segment_path(self.path, 1))
            os.close(self._fd)
            self._fd = None
            self._open_segment()
            fsync_dir(self.path.parent)
        except OSError as e:
            raise AuditError(f"cannot rotate the audit log {self.path}: {e}") from e

    # -- closing

    def close(self) -> None:
        """Sync what is pending and release the log. Calling it again does nothing."""
        with self._lock:
            try:
                if self._fd is not None and self._pending:
                    self._sync_locked()
            finally:
                self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._writer_fd is not None:
            os.close(self._writer_fd)  # also releases the flock
            self._writer_fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
