"""The Python client apps import to call the agent over its unix socket.

    from edgeseal.agent.client import Client
    result = Client().infer("vision-det", {"input": frame})
    result.outputs["probs"], result.model, result.ood

Errors come back as :class:`AgentError` with the HTTP status and the agent's message.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# The wire format and the socket helpers only: importing the client loads no runtime, key
# store or TPM code (tests/agent/test_client_import.py holds it to that).
from edgeseal.agent.sockio import kernel_timeouts, nbytes, send_all
from edgeseal.agent.wire import (
    NPZ,
    TENSORS,
    decode_arrays,
    encode_arrays,
    encode_tensors,
    read_error,
)
from edgeseal.core.errors import EdgesealError

__all__ = [
    "AgentConnectionError",
    "AgentError",
    "AgentTimeoutError",
    "Client",
    "InferResponse",
]

DEFAULT_SOCKET = "/run/edgeseal/agent.sock"


class AgentError(EdgesealError):
    """The agent answered with an error status (the message is its own)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind


class AgentConnectionError(EdgesealError, ConnectionError):
    """The agent could not be reached on its socket, or broke the exchange off: no agent
    running, a stale socket file, no permission, a connection closed mid-answer. The
    message names the socket. Still a ``ConnectionError`` for callers matching that."""

    def __init__(self, message: str, *, socket_path: str) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class AgentTimeoutError(AgentConnectionError, TimeoutError):
    """The agent did not answer in time (still a ``TimeoutError``)."""


def _unreachable(e: OSError, path: str) -> AgentConnectionError:
    """A failure to connect to the agent at ``path``, in words that say what to check."""
    if isinstance(e, FileNotFoundError):
        why = "the socket does not exist: is the agent running (edgeseal agent run)?"
    elif isinstance(e, ConnectionRefusedError):
        why = "nothing listens on it (a socket left behind by an agent that stopped)"
    elif isinstance(e, PermissionError):
        why = "permission denied: run as a user the agent's [access] rules allow"
    else:
        why = e.strerror or str(e)
    return AgentConnectionError(
        f"cannot reach the agent at {path}: {why} (--socket or [agent] socket sets the path)",
        socket_path=path,
    )


@dataclass(frozen=True)
class InferResponse:
    outputs: dict[str, npt.NDArray[Any]]
    model: dict[str, Any]
    ood: list[float] | None
    #: How long the agent's guarded inference took (its ``Server-Timing``), if it said.
    infer_ms: float | None = None


def _infer_ms(server_timing: str | None) -> float | None:
    """``infer;dur=0.912`` (a ``Server-Timing`` header) -> 0.912."""
    for metric in (server_timing or "").split(","):
        name, _, params = metric.strip().partition(";")
        if name == "infer" and params.startswith("dur="):
            try:
                return float(params[4:])
            except ValueError:
                return None
    return None


_TENSOR_HEADERS = (("Content-Type", TENSORS), ("Accept", TENSORS))
#: A header field of an answer head: its name and its value without the spaces around.
_FIELD = re.compile(r"\r\n([^:\r\n]*):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n|\Z)")


#: The agent's own answer to an infer call, as it writes it, read with one match (any
#: other answer takes the general parse): content length, model, version, bundle, the
#: inference's milliseconds, and the OOD scores when there are any.
_INFER_ANSWER = re.compile(
    rb"HTTP/1\.1 200 OK\r\nContent-Type: application/x-edgeseal-tensors\r\n"
    rb"Content-Length: (\d{1,15})\r\nX-Edgeseal-Model: ([a-z0-9][a-z0-9._-]{0,127})\r\n"
    rb"X-Edgeseal-Version: (\d{1,19})\r\nX-Edgeseal-Bundle: ([0-9a-f]{32})\r\n"
    rb"Server-Timing: infer;dur=(\d{1,15}\.\d{3})\r\n"
    rb"(?:X-Edgeseal-Ood: ([-+.,0-9a-z]{1,65536})\r\n)?\r\n"
)


