"""Open the sealed form of an ONNX model as the device will, before the bundle is written.

The agent builds its session from the ``graph`` section (weights replaced by
placeholders) with the weights handed over from memory (``SessionOptions.add_initializer``,
:class:`edgeseal.agent.runtimes.OnnxSession`), with the session options of its
``[runtime]`` config. ONNX Runtime's graph optimizations read initializers from the
graph, not from the handed-over values, so a model that runs from its file can still
fail there. :func:`check_split_onnx` does exactly what the device does (same options,
same placeholder folder, weights as views of one buffer) and replays the golden vectors
the device will replay; a failure is :class:`DeviceCheckError` and nothing is sealed.

Levels above ``basic`` read weights in more optimizers (layout, QDQ and fusions), which
handed-over weights cannot serve: a device configured so refuses such models, and so
does this check when the workstation's ``[runtime] graph_optimization`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.config import RuntimeConfig
from edgeseal.core.golden import check_golden
from edgeseal.core.weights import PLACEHOLDER_DIR, parse_weights_index
from edgeseal.packager.onnx_model import ModelError

__all__ = ["DeviceCheckError", "check_split_onnx", "split_onnx_opens"]

#: The agent's names for ONNX Runtime's optimization levels (edgeseal.agent.runtimes).
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class DeviceCheckError(ModelError):
    """The sealed form of the model does not open or does not pass its golden check the
    way the device runs it, so no bundle is written."""

    hint = (
        "nothing was sealed; try another --quantize mode, or [runtime] graph_optimization "
        "= basic (the agent's default); report the model if it runs from its file"
    )


def split_onnx_opens(graph: bytes, weights: bytes | bytearray, runtime: RuntimeConfig) -> bool:
    """Whether ONNX Runtime builds the session from the sealed form as the agent does
    (without running it): pack's cheap probe before it decides to optimize offline."""
    try:
        _session(graph, weights, runtime)
    except DeviceCheckError:
        return False
    return True


def check_split_onnx(
    graph: bytes,
    weights: bytes | bytearray,
    golden: Mapping[str, Any],
    runtime: RuntimeConfig,
) -> None:
    """Build the session as the agent does and replay ``golden``; raises
    :class:`DeviceCheckError` naming the optimization level and why."""
    session, where, _keep = _session(graph, weights, runtime)
    names = [o.name for o in session.get_outputs()]

    def run(feed: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return dict(zip(names, session.run(None, feed), strict=True))

    try:
        problems = check_golden(run, golden)
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/... types
        raise DeviceCheckError(
            f"the sealed model fails to run its golden vectors {where}: {_short(e)}"
        ) from e
    if problems:
        raise DeviceCheckError(
            f"the sealed model fails its golden check {where}: " + "; ".join(problems[:3])
        )


def _session(
    graph: bytes, weights: bytes | bytearray, runtime: RuntimeConfig
) -> tuple[Any, str, list[tuple[npt.NDArray[Any], Any]]]:
    """The session the agent builds, where it was built (for messages), and the arrays
    and OrtValues it was given, which the caller keeps alive as long as the session."""
    import onnxruntime as ort

    level = runtime.graph_optimization
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
    if runtime.intra_op_threads:
        so.intra_op_num_threads = runtime.intra_op_threads
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", PLACEHOLDER_DIR
    )
    if runtime.disable_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    buffer = memoryview(bytes(weights))
    keep: list[tuple[npt.NDArray[Any], Any]] = []  # ORT does not keep OrtValues alive
    for e in parse_weights_index(buffer):
        arr = np.frombuffer(
            buffer,
            dtype=np.dtype(e.dtype).newbyteorder("<"),
            count=int(np.prod(e.shape)),
            offset=e.offset,
        ).reshape(e.shape)
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        keep.append((arr, value))
        so.add_initializer(e.name, value)
    where = f"as the device opens it (graph_optimization = {level!r}, weights from memory)"
    try:
        session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise DeviceCheckError(
            f"ONNX Runtime cannot build the sealed model {where}: {_short(e)}"
        ) from e
    return session, where, keep


def _short(e: BaseException) -> str:
    """ONNX Runtime's message without the C++ source location prefix."""
    text = str(e)
    return text.rsplit(" : ", 1)[-1].strip() if " : " in text else text
