"""TFLite models: check the flatbuffer and read its I/O schema with LiteRT."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeseal.core.errors import MissingExtraError
from edgeseal.core.manifest import TensorSpec
from edgeseal.packager.onnx_model import ModelError

__all__ = ["StatefulModelError", "is_tflite", "refuse_stateful", "tflite_io"]


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == b"TFL3"


def tflite_io(data: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Load the model in LiteRT (as the device will) and read its inputs and outputs."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise MissingExtraError(
            "packing TFLite models needs LiteRT: pip install ai-edge-litert"
        ) from e
    try:
        interp = Interpreter(model_content=data)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"LiteRT cannot load this TFLite model: {e}") from e

    def spec(d: dict[str, Any]) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = d["shape"] if sig is None or not len(sig) else sig
        dims = tuple(int(x) if int(x) >= 0 else "?" for x in shape)
        return TensorSpec(str(d["name"]), np.dtype(d["dtype"]).name, dims)

    return (
        tuple(spec(d) for d in interp.get_input_details()),
        tuple(spec(d) for d in interp.get_output_details()),
    )


#: LiteRT ops that keep state in resource variables between invocations.
STATEFUL_OPS = frozenset({"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"})


class StatefulModelError(ModelError):
    """The model keeps state between calls, which the device's checks would disturb."""

    hint = (
        "export the model with its state as explicit inputs and outputs (the caller passes "
        "the state back in), as streaming ONNX models such as silero-vad do"
    )


def refuse_stateful(data: bytes) -> None:
    """Refuse a model that keeps state in resource variables: each answer depends on every
    call before it, so the golden self-tests the device runs at install and periodically
    would change what applications get, and no golden vector can be replayed."""
    from ai_edge_litert.interpreter import Interpreter

    ops = {str(o["op_name"]) for o in Interpreter(model_content=data)._get_ops_details()}
    found = sorted(ops & STATEFUL_OPS)
    if found:
        raise StatefulModelError(
            "this TFLite model keeps state between calls in resource variables "
            f"({', '.join(found)}): the device's golden self-tests would change its answers"
        )


def tflite_tensor_types(data: bytes) -> dict[str, int]:
    """How many tensors of each type the flatbuffer holds (int8, float16, float32...)."""
    from ai_edge_litert.interpreter import Interpreter

    counts: dict[str, int] = {}
    for d in Interpreter(model_content=data).get_tensor_details():
        kind = np.dtype(d["dtype"]).name
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
