"""Loaded by every Python process of the test command's faketime lane (scripts/test puts
this folder on PYTHONPATH), and nowhere else.

The lane runs with the wall clock 400 days ahead (libfaketime, ``faketime -f +400d``) and
the monotonic clock real (``FAKETIME_DONT_FAKE_MONOTONIC=1``: a faked monotonic clock
makes CPython's timed lock waits, ``sem_clockwait``, wait for 400 days). Debian's
libfaketime 0.9.10 then shifts the absolute monotonic deadline of ``clock_nanosleep``,
which ``time.sleep`` uses since Python 3.11, into the past: every sleep fails with
EINVAL. Here ``time.sleep`` waits in ``select`` instead, on the real monotonic clock.
"""

from __future__ import annotations

import select
import time


def _sleep(secs: float) -> None:
    if secs < 0:
        raise ValueError("sleep length must be non-negative")
    end = time.monotonic() + secs
    while (left := end - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
