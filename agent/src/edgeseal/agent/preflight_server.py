"""The pre-flight server: a long-lived process that forks one child per model check.

Starting a fresh interpreter and importing what a check needs costs a third of a second
or more per check. The server pays it once: the agent starts it (as a subprocess, never
by forking the threaded daemon); it imports what the checks need (see :func:`_warm_up`)
and then waits, single-threaded, on its control socket (its stdin). For each check the
agent sends a request carrying the check's deadline and, as ``SCM_RIGHTS``, one end of
a fresh socket pair. The server forks; the child reads the request and the model from
that socket (never from a file), runs :func:`edgeseal.agent.preflight.answer_for` and
answers on the same socket, then ``_exit``\\ s. The server waits for the child until the
deadline, kills it with SIGKILL past it, and reports how it ended on the control socket
(:data:`STATUS`).

What a hostile model can do to a child (crash it, hang it, exhaust memory: the child's
``oom_score_adj`` makes it the OOM killer's first choice) ends in that child. The server
never sees a model byte; the child that did exits, so the kernel disposes of its copy.
When the control socket closes (the agent stopped or dropped it) the server exits.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

__all__ = ["REQUEST", "STATUS", "serve"]

#: Request on the control socket: b"C" and the deadline in seconds (plus the socket's fd).
REQUEST = struct.Struct(">cd")
#: Status on the control socket: the child's exit status (negative: killed by that
#: signal) and whether the server killed it at the deadline.
STATUS = struct.Struct(">i?")


def _warm_up() -> None:
    """Import what the checks use, once, before any fork: everything but ONNX Runtime,
    whose import starts a native thread (forking a process with threads can leave the
    child holding a lock no thread will release). The child imports it (a tenth of the
    start-up cost; ``onnx`` and its ``ml_dtypes`` are most of the rest). A device may
    lack a runtime (a LiteRT-only board has no ``onnx``): what is missing is the child's
    to report, for the model that needs it."""
    for module in ("numpy", "onnx", "edgeseal.core.ortsession", "edgeseal.agent.preflight"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with contextlib.suppress(Exception):  # LiteRT or tflite-runtime, if either is here
        from edgeseal.agent.runtimes import find_tflite_interpreter

        find_tflite_interpreter()


def _child(conn: socket.socket) -> None:
    """In the forked child: one check, one answer, then ``_exit`` (never return)."""
    status = 1
    try:
        with contextlib.suppress(OSError):  # be the one the OOM killer takes
            Path("/proc/self/oom_score_adj").write_text("1000")
        from edgeseal.agent.preflight import answer_for

        data = bytearray()
        while chunk := conn.recv(1 << 20):
            data += chunk
        answer = answer_for(bytes(data))
        with contextlib.suppress(OSError):  # the agent gave up: nobody to answer
            conn.sendall(answer)
        status = 0
    finally:
        os._exit(status)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """Reap child ``pid``; SIGKILL it first if it outlives ``timeout`` seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        timed_out = False
        while not poller.poll(math.ceil(max(0.0, deadline - time.monotonic()) * 1000)):
            if time.monotonic() >= deadline:
                os.kill(pid, 9)  # not reaped yet, so the pid is still this child's
                timed_out = True
                break
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), timed_out


def serve(ctl: socket.socket) -> None:
    """Answer check requests on ``ctl`` until it closes."""
    _warm_up()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, REQUEST.size, 1)
        except OSError:
            return
        if len(msg) != REQUEST.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return  # the agent went away, or does not speak this protocol
        _, timeout = REQUEST.unpack(msg)
        conn = socket.socket(fileno=fds[0])
        pid = os.fork()
        if pid == 0:
            ctl.close()
            _child(conn)
        conn.close()
        code, timed_out = _wait(pid, timeout)
        try:
            ctl.sendall(STATUS.pack(code, timed_out))
        except OSError:
            return


def main() -> None:
    """The server's entry: stdin is the control socket; stdout goes to stderr, so what a
    runtime prints lands in the log."""
    from edgeseal.agent.memory import make_process_undumpable

    make_process_undumpable()  # inherited by every forked child
    os.dup2(2, 1)
    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        serve(ctl)
    finally:
        ctl.close()
    sys.exit(0)
