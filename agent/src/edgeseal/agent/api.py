"""The local API: HTTP/1.1 over a unix socket (as snapd and Docker do).

    GET  /v1/models                 models this caller may call, with identity
    GET  /v1/models/<name>          schema: inputs, outputs, profile ranges
    POST /v1/models/<name>/infer    body: tensors (application/x-edgeseal-tensors), .npz
                                    (application/x-npz) or JSON; answered in the Accepted one
    GET  /v1/health                 200 when every installed model serves and the audit log
                                    takes writes, else 503 saying which
    GET  /v1/status                 the agent's status (root and the agent's uid only)
    GET  /metrics                   Prometheus text format

Every answer to infer names the bundle that answered (headers ``X-Edgeseal-Model``,
``-Version``, ``-Bundle``, and ``-Ood`` with each row's OOD score) and carries
``Server-Timing: infer;dur=<ms>``. Errors are JSON ``{"error": type, "message": text}``
with 400 (malformed or wrong inputs), 403 (caller not allowed), 404, 405, 411/413 (body
length), 429 (rate limit or budget), 503 (quarantined, or the audit log cannot be
written) or 500; the daemon keeps serving after any of them. An error after an answer has
begun is not answered: the connection is closed instead. The bodies' encodings and the
error body are :mod:`edgeseal.agent.wire`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.agent.acl import AccessControl, AccessDeniedError, BudgetExceededError, Caller, harden
from edgeseal.agent.audit import AuditError, AuditLog
from edgeseal.agent.guard import InferResult, IntegrityError, QuarantinedError
from edgeseal.agent.metrics import LatencyByModel, render_metrics
from edgeseal.agent.promtext import CONTENT_TYPE as METRICS_CONTENT_TYPE
from edgeseal.agent.service import Agent, NoSuchModelError
from edgeseal.agent.sockio import kernel_timeouts, nbytes, send_all
from edgeseal.agent.wire import (
    JSON,
    NPZ,
    TENSORS,
    BadRequestError,
    decode_arrays,
    decode_tensors,
    encode_arrays,
    encode_tensors,
    error_body,
)
from edgeseal.core.errors import EdgesealError, PathError
from edgeseal.core.profile import InputError, InputTooLargeError

# The codecs live in edgeseal.agent.wire (the client imports them from there); they are
# still named here for callers that took them from this module.
__all__ = [
    "TENSORS",
    "ApiServer",
    "decode_arrays",
    "decode_tensors",
    "encode_arrays",
    "encode_tensors",
    "peer_credentials",
]

log = logging.getLogger(__name__)


#: ``SO_PEERGROUPS`` (Linux 4.13): the peer's supplementary groups as the kernel fixed
#: them at connect. Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_GROUPS = 65536  # NGROUPS_MAX


def _kernel_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups from SO_PEERGROUPS; None where the kernel lacks it."""
    size = 64 * 4
    while size <= _MAX_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:  # more groups than room: ask with more
                size *= 4
                continue
            return None
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of the process ``pid`` is now, but only when that process
    started before this call and is the same one after reading (a pid recycled by a
    newer process lends nothing). Used only where SO_PEERGROUPS is missing."""
    before = _start_ticks(pid)
    try:
        now = time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return ()
    if before is None or before > now:
        return ()
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
    return groups if _start_ticks(pid) == before else ()


def peer_credentials(sock: socket.socket) -> Caller:
    """The calling process's pid, uid and gid (SO_PEERCRED) and its supplementary groups
    (SO_PEERGROUPS), as the kernel fixed them when the peer connected. Called once per
    connection, when it is accepted: a peer that hands its socket on and exits cannot
    later lend itself the groups of whatever process reuses its pid."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups = _kernel_groups(sock)
    if groups is None:  # kernels before 4.13: /proc, guarded by the process start time
        groups = _proc_groups(pid)
    return Caller(uid=uid, gid=gid, pid=pid, groups=groups)


