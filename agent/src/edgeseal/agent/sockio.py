"""Socket I/O both ends of the local API share.

A Python socket with a timeout polls before every ``recv`` and ``send`` (and its
``settimeout`` is an ``ioctl``): three system calls where one would do. Here the kernel
bounds a blocking call instead (``SO_RCVTIMEO``/``SO_SNDTIMEO``), and a call that would
wait past its bound fails, which the callers turn into :class:`TimeoutError` as a Python
timeout does. Where the kernel's ``timeval`` is not laid out as packed here (some 32-bit
systems), :func:`kernel_timeouts` says so and the caller bounds its waits itself.

A bound per call does not bound a whole exchange: a peer taking a byte now and then
satisfies every call. A sender with a deadline (the agent answering) therefore sends
without blocking and waits with ``poll`` for what is left of its deadline.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time

__all__ = ["kernel_timeouts", "nbytes", "send_all"]

#: ``struct timeval`` as the kernel takes it: two C longs, or two 64-bit fields on 32-bit
#: systems built with a 64-bit ``time_t`` (where ``SO_RCVTIMEO`` is the ``_NEW`` option).
_TIMEVAL_LAYOUTS = ("ll", "qq")


def _timeval(layout: str, seconds: float) -> bytes:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole < 0 or (whole == 0 and micro <= 0):
        whole, micro = 0, 1  # zero (or less) would mean "wait for ever" to the kernel
    return struct.pack(layout, whole, micro)


def _set(sock: socket.socket, option: int, layout: str, seconds: float) -> bool:
    """Set ``option`` and read it back: True when the kernel holds what was meant."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, _timeval(layout, seconds))
        whole, micro = struct.unpack(
            layout, sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize(layout))
        )
    except (OSError, struct.error):
        return False
    return bool(abs(whole + micro / 1_000_000 - seconds) < 0.05)  # the kernel keeps jiffies


def kernel_timeouts(sock: socket.socket, *, recv: float, send: float) -> bool:
    """Make ``sock`` blocking with the kernel bounding each recv by ``recv`` seconds and
    each send by ``send``. False where the kernel does not take them (the socket then
    blocking without bounds: the caller bounds its waits)."""
    sock.settimeout(None)
    for layout in _TIMEVAL_LAYOUTS:
        if _set(sock, socket.SO_RCVTIMEO, layout, recv) and _set(
            sock, socket.SO_SNDTIMEO, layout, send
        ):
            return True
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):  # none half set
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, bytes(struct.calcsize("ll")))
    return False


def nbytes(part: bytes | memoryview) -> int:
    """The bytes ``part`` puts on the wire (a memoryview's ``len`` counts its items)."""
    return part.nbytes if isinstance(part, memoryview) else len(part)


def send_all(
    sock: socket.socket, parts: list[bytes | memoryview], deadline: float | None = None
) -> None:
    """Send ``parts`` in as few system calls as the kernel allows (scatter/gather).

    With ``deadline`` (``time.monotonic``), all of it must be taken by then, however the
    peer paces its reads: sends do not block, and the wait for room is a ``poll`` for
    what is left of the deadline. Without, each send blocks as the socket says. A peer
    not taking the data in time is a TimeoutError."""
    flags = 0 if deadline is None else socket.MSG_DONTWAIT
    try:
        sent = sock.sendmsg(parts, (), flags)
    except BlockingIOError:
        if deadline is None:  # the kernel's send timeout
            raise TimeoutError("the peer did not take the data in time") from None
        sent = 0
    if sent == sum(map(nbytes, parts)):
        return
    views = [memoryview(p).cast("B") for p in parts if nbytes(p)]
    waiter: select.poll | None = None
    while True:
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
        if not views:
            return
        if deadline is not None:
            if waiter is None:
                waiter = select.poll()
                waiter.register(sock, select.POLLOUT)
            left = deadline - time.monotonic()
            if left <= 0 or not waiter.poll(left * 1000):
                raise TimeoutError("the peer did not take the data in time")
        try:
            sent = sock.sendmsg(views, (), flags)
        except BlockingIOError:
            if deadline is None:
                raise TimeoutError("the peer did not take the data in time") from None
            sent = 0
