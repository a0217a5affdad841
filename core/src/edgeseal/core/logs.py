"""How the long-running commands log: plain text or one JSON object per line, on stderr.

Lines carry a timestamp unless stderr is connected to journald, which stamps each line
itself: systemd then sets ``$JOURNAL_STREAM`` to ``DEV:INODE`` of that stream, and the
variable counts only when it matches stderr (a child of a service inherits the variable
with a stderr of its own), as ``systemd.exec(5)`` says to check it.

Stable API: ``LogFormat``, ``configure_logging``, ``JsonFormatter``, ``under_journald``.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO

__all__ = ["JsonFormatter", "LogFormat", "configure_logging", "under_journald"]


class LogFormat(str, enum.Enum):
    """``--log-format``: ``text`` for people, ``json`` for log shippers."""

    TEXT = "text"
    JSON = "json"


def under_journald(environ: Mapping[str, str], stream_stat: os.stat_result | None) -> bool:
    """True when ``$JOURNAL_STREAM`` names the stream whose ``fstat`` is ``stream_stat``."""
    value = environ.get("JOURNAL_STREAM", "")
    if stream_stat is None or ":" not in value:
        return False
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    return (int(dev), int(ino)) == (stream_stat.st_dev, stream_stat.st_ino)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (unless omitted), ``level``, ``logger``,
    ``message``, and ``exception`` with the traceback text when the record has one."""

    def __init__(self, *, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {}
        if self.timestamps:
            when = datetime.fromtimestamp(record.created, tz=timezone.utc)
            entry["time"] = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry["level"] = record.levelname
        entry["logger"] = record.name
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def _stat(stream: IO[str]) -> os.stat_result | None:
    try:
        return os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO), or closed
        return None


def configure_logging(
    stream: IO[str],
    *,
    level: int = logging.INFO,
    log_format: LogFormat = LogFormat.TEXT,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` in
    ``log_format``; replaces handlers set before, so calling it twice does not double
    lines. Returns the handler."""
    env = os.environ if environ is None else environ
    timestamps = not under_journald(env, _stat(stream))
    handler = logging.StreamHandler(stream)
    if log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(timestamps=timestamps))
    else:
        stamp = "%(asctime)s " if timestamps else ""
        handler.setFormatter(logging.Formatter(stamp + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
