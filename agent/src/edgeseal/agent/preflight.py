"""Pre-flight: check a decrypted model in a child process before the agent loads it.

A bundle's graph is signed, but a stolen signer key or a subverted packager can seal a
graph made to attack the device: external data pointing at files beside the weights
placeholder (``/dev/shm/...`` is readable through it), custom operator domains, subgraphs
nested deep enough to exhaust a parser's stack, tensors declaring absurd sizes, or a
flatbuffer that crashes the runtime. Runtimes are C++; a crash in one would take the
daemon down with every model it serves.

So before the agent builds a session from a graph, :class:`Preflight` hands the graph
to a child process, forked for this one check by the pre-flight server
(``python -m edgeseal.agent.preflight``, :mod:`edgeseal.agent.preflight_server`, started
by the agent on its first check, kept running, restarted if it dies), which

1. checks its structure (:func:`check_onnx_graph`): external data only through the
   sealed weights' placeholder, standard operator domains (or the model's own local
   functions), subgraph and function nesting at most :data:`MAX_DEPTH` deep, tensor
   sizes within ``limits.max_section_bytes``;
2. builds a session the way the agent will: ONNX Runtime with zero-filled weights of
   the sealed shapes (the weights never leave the agent), or LiteRT with the flatbuffer
   (its tensors allocated).

A refusal is :class:`ModelRejectedError`; a child killed by a signal (SIGSEGV, abort,
the OOM killer) or past its deadline is :class:`RuntimeCrashError`. Either way the agent
lives on and the open fails, and so does the server. The child is undumpable and exits
after one model, so the kernel, not Python, disposes of its copy of the graph; the
server never holds a model byte.

Limits: crashes that depend on weight values or that happen only while running (not
while loading) are not caught here; a runtime with a GPU/NPU execution provider is
checked on the CPU provider only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from edgeseal.agent.memory import SecretBuffer
from edgeseal.agent.preflight_server import REQUEST, STATUS
from edgeseal.core.config import Limits, RuntimeConfig
from edgeseal.core.errors import RuntimeBackendError
from edgeseal.core.weights import PLACEHOLDER_LOCATION, TensorEntry

__all__ = [
    "MAX_DEPTH",
    "InstalledSlot",
    "ModelRejectedError",
    "Preflight",
    "RuntimeCrashError",
    "UnsafeNoPreflight",
    "check_onnx_graph",
    "default_preflight",
]

log = logging.getLogger(__name__)

#: Operator domains ONNX Runtime implements itself (the packager's gate allows the same).
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
#: Subgraphs (If/Loop/Scan bodies) and local-function calls nested deeper are refused.
MAX_DEPTH = 16
MAX_FUNCTIONS = 1024
DEFAULT_TIMEOUT = 300.0


class ModelRejectedError(RuntimeBackendError):
    """The decrypted model fails the agent's pre-flight checks; it is not loaded."""

    hint = "the bundle's signer may be compromised: check who packed it (edgeseal inspect)"


class RuntimeCrashError(RuntimeBackendError):
    """Loading the model crashed or hung the runtime in the pre-flight child process."""

    hint = "the agent is unaffected; the model is not loaded (report it to the runtime's project)"


# --- structure (runs in the child) ---------------------------------------------------


def _reject(message: str) -> ModelRejectedError:
    return ModelRejectedError(f"model refused by the pre-flight check: {message}")


def _subgraphs(node: Any) -> Iterator[Any]:
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def _attr_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sp in attr.sparse_tensors:
            yield sp.values
            yield sp.indices


def _check_tensor(t: Any, *, weights: set[str], top_level: bool, limits: Limits) -> None:
    import onnx

    if any(d < 0 for d in t.dims):
        raise _reject(f"tensor {t.name!r} declares a negative dimension")
    try:
        itemsize = (
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            if t.data_type != onnx.TensorProto.STRING
            else 1
        )
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if math.prod(t.dims) * itemsize > limits.max_section_bytes:
        raise _reject(
            f"tensor {t.name!r} declares {math.prod(t.dims)} elements (limits.max_section_bytes)"
        )
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        info = {e.key: e.value for e in t.external_data}
        if (
            not top_level
            or t.name not in weights
            or info.get("location") != PLACEHOLDER_LOCATION
            or not set(info) <= {"location", "offset", "length"}
        ):
            raise _reject(
                f"tensor {t.name!r} reads external data {info.get('location', '')!r}: only "
                "the sealed weights may be external"
            )