_STATUS = {
    InputTooLargeError: 413,  # before InputError, its base
    BadRequestError: 400,
    InputError: 400,
    AccessDeniedError: 403,
    NoSuchModelError: 404,
    BudgetExceededError: 429,
    QuarantinedError: 503,
    IntegrityError: 503,
    AuditError: 503,
}
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
#: Refusals that go to the audit log (probing: who tried what), at most
#: REFUSALS_PER_MINUTE records a minute with a burst of as many; past that they are only
#: counted, per (uid, code), and the counts go with the next record written.
_AUDITED_REFUSALS = frozenset({400, 403, 411, 413, 429, 431})
REFUSALS_PER_MINUTE = 60
_MAX_SUPPRESSED_KEYS = 1024
#: The request line and headers of one request, at most.
MAX_HEAD_BYTES = 16 * 1024
HEAD_READ_BYTES = 8 * 1024
#: Bodies up to this size are read into a buffer the connection keeps and reuses.
REUSED_BODY_BYTES = 4 << 20
#: A request, once its first byte is in, must be whole within this many seconds; a kept-alive
#: connection may wait this long for its next request. Past either, the connection is closed,
#: so stalled callers (slowloris) cannot hold server threads.
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
_MAX_HEADERS = 100


#: A request head, parsed: method, target, version, headers (names lower-cased), and the
#: target's path as its parts.
_Parsed = tuple[str, str, str, dict[str, str], tuple[str, ...]]