class _Response:
    """Status, headers (lower-cased names) and body of one answer; for the agent's own
    answer to an infer call, its fields as :data:`_INFER_ANSWER` reads them instead."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        body: bytearray,
        fields: tuple[bytes, ...] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.fields = fields


class _StaleConnectionError(ConnectionError):
    """The kept-alive connection was closed before any answer came: safe to resend."""


class Client:
    """One keep-alive connection to the agent; not shared between threads.

    Tensors travel as ``application/x-edgeseal-tensors`` (a small index and the raw
    little-endian bytes, sent with one ``sendmsg`` and read without a copy); agents
    before it spoke ``.npz`` only: pass ``encoding="npz"`` for those.
    """

    #: The longest answer head (status line and headers) read.
    MAX_HEAD_BYTES = 64 * 1024

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        timeout: float | None = 30.0,
        encoding: str = "tensors",
        max_answer_bytes: int = 1 << 30,
    ) -> None:
        if encoding not in ("tensors", "npz"):
            raise ValueError("encoding must be 'tensors' or 'npz'")
        self.socket_path = socket_path or os.environ.get("EDGESEAL_SOCKET", DEFAULT_SOCKET)
        self.timeout = timeout
        self.encoding = encoding
        self.max_answer_bytes = max_answer_bytes
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._scratch = memoryview(bytearray(16384))
        #: (model, input name, dtype, shape) -> what goes before and after the array's bytes
        self._messages: dict[tuple[str, str, Any, tuple[int, ...]], tuple[bytes, ...]] = {}

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                try:
                    s.connect(self.socket_path)
                except (TimeoutError, BlockingIOError):
                    raise
                except OSError as e:
                    raise _unreachable(e, self.socket_path) from e
                # The kernel bounds each recv and send: one system call each (sockio);
                # where it cannot, Python's timeout stays.
                if self.timeout is not None and not kernel_timeouts(
                    s, recv=self.timeout, send=self.timeout
                ):
                    s.settimeout(self.timeout)
            except BaseException:
                s.close()
                raise
            self._sock = s
            self._buf.clear()
        return self._sock

    def _fill(self, sock: socket.socket, fresh: bool) -> None:
        try:
            # A head and a small answer; larger bodies go straight to their own buffer.
            got = sock.recv_into(self._scratch, len(self._scratch))
        except BlockingIOError as e:  # the kernel's timeout
            raise TimeoutError("the agent did not answer in time") from e
        if not got:
            if fresh:
                raise _StaleConnectionError("the agent closed the connection")
            raise ConnectionError("the agent closed the connection mid-answer")
        self._buf += self._scratch[:got]

    def _exchange(self, parts: list[bytes | memoryview], infer: bool = False) -> _Response:
        sock = self._connect()
        try:
            send_all(sock, parts)
        except (BrokenPipeError, ConnectionResetError) as e:
            # The agent stopped reading: a kept-alive connection it had closed (resend),
            # or a request it refused before reading the body (413 over a limit), whose
            # answer is waiting: read it.
            try:
                while self._buf.find(b"\r\n\r\n") < 0:
                    self._fill(sock, not self._buf)
            except (OSError, _StaleConnectionError):
                raise _StaleConnectionError(str(e)) from e
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > self.MAX_HEAD_BYTES:
                raise ConnectionError("the agent's answer head is too long")
            self._fill(sock, not self._buf)
        if infer and (m := _INFER_ANSWER.match(self._buf)) is not None:
            fields = m.groups(b"")  # before the buffer changes: a match reads it lazily
            del self._buf[: m.end()]
            return _Response(200, {}, self._read_body(sock, int(fields[0])), fields)
        head = self._buf[:end].decode("latin-1")
        del self._buf[: end + 4]
        status_line = head.partition("\r\n")[0]
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError) as e:
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}") from e
        headers = {k.lower(): v for k, v in _FIELD.findall(head)}
        body = self._read_body(sock, int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return _Response(status, headers, body)

    def _read_body(self, sock: socket.socket, n: int) -> bytearray:
        """The answer's body of ``n`` bytes: what the buffer holds, then the rest."""
        if n > self.max_answer_bytes:
            raise ConnectionError(f"answer of {n} bytes is over max_answer_bytes")
        if len(self._buf) >= n:
            body = self._buf[:n]
            del self._buf[:n]
            return body
        body = bytearray(n)
        view = memoryview(body)
        have = len(self._buf)
        view[:have] = self._buf
        self._buf.clear()
        while have < n:
            try:
                got = sock.recv_into(view[have:], n - have)
            except BlockingIOError as e:
                raise TimeoutError("the agent did not answer in time") from e
            if not got:
                raise ConnectionError("the agent closed the connection mid-answer")
            have += got
        return body

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | list[bytes | memoryview] | None = None,
        headers: Mapping[str, str] = {},
        answers: tuple[int, ...] = (),
    ) -> tuple[_Response, bytearray]:
        """Send one request; an error status raises :class:`AgentError` unless it is one
        of ``answers`` (statuses whose body is the answer)."""
        parts = body if isinstance(body, list) else [body] if body else []
        length = sum(map(nbytes, parts))
        return self._call(
            [self._head(method, path, tuple(headers.items()), length), *parts], answers
        )

    def _call(
        self,
        message: list[bytes | memoryview],
        answers: tuple[int, ...] = (),
        infer: bool = False,
    ) -> tuple[_Response, bytearray]:
        """Send a whole request (head and body parts) and take its answer, as
        :meth:`_request` says."""
        for attempt in (0, 1):
            try:
                resp = self._exchange(message, infer)
                break
            except _StaleConnectionError as e:
                self.close()
                if attempt:
                    raise AgentConnectionError(
                        f"the agent at {self.socket_path} closed the connection: {e}",
                        socket_path=self.socket_path,
                    ) from e
            except BaseException as e:
                self.close()  # the stream is out of step: start over next time
                if isinstance(e, TimeoutError) and not isinstance(e, EdgesealError):
                    raise AgentTimeoutError(
                        f"the agent at {self.socket_path} did not answer in time "
                        f"({self.timeout} s)",
                        socket_path=self.socket_path,
                    ) from e
                if isinstance(e, ConnectionError) and not isinstance(e, EdgesealError):
                    raise AgentConnectionError(
                        f"the agent at {self.socket_path}: {e}", socket_path=self.socket_path
                    ) from e
                raise
        data = resp.body
        if resp.status >= 400 and resp.status not in answers:
            raise AgentError(resp.status, *read_error(data))
        return resp, data

    def _tensor_message(
        self, model: str, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> list[bytes | memoryview]:
        """An infer request with a tensor body. An application sends one array of the
        same dtype and shape call after call: for that, everything before the array's
        bytes (request head, tensor header and index) is made once and kept."""
        key = None
        if len(inputs) == 1:
            ((name, a),) = inputs.items()
            if type(a) is np.ndarray and a.flags.c_contiguous and a.nbytes:
                key = (model, name, a.dtype, a.shape)
                kept = self._messages.get(key)
                if kept is not None:
                    return [kept[0], memoryview(a).cast("B"), *kept[1:]]  # type: ignore[arg-type]
        parts = encode_tensors(inputs)
        length = sum(map(nbytes, parts))
        head = self._head("POST", f"/v1/models/{model}/infer", _TENSOR_HEADERS, length)
        sent: object = parts[1].obj if isinstance(parts[1], memoryview) else None
        if key is not None and sent is a:
            # the array's own bytes went out (it needed no conversion): keep the rest
            if len(self._messages) >= 64:
                self._messages.clear()
            self._messages[key] = (head + bytes(parts[0]), *(bytes(p) for p in parts[2:]))
        return [head, *parts]

    @staticmethod
    def _head(method: str, path: str, headers: tuple[tuple[str, str], ...], length: int) -> bytes:
        """A request's head (the infer hot path keeps whole messages: _tensor_message)."""
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        lines += [f"{k}: {v}" for k, v in headers]
        if method != "GET" or length:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _get(self, path: str) -> Any:
        return json.loads(self._request("GET", path)[1])

    def models(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/models")["models"])

    def info(self, model: str) -> dict[str, Any]:
        return dict(self._get(f"/v1/models/{model}"))

    def health(self) -> dict[str, Any]:
        """The agent's health; ``ok`` is false (the answer a 503) when a model is not
        serving or the audit log cannot be written."""
        return dict(json.loads(self._request("GET", "/v1/health", answers=(503,))[1]))

    def status(self) -> dict[str, Any]:
        return dict(self._get("/v1/status"))

    def metrics(self) -> str:
        return self._request("GET", "/metrics")[1].decode()

    def infer(self, model: str, inputs: Mapping[str, npt.NDArray[Any]]) -> InferResponse:
        if self.encoding == "tensors":
            resp, data = self._call(self._tensor_message(model, inputs), infer=True)
            f = resp.fields
            if f is not None:
                return InferResponse(
                    outputs=decode_arrays(data, TENSORS),
                    model={
                        "model": f[1].decode(),
                        "version": int(f[2]),
                        "bundle_id": f[3].decode(),
                    },
                    ood=[float(x) for x in f[5].split(b",")] if f[5] else None,
                    infer_ms=float(f[4]),
                )
        else:
            resp, data = self._request(
                "POST",
                f"/v1/models/{model}/infer",
                body=[encode_arrays(inputs)],
                headers={"Content-Type": NPZ, "Accept": NPZ},
            )
        h = resp.headers
        ood = h.get("x-edgeseal-ood")
        answer = h.get("content-type") or NPZ
        if answer != TENSORS:
            answer = answer.split(";")[0].strip()
        return InferResponse(
            outputs=decode_arrays(data, answer),
            model={
                "model": h.get("x-edgeseal-model"),
                "version": int(h.get("x-edgeseal-version") or 0),
                "bundle_id": h.get("x-edgeseal-bundle"),
            },
            ood=[float(x) for x in ood.split(",")] if ood else None,
            infer_ms=_infer_ms(h.get("server-timing")),
        )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