def check_onnx_graph(graph: bytes, *, weights: set[str], limits: Limits) -> Any:
    """Structural checks of a decrypted ONNX graph; returns the parsed ``ModelProto``."""
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(graph)
    except Exception as e:  # protobuf's DecodeError (depth, truncation), RecursionError
        raise _reject(f"the graph does not parse: {e}") from e
    if len(model.functions) > MAX_FUNCTIONS:
        raise _reject(f"more than {MAX_FUNCTIONS} local functions")
    functions = {(f.domain, f.name): f for f in model.functions}
    calls: dict[tuple[str, str], set[tuple[str, str]]] = {key: set() for key in functions}

    def check_nodes(nodes: Any, depth: int, owner: tuple[str, str] | None) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if owner is not None:
                    calls[owner].add(key)
            elif node.domain not in STANDARD_DOMAINS:
                raise _reject(
                    f"node {node.name or node.op_type!r} uses operator domain {node.domain!r}, "
                    "which this agent does not run"
                )
            for t in _attr_tensors(node):
                _check_tensor(t, weights=weights, top_level=False, limits=limits)
            for g in _subgraphs(node):
                check_graph(g, depth + 1, owner)

    def check_graph(g: Any, depth: int, owner: tuple[str, str] | None) -> None:
        if depth > MAX_DEPTH:
            raise _reject(f"subgraphs are nested more than {MAX_DEPTH} deep")
        for t in g.initializer:
            _check_tensor(t, weights=weights, top_level=depth == 0 and owner is None, limits=limits)
        for sp in g.sparse_initializer:
            for t in (sp.values, sp.indices):
                _check_tensor(t, weights=weights, top_level=False, limits=limits)
        check_nodes(g.node, depth, owner)

    check_graph(model.graph, 0, None)
    for key, f in functions.items():
        check_nodes(f.node, 0, key)

    # Local functions may call each other, but not in a cycle or a long chain.
    depth_of: dict[tuple[str, str], int] = {}

    def call_depth(key: tuple[str, str], path: tuple[tuple[str, str], ...]) -> int:
        if key in path:
            raise _reject(f"local function {key[1]!r} calls itself")
        if len(path) > MAX_DEPTH:
            raise _reject(f"local function calls are nested more than {MAX_DEPTH} deep")
        if key not in depth_of:
            depth_of[key] = 1 + max((call_depth(c, (*path, key)) for c in calls[key]), default=0)
        return depth_of[key]

    for key in functions:
        call_depth(key, ())
    return model


def _load_onnx(graph: bytes, entries: list[dict[str, Any]], runtime: dict[str, Any]) -> None:
    import numpy as np
    import onnxruntime as ort

    from edgeseal.core.config import RuntimeConfig
    from edgeseal.core.ortsession import hand_over, session_options

    config = RuntimeConfig(
        graph_optimization=str(runtime.get("graph_optimization", "basic")),
        disable_prepacking=bool(runtime.get("disable_prepacking", True)),
    )
    so = session_options(config, threads=1)
    # Zeros stand in for the weights: this child never sees them.
    zeros = [
        (str(e["name"]), np.zeros(tuple(e["shape"]), dtype=np.dtype(e["dtype"]).newbyteorder("<")))
        for e in entries
    ]
    keep = hand_over(so, zeros, level=config.graph_optimization)
    try:
        ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise _reject(f"ONNX Runtime refuses it: {e}") from e
    finally:
        del keep


def _load_tflite(model: bytes, runtime: dict[str, Any]) -> None:
    from edgeseal.agent.runtimes import find_tflite_interpreter, tflite_options

    found = find_tflite_interpreter()
    try:  # as the session will load it (XNNPACK on or off)
        options = tflite_options(found, xnnpack=bool(runtime.get("tflite_xnnpack", True)))
    except RuntimeBackendError:
        options = {}  # the session itself then says what is wrong with the config
    try:
        interp = found.cls(model_content=model, num_threads=1, **options)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise _reject(f"LiteRT refuses it: {e}") from e