def _parse_head(head: bytes) -> _Parsed | None:
    """The request line and headers of ``head``; None when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not lines[0].isascii() or not version.startswith("HTTP/1.") or len(lines) > _MAX_HEADERS + 1:
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    route = tuple(p for p in target.split("?")[0].split("/") if p)
    return method, target, version, headers, route


class _Handler:
    """One connection: a lean HTTP/1.1 keep-alive loop (request line, headers,
    Content-Length bodies; no chunked uploads). The peer's credentials are read once per
    connection: the kernel fixes them when the peer connects. Header names are kept
    lower-cased."""

    def __init__(self, sock: socket.socket, api: ApiServer, caller: Caller) -> None:
        self.connection = sock
        self.api = api
        #: Read when the connection was accepted, before anything the peer sends.
        self.caller = caller
        self.close_connection = False
        self.path = ""
        self.headers: dict[str, str] = {}
        self.route: tuple[str, ...] = ()  # the path's parts
        self._last_head: bytes | None = None
        self._last_parsed: _Parsed = ("", "", "", {}, ())
        self._buf = bytearray()
        self._body_read = False
        self._answering = False
        self._deadline: float | None = None
        # Between requests the kernel bounds the wait (one system call per recv, sockio);
        # within one, the request's deadline does (poll, only when the bytes are not in).
        self._kernel = kernel_timeouts(sock, recv=IDLE_TIMEOUT, send=REQUEST_TIMEOUT)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._scratch = memoryview(bytearray(HEAD_READ_BYTES))
        self._body_buf: bytearray | None = None

    # -- reading -----------------------------------------------------------------------

    def _recv_into(self, view: memoryview, n: int) -> int:
        """Up to ``n`` bytes into ``view``: waiting up to the idle timeout for a request's
        first bytes, and until the request's deadline for the rest (slowloris).
        TimeoutError ends the connection (handle)."""
        sock = self.connection
        if self._deadline is None and not self._buf:
            # where the kernel cannot bound the wait, poll does
            if not self._kernel and not self._poll.poll(IDLE_TIMEOUT * 1000):
                raise TimeoutError("no request within the idle timeout")
            try:
                return sock.recv_into(view, n)
            except BlockingIOError as e:  # the kernel's timeout
                raise TimeoutError("no request within the idle timeout") from e
        if self._deadline is None:
            self._deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            # Within a request the bytes are usually in already.
            with contextlib.suppress(BlockingIOError):
                return sock.recv_into(view, n, socket.MSG_DONTWAIT)
            left = self._deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(left * 1000):
                raise TimeoutError("request not complete within the request timeout")

    def _fill(self) -> bool:
        # A small read: the head, and the body's first bytes; the rest of the body then
        # goes from the kernel straight into its own buffer (_read_exact).
        got = self._recv_into(self._scratch, HEAD_READ_BYTES)
        self._buf += self._scratch[:got]
        if not got:
            return False
        if self._deadline is None:
            self._deadline = time.monotonic() + REQUEST_TIMEOUT
        return True

    def _read_head(self) -> bytes | None:
        if self._buf and self._deadline is None:
            # the next request's first bytes came with the last one (pipelined): its
            # deadline starts now, not at a read it may never need
            self._deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                return head
            if len(self._buf) > MAX_HEAD_BYTES:
                self.close_connection = True
                self._error(431, "TooLarge", f"request head over {MAX_HEAD_BYTES} bytes")
                return None
            if not self._fill():
                return None

    def _body_buffer(self, n: int) -> memoryview:
        """Room for a body of ``n`` bytes. The connection's own buffer is reused while
        nothing from the last request still refers to it: an application sends the same
        size call after call, and a reused buffer is faster to fill than a new one."""
        if n > REUSED_BODY_BYTES:
            return np.empty(n, np.uint8).data  # filled by the caller: no zeroing
        if (
            self._body_buf is None
            or len(self._body_buf) < n
            or sys.getrefcount(self._body_buf) > 2  # this attribute and the argument
        ):
            self._body_buf = bytearray(n)
        return memoryview(self._body_buf)[:n]

    def _read_exact(self, n: int) -> memoryview | None:
        if len(self._buf) >= n:
            body = memoryview(self._buf[:n])
            del self._buf[:n]
            return body
        view = self._body_buffer(n)
        have = len(self._buf)
        view[:have] = self._buf
        self._buf.clear()
        while have < n:
            got = self._recv_into(view[have:], n - have)
            if not got:
                return None
            have += got
        return view

    def handle(self) -> None:
        try:
            while not self.close_connection:
                head = self._read_head()
                if head is None:
                    return
                self._one(head)
                self._deadline = None  # the next request gets its own
        except (ConnectionError, TimeoutError, OSError):
            return

    def _one(self, head: bytes) -> None:
        if head == self._last_head:  # an application repeats its call: parsed already
            method, target, version, headers, route = self._last_parsed
        else:
            parsed = _parse_head(head)
            if parsed is None:
                self.close_connection = True
                self._error(400, "BadRequest", "malformed request line or header")
                return
            self._last_head, self._last_parsed = head, parsed
            method, target, version, headers, route = parsed
        self.path, self.headers, self.route = target, headers, route
        conn = headers.get("connection", "").lower()
        if (version == "HTTP/1.0" and conn != "keep-alive") or conn == "close":
            self.close_connection = True
        if method in ("PUT", "DELETE", "PATCH"):
            self._discard_body()
            self._error(405, "MethodNotAllowed", "use GET or POST")
        elif method not in ("GET", "POST"):
            self.close_connection = True
            self._error(501, "NotImplemented", f"method {method} is not served")
        else:
            self._body_read = False
            self._dispatch(method)
            if not self._body_read:  # answered before reading it: keep the stream in step
                self._discard_body()

    def _content_length(self, default: str | None = None) -> int | None:
        """The request's Content-Length; None when absent, not a plain decimal number
        or too long to be a body this server would take."""
        length = self.headers.get("content-length", default)
        if length is None or not (length.isascii() and length.isdigit()) or len(length) > 18:
            return None
        return int(length)

    def _discard_body(self) -> None:
        left = self._content_length("0")
        if "transfer-encoding" in self.headers or left is None:
            self.close_connection = True
            return
        if left > self.api.agent.config.agent.max_body_bytes:
            self.close_connection = True
            return
        take = min(left, len(self._buf))
        del self._buf[:take]
        left -= take
        scratch = memoryview(bytearray(min(left, 1 << 16)))
        while left > 0 and not self.close_connection:
            got = self._recv_into(scratch, min(left, len(scratch)))
            if not got:
                self.close_connection = True
            left -= got

    # -- plumbing ----------------------------------------------------------------------

    def _send_parts(
        self, code: int, parts: list[bytes | memoryview], ctype: str, headers: str = ""
    ) -> None:
        """Answer with ``parts`` as the body; ``headers`` are further header lines, each
        ending in CRLF."""
        length = sum(map(nbytes, parts))
        self._answering = True  # from here on, a failure cannot be answered on this stream
        close = "Connection: close\r\n" if self.close_connection else ""
        head = (
            f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n{headers}{close}\r\n"
        )
        send_all(
            self.connection, [head.encode("latin-1"), *parts], time.monotonic() + REQUEST_TIMEOUT
        )

    def _send(self, code: int, body: bytes, ctype: str, headers: str = "") -> None:
        self._send_parts(code, [body], ctype, headers)

    def _json(self, code: int, obj: Any, headers: str = "") -> None:
        self._send(code, json.dumps(obj, default=str).encode(), JSON, headers)

    def _error(self, code: int, kind: str, message: str) -> None:
        self.api.count_error(code)
        if code in _AUDITED_REFUSALS:
            model = self.route[2] if len(self.route) >= 3 and self.route[1] == "models" else None
            self.api.audit_refusal(self.caller, code, kind, model, self.path)
        self._send(code, error_body(kind, message), JSON)

    def _body(
        self, cap: int | None = None, before: Callable[[], None] | None = None
    ) -> memoryview | None:
        """The request's body, read whole; refused (413) unread when it is longer than
        ``cap`` or the agent's max_body_bytes. ``before`` runs once the length is known
        good and before a byte of the body is read (the rate limit): an error it raises
        is answered with the body unread."""
        self._body_read = True
        if "transfer-encoding" in self.headers:
            self._error(411, "LengthRequired", "send Content-Length (no chunked bodies)")
            self.close_connection = True
            return None
        length = self.headers.get("content-length")
        if length is None or not (length.isascii() and length.isdigit()):
            self._error(411, "LengthRequired", "send Content-Length")
            self.close_connection = True
            return None
        n = self._content_length()
        limit = cap_free = self.api.agent.config.agent.max_body_bytes
        if cap is not None:
            limit = min(limit, cap)
        if n is None or n > limit:
            which = "agent.max_body_bytes" if limit == cap_free else "what the model's inputs need"
            self._error(
                413,
                "TooLarge",
                f"body of {length[:40]} bytes exceeds the limit of {limit} bytes ({which})",
            )
            self.close_connection = True
            return None
        if before is not None:
            self._body_read = False  # refused here: the body is skipped after the answer
            before()
            self._body_read = True
        if self.headers.get("expect", "").lower() == "100-continue":
            send_all(
                self.connection,
                [b"HTTP/1.1 100 Continue\r\n\r\n"],
                time.monotonic() + REQUEST_TIMEOUT,
            )
        body = self._read_exact(n)
        if body is None:
            self.close_connection = True
        return body

    def _dispatch(self, method: str) -> None:
        self._answering = False
        try:
            self.api.route(self, method, self.route)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as e:  # one request's failure never takes the daemon down
            if self._answering:
                # An answer was (partly) sent: a second would put the stream out of step.
                log.error("%s %s failed while answering: %s", method, self.path, e)
                self.close_connection = True
            elif isinstance(e, EdgesealError):
                code = next((c for t, c in _STATUS.items() if isinstance(e, t)), 400)
                self._error(code, type(e).__name__, str(e))
            else:
                log.exception("internal error on %s %s", method, self.path)
                self._error(500, "InternalError", f"{type(e).__name__}: {e}")


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Accepts connections, one thread each, within bounds: per uid and in total, with the
    last ``reserved`` places kept for callers an access rule lists (and root and the
    agent's uid, who have no bound per uid), so idle connections of a caller nobody lists
    cannot lock them out."""

    daemon_threads = True
    request_queue_size = 128  # a burst of callers waits in the backlog, not in EAGAIN
    block_on_close = False
    api: ApiServer
    max_total = 512
    max_per_uid = 64
    reserved = 64

    def server_activate(self) -> None:
        super().server_activate()
        self._count_lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._total = 0

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as e:
            # Out of file descriptors: the pending connection stays in the backlog and the
            # selector keeps saying so. Back off rather than spin on accept.
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection: %s", e)
                time.sleep(0.1)
            raise

    def _admit(self, caller: Caller) -> str | None:
        """Count the connection in, or say why not (the lock held)."""
        if self._open.get(caller.uid, 0) >= self.max_per_uid and not self.api.acl.trusted(caller):
            return f"uid {caller.uid} has {self.max_per_uid} connections open already"
        room = self.max_total - self._total
        if room <= 0 or (room <= self.reserved and not self.api.acl.listed(caller)):
            return "the agent has no room for another connection"
        self._open[caller.uid] = self._open.get(caller.uid, 0) + 1
        self._total += 1
        return None

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            caller = peer_credentials(request)
        except OSError:
            self.shutdown_request(request)
            return
        with self._count_lock:
            refused = self._admit(caller)
        if refused is not None:
            self.api.refuse_connection(request, caller, refused)
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._serve, args=(request, caller), daemon=True)
        try:
            t.start()
        except RuntimeError:  # no thread to be had
            self._release(caller)
            self.shutdown_request(request)

    def _release(self, caller: Caller) -> None:
        with self._count_lock:
            self._total -= 1
            left = self._open[caller.uid] - 1
            if left:
                self._open[caller.uid] = left
            else:
                del self._open[caller.uid]

    def _serve(self, request: Any, caller: Caller) -> None:
        try:
            _Handler(request, self.api, caller).handle()
        except Exception:
            self.handle_error(request, None)
        finally:
            self._release(caller)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failure that escaped a connection's handler: a bug, counted as a 500."""
        log.exception("a connection's handler failed")
        self.api.count_error(500)


