"""The opt-in TCP listener for Prometheus: ``GET /metrics`` and nothing else.

Off unless ``[agent] metrics_listen`` or ``agent run --metrics-listen`` names an address.
It answers ``GET /metrics`` (a query string is ignored) with the metrics text and every
other request with 404: no inference, no model information, no status. A TCP peer has no
credentials the agent could check, so the text covers every model (names and counts,
never inputs or outputs); bind it to loopback (the default) or to an interface only the
scraper reaches. Each connection carries one request: its head must arrive whole, within
:data:`MAX_HEAD_BYTES` and :data:`REQUEST_TIMEOUT` seconds, and at most
:data:`MAX_CONNECTIONS` are served at once (more are closed unanswered). Internal API.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from edgeseal.agent.promtext import CONTENT_TYPE
from edgeseal.agent.sockio import send_all
from edgeseal.core.errors import EdgesealError
from edgeseal.core.listen import ListenAddress

__all__ = ["MetricsListenError", "MetricsListener"]

log = logging.getLogger(__name__)

#: The request line and headers, at most (a scraper sends a few hundred bytes).
MAX_HEAD_BYTES = 8 * 1024
#: A connection's request must be in, and its answer out, within this many seconds.
REQUEST_TIMEOUT = 5.0
#: Connections served at once; a scraper needs one.
MAX_CONNECTIONS = 8


class MetricsListenError(EdgesealError):
    """The metrics address cannot be listened on (in use, not this machine's, ...)."""

    hint = "choose another [agent] metrics_listen or --metrics-listen address, or free it"


def _answer(code: int, reason: str, body: bytes, ctype: str) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _read_head(sock: socket.socket, deadline: float) -> bytes | None:
    """The request head (up to the blank line); None when the peer sends too much, too
    slowly or hangs up first."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or len(buf) > MAX_HEAD_BYTES:
            return None
        sock.settimeout(left)
        chunk = sock.recv(MAX_HEAD_BYTES + 4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf[: buf.index(b"\r\n\r\n")])


def respond(head: bytes, produce: Callable[[], str]) -> bytes:
    """The whole answer to a request head: the one rule of this listener."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _answer(400, "Bad Request", b"malformed request line\n", "text/plain")
    method, target, _ = parts
    if method == "GET" and target.split("?", 1)[0] == "/metrics":
        return _answer(200, "OK", produce().encode(), CONTENT_TYPE)
    return _answer(404, "Not Found", b"only GET /metrics is served here\n", "text/plain")


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True  # a restarted agent rebinds while old sockets linger
    request_queue_size = 16
    produce: Callable[[], str]
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: closed unanswered
            return
        t = threading.Thread(target=self._serve, args=(request,), daemon=True)
        try:
            t.start()
        except RuntimeError:
            self.slots.release()
            self.shutdown_request(request)

    def _serve(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            head = _read_head(sock, deadline)
            if head is not None:
                send_all(sock, [respond(head, self.produce)], deadline)
        except (OSError, TimeoutError):
            pass
        except Exception:  # a bug in the producer: logged, the listener keeps going
            log.exception("the metrics listener failed to answer")
        finally:
            self.slots.release()
            self.shutdown_request(sock)


class MetricsListener:
    """Serves ``produce()`` at ``address`` from :meth:`start` until :meth:`stop`."""

    def __init__(self, address: ListenAddress, produce: Callable[[], str]) -> None:
        self.address = address
        self._produce = produce
        self._server: _TcpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def bound(self) -> ListenAddress:
        """The address listened on (with the port the kernel chose for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics listener is not started")
        port = int(self._server.server_address[1])
        return ListenAddress(self.address.host, port)

    def start(self) -> None:
        """Bind and serve; :class:`MetricsListenError` naming the address if it cannot."""
        if self._server is not None:
            raise RuntimeError("the metrics listener is started already")
        if not self.address.loopback:
            log.warning(
                "metrics are served to the network on %s: every model's series, to anyone "
                "who reaches that address",
                self.address,
            )
        server_cls = type(
            "_Tcp6Server" if self.address.family_is_ipv6 else "_Tcp4Server",
            (_TcpServer,),
            {"address_family": socket.AF_INET6 if self.address.family_is_ipv6 else socket.AF_INET},
        )
        try:
            server = server_cls(
                (self.address.host, self.address.port), socketserver.BaseRequestHandler
            )
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
            raise MetricsListenError(f"cannot serve metrics on {self.address}: {why}") from e
        server.produce = self._produce
        server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="edgeseal-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics served on http://%s/metrics", self.bound)

    def stop(self) -> None:
        """Stop listening (the port is closed when this returns)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(REQUEST_TIMEOUT)
            self._thread = None