def _check(request: dict[str, Any], payload: bytes) -> None:
    limits = Limits(**request["limits"])
    if request["format"] == "tflite":
        _load_tflite(payload, request["runtime"])
        return
    entries = request["weights"]
    check_onnx_graph(payload, weights={e["name"] for e in entries}, limits=limits)
    _load_onnx(payload, entries, request["runtime"])


def answer_for(data: bytes) -> bytes:
    """One check, as the child runs it: ``data`` is the request (a length-prefixed JSON
    header, then the graph); returns the JSON answer. Never raises for a bad model."""
    try:
        (n,) = struct.unpack(">I", data[:4])
        request = json.loads(data[4 : 4 + n])
        _check(request, data[4 + n :])
        answer: dict[str, Any] = {"ok": True}
    except ModelRejectedError as e:
        answer = {"ok": False, "message": str(e)}
    except Exception as e:  # an unexpected failure is a refusal too, never a pass
        answer = {"ok": False, "message": f"pre-flight check failed: {type(e).__name__}: {e}"}
    return json.dumps(answer).encode()


def main() -> None:
    """``python -m edgeseal.agent.preflight``: the pre-flight server (see
    :mod:`edgeseal.agent.preflight_server`)."""
    from edgeseal.agent.preflight_server import main as serve

    serve()


# --- the agent's side ----------------------------------------------------------------


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


#: How long past a check's deadline the agent waits for the server's own report before it
#: takes the server for hung and kills it.
SERVER_GRACE = 2.0
MAX_ANSWER_BYTES = 1 << 16