def _connection_bounds(cfg: Any) -> tuple[int, int, int]:
    """(total, per uid, reserved for listed callers): the configured bounds, the total
    kept below the process's file descriptor limit (models, the audit log and the
    update channel need some too)."""
    total = cfg.max_connections
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            total = min(total, max(8, soft - 128))
    reserved = min(cfg.max_connections_reserved, total // 2)
    return total, min(cfg.max_connections_per_uid, total), reserved


class ApiServer:
    def __init__(self, agent: Agent, socket_path: Path, *, audit: AuditLog | None = None) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self.audit = audit
        self.acl = AccessControl(
            rules=agent.config.access,
            agent_uid=os.getuid(),
            clock=time.time,
            group_ids=_group_id,
        )
        self.errors: dict[int, int] = {}
        #: The guarded inference's time per model, on answered calls (/metrics).
        self.latency = LatencyByModel()
        self._refusal_lock = threading.Lock()
        self._refusal_tokens = float(REFUSALS_PER_MINUTE)
        self._refusal_stamp = time.monotonic()
        self._suppressed: dict[tuple[int, int], int] = {}
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.agent.config.agent
        try:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            old = os.umask(0o177)
            try:
                server = _UnixServer(str(self.socket_path), socketserver.BaseRequestHandler)
            finally:
                os.umask(old)
        except OSError as e:
            # The path comes from --socket or [agent] socket: the user's to change.
            raise PathError.from_os_error(
                e, self.socket_path, "listen on the socket", creating=True
            ) from e
        server.api = self
        server.max_total, server.max_per_uid, server.reserved = _connection_bounds(cfg)
        if cfg.socket_group:
            gid = _group_id(cfg.socket_group)
            if gid is None:
                server.server_close()
                raise EdgesealError(f"agent.socket_group {cfg.socket_group!r} does not exist")
            os.chown(self.socket_path, -1, gid)
        self.socket_path.chmod(int(cfg.socket_mode, 8))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def audit_refusal(
        self, caller: Caller, code: int, kind: str, model: str | None, path: str
    ) -> None:
        """Record a refused call (bounded: a token bucket; past it, counts per uid and
        code go with the next record). Never fails the answer."""
        if self.audit is None:
            return
        with self._refusal_lock:
            now = time.monotonic()
            self._refusal_tokens = min(
                float(REFUSALS_PER_MINUTE),
                self._refusal_tokens + (now - self._refusal_stamp) * REFUSALS_PER_MINUTE / 60.0,
            )
            self._refusal_stamp = now
            if self._refusal_tokens < 1.0:
                key = (caller.uid, code)
                if key in self._suppressed or len(self._suppressed) < _MAX_SUPPRESSED_KEYS:
                    self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._refusal_tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, {}
        record: dict[str, Any] = {
            **caller.to_obj(),
            "model": model[:128] if model else None,
            "result": "refused",
            "code": code,
            "error": kind,
            "path": path[:256],
        }
        if suppressed:
            record["suppressed"] = [
                {"uid": uid, "code": c, "count": n} for (uid, c), n in sorted(suppressed.items())
            ]
        try:
            self.audit.append(record)
        except Exception as e:  # the refusal is answered whatever the log does
            log.error("a refused call could not be audited: %s", e)

    def refuse_connection(self, sock: socket.socket, caller: Caller, why: str) -> None:
        """Answer a connection over its bounds with 503 and close it (without blocking:
        the accept loop must not wait on a caller)."""
        self.count_error(503)
        self.audit_refusal(caller, 503, "TooManyConnections", None, "")
        body = error_body("TooManyConnections", why)
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            sock.send(head.encode() + body, socket.MSG_DONTWAIT)

    def count_error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- routes ------------------------------------------------------------------------

    def route(self, h: _Handler, method: str, parts: tuple[str, ...]) -> None:
        caller = h.caller
        if len(parts) == 4 and parts[0] == "v1" and parts[1] == "models" and parts[3] == "infer":
            if method != "POST":
                h._error(405, "MethodNotAllowed", "infer takes POST")
                return
            self.infer(h, caller, parts[2])
        elif parts == ("metrics",) and method == "GET":
            h._send(200, self.metrics(caller).encode(), METRICS_CONTENT_TYPE)
        elif parts[:1] != ("v1",):
            raise NoSuchModelError(f"no such endpoint {h.path}")
        elif parts == ("v1", "health") and method == "GET":
            self.health(h, caller)
        elif parts == ("v1", "status") and method == "GET":
            if caller.uid not in (0, os.getuid()):
                raise AccessDeniedError("status is for root and the agent's user")
            h._json(200, self.agent.status())
        elif parts == ("v1", "models") and method == "GET":
            h._json(200, {"models": self.models(caller)})
        elif len(parts) == 3 and parts[1] == "models" and method == "GET":
            self.acl.check(caller, parts[2])
            h._json(200, self.agent.model(parts[2]).info())
        else:
            raise NoSuchModelError(f"no such endpoint {method} {h.path}")

    def visible(self, caller: Caller, name: str) -> bool:
        """Whether ``caller`` may see model ``name`` at all (it may call it): the one
        rule for /v1/models, /v1/health and /metrics."""
        try:
            self.acl.check(caller, name)
        except AccessDeniedError:
            return False
        return True

    def models(self, caller: Caller) -> list[dict[str, Any]]:
        return [
            {**sm.identity, "quarantined": sm.quarantined}
            for name, sm in sorted(self.agent.serving.items())
            if self.visible(caller, name)
        ]

    def health(self, h: _Handler, caller: Caller) -> None:
        # Only the models this caller may see; the audit log's error text (paths) only
        # for root and the agent's uid.
        installed = [n for n in self.agent.store.models() if self.visible(caller, n)]
        bad = {}
        for name in installed:
            sm = self.agent.serving.get(name)
            if sm is None or sm.quarantined:
                bad[name] = sm.quarantined if sm else "not serving"
        answer: dict[str, Any] = {"ok": not bad, "models": len(installed), "failing": bad}
        if self.audit is not None and self.audit.last_error is not None:
            answer["ok"] = False
            trusted = caller.uid in (0, os.getuid())
            answer["audit"] = self.audit.last_error if trusted else "cannot be written"
        h._json(200 if answer["ok"] else 503, answer)

    def infer(self, h: _Handler, caller: Caller, model: str) -> None:
        rule = self.acl.check(caller, model)
        sm = self.agent.model(model)
        ctype = h.headers.get("content-type") or NPZ
        if ctype != TENSORS:
            ctype = ctype.split(";")[0].strip()
        elements = sm.max_input_elements
        # The size bounds and then the rate limit come before the body is read or
        # decoded: a refused caller costs no more than its head.
        body = h._body(
            _body_bound(elements, ctype), lambda: self.acl.take_request(caller, model, rule)
        )
        if body is None:
            return
        feed = decode_arrays(body, ctype, max_elements=elements)
        rows = max((int(a.shape[0]) for a in feed.values() if a.ndim), default=1)
        self.acl.spend_rows(caller, model, rule, rows)
        started = time.perf_counter()
        try:
            result = self.agent.infer(model, feed)
        except EdgesealError as e:
            if not isinstance(e, InputError):  # a refusal: audited (bounded) as one
                self._audit(caller, sm.identity, type(e).__name__, None)
            raise
        self.latency.observe(model, time.perf_counter() - started)
        outputs = harden(result.outputs, rule)
        # A batched log is not durable per record anyway, so its record is written after
        # the answer is sent (off the caller's latency); a log fsync'd on every record, or
        # one whose last write failed, writes it first, and no answer goes out without it.
        after = self.audit is not None and self.audit.batched and self.audit.last_error is None
        if not after:
            self._audit(caller, result.model, "ok", result.ood)
        m = result.model
        # Which bundle answered, and the guarded inference's own time (Server-Timing), so
        # a caller can tell it from the API's.
        headers = (
            f"X-Edgeseal-Model: {m['model']}\r\nX-Edgeseal-Version: {m['version']}\r\n"
            f"X-Edgeseal-Bundle: {m['bundle_id']}\r\n"
            f"Server-Timing: infer;dur={(time.perf_counter() - started) * 1000:.3f}\r\n"
        )
        if result.ood is not None:
            headers += f"X-Edgeseal-Ood: {','.join(f'{s:g}' for s in result.ood)}\r\n"
        try:
            self._answer(h, result, outputs, headers)
        finally:
            # Also when the answer could not be sent (the caller hung up): it was computed.
            if after:
                try:
                    self._audit(caller, result.model, "ok", result.ood)
                except Exception as e:  # the answer is out: never send a second one
                    log.error("an answered call could not be audited: %s", e)

    def _answer(
        self,
        h: _Handler,
        result: InferResult,
        outputs: Mapping[str, npt.NDArray[Any]],
        headers: str,
    ) -> None:
        accept = h.headers.get("accept", NPZ)
        if TENSORS in accept:
            h._send_parts(200, encode_tensors(outputs), TENSORS, headers)
        elif JSON in accept:
            h._json(
                200,
                {
                    **result.model,
                    "ood": result.ood,
                    "outputs": {
                        k: {"dtype": v.dtype.name, "shape": list(v.shape), "data": v.tolist()}
                        for k, v in outputs.items()
                    },
                },
                headers,
            )
        else:
            h._send(200, encode_arrays(outputs), NPZ, headers)

    def _audit(
        self, caller: Caller, model: Mapping[str, Any], result: str, ood: list[float] | None
    ) -> None:
        if self.audit is None:
            return
        self.audit.append(
            {
                **caller.to_obj(),
                "model": model["model"],
                "version": model["version"],
                "result": result,
                "ood_max": max(ood) if ood else None,
            }
        )

    def metrics(self, caller: Caller) -> str:
        """The series of the models ``caller`` may see (and the agent's own series)."""
        return self.metrics_text(lambda name: self.visible(caller, name))

    def metrics_text(self, visible: Callable[[str], bool]) -> str:
        """The metrics text with the series of the models ``visible`` admits: the one
        producer for the socket and the TCP listener (edgeseal.agent.metrics)."""
        return render_metrics(
            self.agent, visible=visible, errors=self.errors, latency=self.latency, audit=self.audit
        )


#: Bytes a body may take per input element: 8 for the binary encodings (the widest dtype),
#: 32 for JSON text (a float's shortest repr, a separator and room to spare).
_BINARY_BYTES_PER_ELEMENT = 8
_JSON_BYTES_PER_ELEMENT = 32
#: Room for headers, indexes, alignment and zip directories.
_BODY_OVERHEAD = 1 << 20


def _body_bound(elements: int, ctype: str) -> int:
    """The longest body that can carry ``elements`` input elements as ``ctype``."""
    each = _JSON_BYTES_PER_ELEMENT if ctype == JSON else _BINARY_BYTES_PER_ELEMENT
    return elements * each + _BODY_OVERHEAD


def _group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
