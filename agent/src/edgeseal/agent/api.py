"""The local API: HTTP/1.1 over a unix socket (as snapd and Docker do).

    GET  /v1/models                 models this caller may call, with identity
    GET  /v1/models/<name>          schema: inputs, outputs, profile ranges
    POST /v1/models/<name>/infer    body: .npz (application/x-npz) or JSON; answer alike
    GET  /v1/health                 200 when every installed model serves, else 503
    GET  /v1/status                 the agent's status (root and the agent's uid only)
    GET  /metrics                   Prometheus text format

Every answer to infer names the bundle that answered (headers ``X-Edgeseal-Model``,
``-Version``, ``-Bundle``, and ``-Ood`` with each row's OOD score). Errors are JSON
``{"error": type, "message": text}`` with 400 (malformed or wrong inputs), 403 (caller
not allowed), 404, 405, 411/413 (body length), 429 (rate limit or budget), 503
(quarantined) or 500; the daemon keeps serving after any of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.agent.acl import AccessControl, AccessDeniedError, BudgetExceededError, Caller, harden
from edgeseal.agent.guard import IntegrityError, QuarantinedError, ServingModel
from edgeseal.agent.service import Agent, NoSuchModelError
from edgeseal.core.errors import EdgesealError
from edgeseal.core.profile import InputError

__all__ = ["ApiServer", "decode_arrays", "encode_arrays", "peer_credentials"]

log = logging.getLogger(__name__)
NPZ = "application/x-npz"
JSON = "application/json"


class BadRequestError(EdgesealError):
    """The request body is not a valid encoding of arrays."""


def peer_credentials(sock: socket.socket) -> Caller:
    """The calling process's pid, uid and gid from the kernel (SO_PEERCRED), and its
    supplementary groups from /proc."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = tuple(int(g) for g in line.split()[1:])
    return Caller(uid=uid, gid=gid, pid=pid, groups=groups)


def encode_arrays(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def decode_arrays(body: bytes, content_type: str) -> dict[str, npt.NDArray[Any]]:
    """Arrays from an .npz body (no pickles) or JSON ``{"inputs": {name: {dtype, shape,
    data}}}``."""
    try:
        if content_type == JSON:
            obj = json.loads(body)
            out = {}
            for name, t in obj["inputs"].items():
                out[name] = np.asarray(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])
            return out
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as e:
        raise BadRequestError(
            f"the body is not a valid {content_type or NPZ} of arrays: {e}"
        ) from e


