"""Socket I/O both ends of the local API share.

A Python socket with a timeout polls before every ``recv`` and ``send`` (and its
``settimeout`` is an ``ioctl``): three system calls where one would do. Here the kernel
bounds each call instead (``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking socket), and a
call that would wait past its bound fails with :class:`TimeoutError`, as a Python
timeout does. Where the kernel's ``timeval`` is not laid out as packed here (some 32-bit
systems), :func:`kernel_timeouts` says so and the caller keeps Python's timeouts.
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["kernel_timeouts", "send_all"]

#: ``struct timeval`` as the kernel takes it: two C longs, or two 64-bit fields on 32-bit
#: systems built with a 64-bit ``time_t`` (where ``SO_RCVTIMEO`` is the ``_NEW`` option).
_TIMEVAL_LAYOUTS = ("ll", "qq")


def _timeval(layout: str, seconds: float) -> bytes:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole <= 0 and micro <= 0:
        micro = 1  # zero would mean "wait for ever" to the kernel
    return struct.pack(layout, whole, micro)


def _set(sock: socket.socket, option: int, layout: str, seconds: float) -> bool:
    """Set ``option`` and read it back: True when the kernel holds what was meant."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, _timeval(layout, seconds))
        whole, micro = struct.unpack(
            layout, sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize(layout))
        )
    except OSError:
        return False
    return bool(abs(whole + micro / 1_000_000 - seconds) < 0.05)  # the kernel keeps jiffies


def kernel_timeouts(sock: socket.socket, *, recv: float, send: float) -> str | None:
    """Make ``sock`` blocking with the kernel bounding each recv by ``recv`` seconds and
    each send by ``send``; the ``timeval`` layout that worked, or None with the socket
    left as it was."""
    for layout in _TIMEVAL_LAYOUTS:
        if _set(sock, socket.SO_RCVTIMEO, layout, recv) and _set(
            sock, socket.SO_SNDTIMEO, layout, send
        ):
            sock.settimeout(None)
            return layout
    return None


def send_all(
    sock: socket.socket, parts: list[bytes | memoryview], deadline: float | None = None
) -> None:
    """Send ``parts`` (bytes, or memoryviews of bytes) in as few system calls as the
    kernel allows (scatter/gather); a peer still not taking them at ``deadline``
    (``time.monotonic``) is a TimeoutError."""
    try:
        sent = sock.sendmsg(parts)
    except BlockingIOError as e:  # the kernel's send timeout
        raise TimeoutError("the peer did not take the data in time") from e
    if sent == sum(map(len, parts)):
        return
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while True:
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
        if not views:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the peer did not take the data in time")
        try:
            sent = sock.sendmsg(views)
        except BlockingIOError as e:
            raise TimeoutError("the peer did not take the data in time") from e
