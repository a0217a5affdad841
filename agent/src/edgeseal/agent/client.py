"""The Python client apps import to call the agent over its unix socket.

    from edgeseal.agent.client import Client
    result = Client().infer("vision-det", {"input": frame})
    result.outputs["probs"], result.model, result.ood

Errors come back as :class:`AgentError` with the HTTP status and the agent's message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from edgeseal.agent.api import NPZ, decode_arrays, encode_arrays
from edgeseal.core.errors import EdgesealError

__all__ = ["AgentError", "Client", "InferResponse"]

DEFAULT_SOCKET = "/run/edgeseal/agent.sock"


class AgentError(EdgesealError):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class InferResponse:
    outputs: dict[str, npt.NDArray[Any]]
    model: dict[str, Any]
    ood: list[float] | None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Client:
    """One keep-alive connection to the agent; not shared between threads."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or os.environ.get("EDGESEAL_SOCKET", DEFAULT_SOCKET)
        self._conn = _UnixConnection(self.socket_path, timeout)

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] = {}
    ) -> tuple[http.client.HTTPResponse, bytes]:
        for attempt in (0, 1):
            try:
                self._conn.request(method, path, body=body, headers=dict(headers))
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self._conn.close()
                if attempt:
                    raise
        if resp.status >= 400:
            try:
                err = json.loads(data)
                raise AgentError(resp.status, err.get("error", "Error"), err.get("message", ""))
            except ValueError:
                raise AgentError(
                    resp.status, "Error", data[:200].decode(errors="replace")
                ) from None
        return resp, data

    def _get(self, path: str) -> Any:
        return json.loads(self._request("GET", path)[1])

    def models(self) -> list[dict[str, Any]]:
        return list(self._get("/v1/models")["models"])

    def info(self, model: str) -> dict[str, Any]:
        return dict(self._get(f"/v1/models/{model}"))

    def health(self) -> dict[str, Any]:
        try:
            return dict(self._get("/v1/health"))
        except AgentError as e:
            if e.status == 503:
                return {"ok": False, "message": str(e)}
            raise

    def status(self) -> dict[str, Any]:
        return dict(self._get("/v1/status"))

    def metrics(self) -> str:
        return self._request("GET", "/metrics")[1].decode()

    def infer(self, model: str, inputs: Mapping[str, npt.NDArray[Any]]) -> InferResponse:
        resp, data = self._request(
            "POST",
            f"/v1/models/{model}/infer",
            body=encode_arrays(inputs),
            headers={"Content-Type": NPZ, "Accept": NPZ},
        )
        ood = resp.getheader("X-Edgeseal-Ood")
        return InferResponse(
            outputs=decode_arrays(data, NPZ),
            model={
                "model": resp.getheader("X-Edgeseal-Model"),
                "version": int(resp.getheader("X-Edgeseal-Version") or 0),
                "bundle_id": resp.getheader("X-Edgeseal-Bundle"),
            },
            ood=[float(x) for x in ood.split(",")] if ood else None,
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