class _Server:
    """One running pre-flight server and the agent's end of its control socket."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = tuple(command)
        #: The process that started it: a process forked from that one (multiprocessing)
        #: inherits this object but must neither use nor stop its parent's server.
        self.owner = os.getpid()
        ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, **_SINGLE_THREADED}
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                list(command), stdin=theirs.fileno(), env=env, close_fds=True
            )
        except OSError:
            ctl.close()
            raise
        finally:
            theirs.close()
        self.ctl = ctl

    def mine(self) -> bool:
        return self.owner == os.getpid()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.ctl.close()  # the server exits when its control socket closes
        if not self.mine():
            return
        try:
            self.proc.wait(timeout=SERVER_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.ctl.close()
        if not self.mine():
            return
        self.proc.kill()
        self.proc.wait()


#: Keeps the server single-threaded, so forking it is safe: no BLAS or OpenMP thread pools.
_SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class Preflight:
    """Runs the pre-flight check of each model in a child forked for it by a pre-flight
    server (:mod:`edgeseal.agent.preflight_server`), which this object starts on its first
    check (``command``) and restarts when it has died or ``command`` has changed.

    Checks are serialised. ``timeout`` bounds each check, including the server's start
    when it is started for it; a check past it is killed, and a server that does not
    report within :data:`SERVER_GRACE` after that is killed too."""

    def __init__(
        self, command: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.command: Sequence[str] = (
            command if command is not None else [sys.executable, "-m", "edgeseal.agent.preflight"]
        )
        self.timeout = timeout
        self._check_lock = threading.Lock()
        self._server: _Server | None = None
        self._finalizer = weakref.finalize(self, Preflight._stop, [None])

    @staticmethod
    def _stop(holder: list[_Server | None]) -> None:
        if holder[0] is not None:
            holder[0].close()

    def _ensure_server(self) -> _Server:
        server = self._server
        if server is not None and not server.mine():
            server.ctl.close()  # our copy of the socket; the parent's server serves on
            server = self._server = None
        if server is not None and (not server.alive() or server.command != tuple(self.command)):
            server.kill()
            server = self._server = None
        if server is None:
            try:
                server = _Server(self.command)
            except OSError as e:
                raise RuntimeBackendError(f"cannot start the pre-flight server: {e}") from e
            self._server = server
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, Preflight._stop, [server])
        return server

    def close(self) -> None:
        """Stop the server (a later check starts a new one)."""
        with self._check_lock:
            if self._server is not None:
                self._server.close()
                self._server = None

    def check(
        self,
        *,
        model_format: str,
        graph: bytes,
        weights: Sequence[TensorEntry],
        limits: Limits,
        runtime: RuntimeConfig,
    ) -> None:
        request = json.dumps(
            {
                "format": model_format,
                "weights": [
                    {"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in weights
                ],
                "limits": {
                    "max_manifest_bytes": limits.max_manifest_bytes,
                    "max_trust_bytes": limits.max_trust_bytes,
                    "max_section_bytes": limits.max_section_bytes,
                    "max_chunk_bytes": limits.max_chunk_bytes,
                    "max_sections": limits.max_sections,
                    "max_recipients": limits.max_recipients,
                },
                "runtime": {
                    "graph_optimization": runtime.graph_optimization,
                    "disable_prepacking": runtime.disable_prepacking,
                    "tflite_xnnpack": runtime.tflite_xnnpack,
                },
            }
        ).encode()
        header = struct.pack(">I", len(request)) + request
        # The message holds the graph (for TFLite, the whole model): assembled in a locked
        # buffer and wiped, never as a heap copy left behind, unwiped, once freed. It goes
        # to the child through a socket pair, never through a file.
        message = SecretBuffer(len(header) + len(graph))
        try:
            message.view[: len(header)] = header
            message.view[len(header) :] = graph
            with self._check_lock:
                answer, code, timed_out = self._run(message.view)
        finally:
            message.close()
        if timed_out:
            raise RuntimeCrashError(
                f"loading the model did not finish within {self.timeout:g} s (child killed)"
            )
        if code < 0:
            raise RuntimeCrashError(
                f"loading the model crashed the runtime ({_signal_name(code)}); "
                "the agent is unaffected"
            )
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise RuntimeCrashError(
                f"the pre-flight child exited with status {code} without an answer"
            )
        if not parsed.get("ok"):
            raise ModelRejectedError(str(parsed.get("message", "refused")))

    def _run(self, message: memoryview) -> tuple[bytes, int, bool]:
        """One check through the server: (the child's answer, its exit status, whether it
        was killed at the deadline)."""
        deadline = time.monotonic() + self.timeout
        server = self._ensure_server()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                socket.send_fds(server.ctl, [REQUEST.pack(b"C", self.timeout)], [theirs.fileno()])
            finally:
                theirs.close()
            answer = b""
            try:
                mine.settimeout(max(0.001, deadline - time.monotonic()))
                mine.sendall(message)
                mine.shutdown(socket.SHUT_WR)
                while len(answer) <= MAX_ANSWER_BYTES and (chunk := mine.recv(1 << 16)):
                    answer += chunk
            except OSError:  # the child died or hung: the server says which
                pass
            server.ctl.settimeout(max(0.001, deadline - time.monotonic()) + SERVER_GRACE)
            status = _recv_exact(server.ctl, STATUS.size)
        except OSError as e:
            server.kill()
            self._server = None
            if isinstance(e, TimeoutError):
                return b"", 0, True
            raise RuntimeCrashError(f"the pre-flight server failed: {e}") from e
        finally:
            mine.close()
        if len(status) != STATUS.size:
            server.kill()
            self._server = None
            raise RuntimeCrashError("the pre-flight server exited during the check")
        code, timed_out = STATUS.unpack(status)
        return answer, code, timed_out


class UnsafeNoPreflight(Preflight):
    """Loads models without the child-process check: a crash in the runtime then takes
    the caller down. For benchmarks and debugging only."""

    def check(self, **kwargs: Any) -> None:
        log.warning("UnsafeNoPreflight: loading a model without the pre-flight check")


class InstalledSlot(Preflight):
    """For opening a slot the model store holds as good (at start and on reload): its bundle
    passed the pre-flight when it was staged, and the signature and chunk digests checked
    on every open prove it is still that bundle, so the child is not run again. Boards
    start serving seconds sooner; a new bundle always goes through :class:`Preflight`."""

    def check(self, **kwargs: Any) -> None:
        return None


_DEFAULT = Preflight()


def default_preflight() -> Preflight:
    """The pre-flight every :func:`~edgeseal.agent.opener.open_bundle` uses by default."""
    return _DEFAULT


if __name__ == "__main__":
    main()
