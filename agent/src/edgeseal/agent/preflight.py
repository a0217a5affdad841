"""Pre-flight: check a decrypted model in a child process before the agent loads it.

A bundle's graph is signed, but a stolen signer key or a subverted packager can seal a
graph made to attack the device: external data pointing at files beside the weights
placeholder (``/dev/shm/...`` is readable through it), custom operator domains, subgraphs
nested deep enough to exhaust a parser's stack, tensors declaring absurd sizes, or a
flatbuffer that crashes the runtime. Runtimes are C++; a crash in one would take the
daemon down with every model it serves.

So before the agent builds a session from a graph, :class:`Preflight` hands the graph
to a fresh child process (``python -m edgeseal.agent.preflight``), which

1. checks its structure (:func:`check_onnx_graph`): external data only through the
   sealed weights' placeholder, standard operator domains (or the model's own local
   functions), subgraph and function nesting at most :data:`MAX_DEPTH` deep, tensor
   sizes within ``limits.max_section_bytes``;
2. builds a session the way the agent will: ONNX Runtime with zero-filled weights of
   the sealed shapes (the weights never leave the agent), or LiteRT with the flatbuffer
   (its tensors allocated).

A refusal is :class:`ModelRejectedError`; a child killed by a signal (SIGSEGV, abort,
the OOM killer) or past its deadline is :class:`RuntimeCrashError`. Either way the agent
lives on and the open fails. The child is undumpable and exits after one model, so the
kernel, not Python, disposes of its copy of the graph.

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
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeseal.agent.memory import SecretBuffer
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


def main() -> None:
    """The child: one request on stdin, one JSON answer on the original stdout."""
    from edgeseal.agent.memory import make_process_undumpable

    make_process_undumpable()
    answer_fd = os.dup(1)
    os.dup2(2, 1)  # whatever a runtime prints goes to stderr, not into the answer
    data = sys.stdin.buffer.read()
    (n,) = struct.unpack(">I", data[:4])
    request = json.loads(data[4 : 4 + n])
    try:
        _check(request, data[4 + n :])
        answer: dict[str, Any] = {"ok": True}
    except ModelRejectedError as e:
        answer = {"ok": False, "message": str(e)}
    except Exception as e:  # an unexpected failure is a refusal too, never a pass
        answer = {"ok": False, "message": f"pre-flight check failed: {type(e).__name__}: {e}"}
    try:
        with os.fdopen(answer_fd, "wb") as out:
            out.write(json.dumps(answer).encode())
    except BrokenPipeError:  # the agent went away (stopped or killed): nobody to answer
        os._exit(1)


# --- the agent's side ----------------------------------------------------------------


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclass
class Preflight:
    """Runs the pre-flight check of one model in a fresh child process."""

    command: Sequence[str] = field(
        default_factory=lambda: [sys.executable, "-m", "edgeseal.agent.preflight"]
    )
    timeout: float = DEFAULT_TIMEOUT

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
        # buffer and wiped, never as a heap copy left behind, unwiped, once freed.
        message = SecretBuffer(len(header) + len(graph))
        try:
            message.view[: len(header)] = header
            message.view[len(header) :] = graph
            proc = subprocess.run(  # noqa: S603 - our own interpreter and module
                list(self.command),
                input=message.view,
                stdout=subprocess.PIPE,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise RuntimeCrashError(
                f"loading the model did not finish within {self.timeout:g} s (child killed)"
            ) from e
        except OSError as e:
            raise RuntimeBackendError(f"cannot start the pre-flight check: {e}") from e
        finally:
            message.close()
        if proc.returncode < 0:
            raise RuntimeCrashError(
                f"loading the model crashed the runtime ({_signal_name(proc.returncode)}); "
                "the agent is unaffected"
            )
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise RuntimeCrashError(
                f"the pre-flight child exited with status {proc.returncode} without an answer"
            )
        if not answer.get("ok"):
            raise ModelRejectedError(str(answer.get("message", "refused")))


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
