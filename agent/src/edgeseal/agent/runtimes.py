"""Inference runtimes fed from memory: ONNX Runtime and LiteRT.

ONNX Runtime gets the weight-less graph as bytes and every large tensor as an
``OrtValue`` viewing the locked weights buffer (``SessionOptions.add_initializer``), so
the weights exist once in the process. The buffer, the numpy views, the OrtValues and
the session are owned together by :class:`OnnxSession` and released together: ORT's
Python binding does not keep an OrtValue alive, and a freed one crashes session creation.

LiteRT's Python API only takes an immutable ``bytes`` model, which cannot be wiped:
:class:`TfliteSession` says so in its status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from edgeseal.core.config import RuntimeConfig
from edgeseal.core.errors import MissingExtraError, RuntimeBackendError
from edgeseal.core.weights import PLACEHOLDER_DIR, TensorEntry

__all__ = ["InferenceSession", "OnnxSession", "TfliteSession", "available_providers"]

log = logging.getLogger(__name__)
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class InferenceSession(Protocol):
    runtime: str

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingExtraError(
            "running ONNX models needs ONNX Runtime: pip install onnxruntime"
        ) from e
    return onnxruntime


def available_providers(requested: tuple[str, ...]) -> list[str]:
    """The requested execution providers this ONNX Runtime has, CPU always last."""
    have = set(_ort().get_available_providers())
    chosen = [p for p in requested if p in have and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


class OnnxSession:
    runtime = "onnxruntime"

    def __init__(
        self,
        graph: bytes,
        weights: memoryview | None,
        entries: list[TensorEntry],
        config: RuntimeConfig,
        *,
        providers: tuple[str, ...] = (),
    ) -> None:
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[config.graph_optimization]
        )
        if config.intra_op_threads:
            so.intra_op_num_threads = config.intra_op_threads
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", PLACEHOLDER_DIR
        )
        if config.disable_prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        self._arrays: list[np.ndarray] = []
        self._values: list[Any] = []
        for e in entries:
            assert weights is not None
            arr = np.frombuffer(
                weights,
                dtype=np.dtype(e.dtype).newbyteorder("<"),
                count=int(np.prod(e.shape)),
                offset=e.offset,
            ).reshape(e.shape)
            value = ort.OrtValue.ortvalue_from_numpy(arr)
            self._arrays.append(arr)
            self._values.append(value)
            so.add_initializer(e.name, value)
        self.providers = available_providers(providers or config.providers)
        try:
            self._session = ort.InferenceSession(graph, so, providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            self.close()
            raise RuntimeBackendError(f"ONNX Runtime refused the model: {e}") from e
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._session.run(None, dict(inputs))
        except Exception as e:
            raise RuntimeBackendError(f"inference failed: {e}") from e
        return dict(zip(self.output_names, results, strict=False))

    def close(self) -> None:
        self._session = None
        self._values.clear()
        self._arrays.clear()

    def status(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "providers": self.providers,
            "weights_handed_over": "OrtValue views of the locked buffer (no copy)",
        }


class TfliteSession:
    runtime = "litert"

    def __init__(self, model: bytes, config: RuntimeConfig) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter
            except ImportError as e:
                raise MissingExtraError(
                    "running TFLite models needs LiteRT: pip install "
                    "ai-edge-litert (or tflite-runtime with numpy<2)"
                ) from e
        try:
            self._interp: Any = Interpreter(
                model_content=model, num_threads=config.intra_op_threads or None
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeBackendError(f"LiteRT refused the model: {e}") from e
        self._inputs = {d["name"]: d for d in self._interp.get_input_details()}
        self._outputs = self._interp.get_output_details()
        self.input_names = list(self._inputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            for name, value in inputs.items():
                d = self._inputs[name]
                if tuple(value.shape) != tuple(d["shape"]):
                    self._interp.resize_tensor_input(d["index"], value.shape)
                    self._interp.allocate_tensors()
                self._interp.set_tensor(d["index"], value)
            self._interp.invoke()
            return {d["name"]: self._interp.get_tensor(d["index"]).copy() for d in self._outputs}
        except (ValueError, RuntimeError, KeyError) as e:
            raise RuntimeBackendError(f"inference failed: {e}") from e

    def close(self) -> None:
        self._interp = None

    def status(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "weights_handed_over": "as immutable bytes: LiteRT's Python API copies the "
            "model and the copy cannot be wiped",
        }
