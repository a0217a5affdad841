"""How the device opens a sealed ONNX model in ONNX Runtime: the session options its
``[runtime]`` config asks for, and how the weights are handed over. Stable API.

One place for what three callers must do alike: the agent's sessions
(:class:`edgeseal.agent.runtimes.OnnxSession`), the agent's pre-flight child (zeros in
place of the weights) and the packager, which opens what it seals as the device will
(``edgeseal.packager.devicecheck``). ONNX Runtime is imported when called: the
distributions that call this depend on it, core does not.

The ``graph`` section keeps every large initializer's name, type and shape and points
its data at a placeholder (:data:`~edgeseal.core.weights.PLACEHOLDER_LOCATION`). The
weights are handed over from memory in one of two ways, by optimization level:

- ``disable`` and ``basic`` (the default): ``SessionOptions.add_initializer``, an
  ``OrtValue`` viewing each tensor in place. No copy: the weights exist once, in the
  agent's locked buffer. ONNX Runtime's graph optimizers do not see these values; an
  optimizer that must read a weight reads the placeholder and the session fails. Pack
  folds such computations into the sealed graph ahead of time, or refuses the model.
- ``extended`` and ``all``: ``SessionOptions.add_external_initializers``, which puts the
  values into the graph before it is optimized, so layout transforms, fusions and the
  CPU provider's float16-to-float32 casts can read them. ONNX Runtime then keeps its own
  copy of the weights, outside the locked buffer (ONNX Runtime 1.32 copies them; these
  levels already derive transformed copies of weights there). docs/agent.md's memory
  table says what each level costs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.config import RuntimeConfig
from edgeseal.core.weights import PLACEHOLDER_DIR, TensorEntry

__all__ = ["OPT_LEVELS", "hand_over", "session_options", "weight_views", "weights_visible"]

#: ``[runtime] graph_optimization`` -> ONNX Runtime's ``GraphOptimizationLevel`` name.
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def weights_visible(level: str) -> bool:
    """Whether the weights are handed over visible to the graph optimizers (a copy)."""
    return level in ("extended", "all")


def session_options(runtime: RuntimeConfig, *, threads: int | None = None) -> Any:
    """``SessionOptions`` as the device builds them from ``runtime`` (``threads``
    overrides ``intra_op_threads``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPT_LEVELS[runtime.graph_optimization]
    )
    count = runtime.intra_op_threads if threads is None else threads
    if count:
        so.intra_op_num_threads = count
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", PLACEHOLDER_DIR
    )
    if runtime.disable_prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def weight_views(
    buffer: memoryview, entries: Iterable[TensorEntry]
) -> list[tuple[str, npt.NDArray[Any]]]:
    """Each tensor of a weights section as a numpy view of ``buffer`` (no copy)."""
    return [
        (
            e.name,
            np.frombuffer(
                buffer,
                dtype=np.dtype(e.dtype).newbyteorder("<"),
                count=int(np.prod(e.shape)),
                offset=e.offset,
            ).reshape(e.shape),
        )
        for e in entries
    ]


def hand_over(so: Any, tensors: Iterable[tuple[str, npt.NDArray[Any]]], *, level: str) -> list[Any]:
    """Give ONNX Runtime the weights, as the module docstring says for ``level``.
    Returns the ``OrtValue``\\ s: ORT's Python binding does not keep them alive, and a
    freed one crashes session creation, so the caller holds them (and the arrays they
    view) as long as the session."""
    import onnxruntime as ort

    names: list[str] = []
    values: list[Any] = []
    for name, array in tensors:
        names.append(name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if weights_visible(level):
        if names:
            so.add_external_initializers(names, values)
    else:
        for name, value in zip(names, values, strict=True):
            so.add_initializer(name, value)
    return values
