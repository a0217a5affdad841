"""Open the sealed form of an ONNX model as the device will, before the bundle is written.

The agent builds its session from the ``graph`` section (weights replaced by
placeholders) with the weights handed over from memory, with the session options of its
``[runtime]`` config (:mod:`edgeseal.core.ortsession`, shared with the agent). At
``basic`` and below the weights stay in the agent's locked buffer, out of the graph
optimizers' sight, so a model that runs from its file can still fail there (pack folds
what it can beforehand); above ``basic`` they go into the graph and every optimization
can read them. :func:`check_split_onnx` builds the session exactly so and replays the
golden vectors the device will replay; a failure is :class:`DeviceCheckError` and
nothing is sealed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from edgeseal.core.config import RuntimeConfig
from edgeseal.core.golden import check_golden
from edgeseal.core.ortsession import hand_over, session_options, weight_views, weights_visible
from edgeseal.core.weights import PLACEHOLDER_DIR, PLACEHOLDER_LOCATION, parse_weights_index
from edgeseal.packager.onnx_model import ModelError

__all__ = ["DeviceCheckError", "check_split_onnx", "split_onnx_opens"]


class DeviceCheckError(ModelError):
    """The sealed form of the model does not open or does not pass its golden check the
    way the device runs it, so no bundle is written."""

    hint = (
        "nothing was sealed; try another --quantize mode, or another [runtime] "
        "graph_optimization (the same on the workstation and the devices); report the "
        "model if it runs from its file"
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
) -> tuple[Any, str, list[Any]]:
    """The session the agent builds, where it was built (for messages), and the
    OrtValues it was given, which the caller keeps alive as long as the session."""
    import onnxruntime as ort

    level = runtime.graph_optimization
    so = session_options(runtime)
    so.log_severity_level = 3
    buffer = memoryview(bytes(weights))
    keep = hand_over(so, weight_views(buffer, parse_weights_index(buffer)), level=level)
    handed = (
        "weights handed over into the graph" if weights_visible(level) else ("weights from memory")
    )
    where = f"as the device opens it (graph_optimization = {level!r}, {handed})"
    try:
        session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise DeviceCheckError(
            f"ONNX Runtime cannot build the sealed model {where}: {_why(e)}"
        ) from e
    return session, where, keep


def _why(e: BaseException) -> str:
    """ONNX Runtime's reason, and what it means when an optimizer read a placeholder."""
    text = _short(e)
    if PLACEHOLDER_DIR + "/" + PLACEHOLDER_LOCATION in text:
        return (
            "an optimization at this level must read weights the device hands over from "
            "its locked memory, where ONNX Runtime's optimizers cannot see them (for "
            "example the float32 copies its CPU provider makes of float16 weights); "
            "levels extended and all hand them over into the graph, at the cost of a "
            f"copy ({text})"
        )
    return text


def _short(e: BaseException) -> str:
    """ONNX Runtime's message without the C++ source location prefix."""
    text = str(e)
    return text.rsplit(" : ", 1)[-1].strip() if " : " in text else text