_STATUS = {
    BadRequestError: 400,
    InputError: 400,
    AccessDeniedError: 403,
    NoSuchModelError: 404,
    BudgetExceededError: 429,
    QuarantinedError: 503,
    IntegrityError: 503,
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    # -- plumbing ----------------------------------------------------------------------

    def _send(self, code: int, body: bytes, ctype: str, headers: Mapping[str, str] = {}) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: Mapping[str, str] = {}) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), JSON, headers)

    def _error(self, code: int, kind: str, message: str) -> None:
        self.server.api.count_error(code)
        self._json(code, {"error": kind, "message": message})

    def _caller(self) -> Caller:
        return peer_credentials(self.connection)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "LengthRequired", "send Content-Length")
            self.close_connection = True
            return None
        n = int(length)
        if n > self.server.api.agent.config.agent.max_body_bytes:
            self._error(413, "TooLarge", f"body of {n} bytes exceeds the limit")
            self.close_connection = True
            return None
        return self.rfile.read(n)

    def _dispatch(self, method: str) -> None:
        try:
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            self.server.api.route(self, method, parts)
        except EdgesealError as e:
            code = next((c for t, c in _STATUS.items() if isinstance(e, t)), 400)
            self._error(code, type(e).__name__, str(e))
        except Exception as e:  # one request's bug never takes the daemon down
            log.exception("internal error on %s %s", method, self.path)
            self._error(500, "InternalError", f"{type(e).__name__}: {e}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._error(405, "MethodNotAllowed", "use GET or POST")

    def do_DELETE(self) -> None:
        self._error(405, "MethodNotAllowed", "use GET or POST")


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    api: ApiServer


class ApiServer:
    def __init__(self, agent: Agent, socket_path: Path, *, audit: Any = None) -> None:
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
        self._server: _UnixHttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.agent.config.agent
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        old = os.umask(0o177)
        try:
            server = _UnixHttpServer(str(self.socket_path), _Handler)
        finally:
            os.umask(old)
        server.api = self
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

    def count_error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- routes ------------------------------------------------------------------------

    def route(self, h: _Handler, method: str, parts: list[str]) -> None:
        caller = h._caller()
        if parts == ["metrics"] and method == "GET":
            h._send(200, self.metrics().encode(), "text/plain; version=0.0.4")
        elif parts[:1] != ["v1"]:
            raise NoSuchModelError(f"no such endpoint {h.path}")
        elif parts == ["v1", "health"] and method == "GET":
            self.health(h)
        elif parts == ["v1", "status"] and method == "GET":
            if caller.uid not in (0, os.getuid()):
                raise AccessDeniedError("status is for root and the agent's user")
            h._json(200, self.agent.status())
        elif parts == ["v1", "models"] and method == "GET":
            h._json(200, {"models": self.models(caller)})
        elif len(parts) == 3 and parts[1] == "models" and method == "GET":
            self.acl.check(caller, parts[2])
            h._json(200, self.agent.model(parts[2]).info())
        elif len(parts) == 4 and parts[1] == "models" and parts[3] == "infer":
            if method != "POST":
                h._error(405, "MethodNotAllowed", "infer takes POST")
                return
            self.infer(h, caller, parts[2])
        else:
            raise NoSuchModelError(f"no such endpoint {method} {h.path}")

    def models(self, caller: Caller) -> list[dict[str, Any]]:
        out = []
        for name, sm in sorted(self.agent.serving.items()):
            with contextlib.suppress(AccessDeniedError):
                self.acl.check(caller, name)
                out.append({**sm.identity, "quarantined": sm.quarantined})
        return out

    def health(self, h: _Handler) -> None:
        installed = self.agent.store.models()
        bad = {}
        for name in installed:
            sm = self.agent.serving.get(name)
            if sm is None or sm.quarantined:
                bad[name] = sm.quarantined if sm else "not serving"
        h._json(503 if bad else 200, {"ok": not bad, "models": len(installed), "failing": bad})

    def infer(self, h: _Handler, caller: Caller, model: str) -> None:
        rule = self.acl.check(caller, model)
        sm = self.agent.model(model)
        body = h._body()
        if body is None:
            return
        ctype = (h.headers.get("Content-Type") or NPZ).split(";")[0].strip()
        feed = decode_arrays(body, ctype)
        rows = max((int(a.shape[0]) for a in feed.values() if a.ndim), default=1)
        self.acl.spend(caller, model, rule, rows)
        try:
            result = self.agent.infer(model, feed)
        except EdgesealError as e:
            self._audit(caller, sm.identity, type(e).__name__, None)
            raise
        outputs = harden(result.outputs, rule)
        self._audit(caller, result.model, "ok", result.ood)
        headers = {
            "X-Edgeseal-Model": str(result.model["model"]),
            "X-Edgeseal-Version": str(result.model["version"]),
            "X-Edgeseal-Bundle": str(result.model["bundle_id"]),
        }
        if result.ood is not None:
            headers["X-Edgeseal-Ood"] = ",".join(f"{s:g}" for s in result.ood)
        accept = h.headers.get("Accept", NPZ)
        if JSON in accept:
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

    def metrics(self) -> str:
        serving = sorted(self.agent.serving.items())
        lines = []
        for metric, kind, value in _METRICS:
            lines.append(f"# TYPE edgeseal_{metric} {kind}")
            lines += [f'edgeseal_{metric}{{model="{n}"}} {value(sm)}' for n, sm in serving]
        lines.append("# TYPE edgeseal_http_errors_total counter")
        lines += [
            f'edgeseal_http_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())
        ]
        return "\n".join(lines) + "\n"


#: (metric, Prometheus type, value of a serving model), one series per model.
_METRICS: tuple[tuple[str, str, Callable[[ServingModel], int]], ...] = (
    ("requests_total", "counter", lambda sm: sm.counters.requests),
    ("rows_total", "counter", lambda sm: sm.counters.rows),
    ("ood_rows_total", "counter", lambda sm: sm.counters.ood_rows),
    ("rejected_total", "counter", lambda sm: sm.counters.rejected),
    ("quarantined", "gauge", lambda sm: int(bool(sm.quarantined))),
    ("model_version", "gauge", lambda sm: int(sm.identity["version"])),
)


def _group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
