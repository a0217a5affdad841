"""ONNX models: read the I/O schema and split the graph from its weights.

The split is what lets the agent keep exactly one plaintext copy of the weights: the
``graph`` section keeps every initializer's name, type and shape but no data, and the
``weights`` section holds the data, aligned, for the agent to hand to ONNX Runtime as
views of its locked buffer (``SessionOptions.add_initializer``). Initializers smaller
than ``min_bytes`` (shape constants and the like) and those of types the weights section
cannot carry stay in the graph, which is sealed as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeseal.core.errors import EdgesealError
from edgeseal.core.manifest import TensorSpec
from edgeseal.core.weights import DTYPE_SIZES, PLACEHOLDER_LOCATION, build_weights_section

__all__ = ["ModelError", "SplitModel", "load_onnx", "onnx_io", "split_onnx"]

MIN_WEIGHT_BYTES = 256


class ModelError(EdgesealError):
    """The model file cannot be read or is not a model edgeseal can pack."""


@dataclass(frozen=True)
class SplitModel:
    graph: bytes
    weights: bytearray
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    moved_tensors: int
    moved_bytes: int
    kept_tensors: int


def load_onnx(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelError(f"{path} is not a readable ONNX model: {e}") from e


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    dims: list[int | str] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return TensorSpec(vi.name, dtype, tuple(dims))


def onnx_io(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    init_names = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in init_names)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return inputs, outputs


def split_onnx(model: onnx.ModelProto, *, min_bytes: int = MIN_WEIGHT_BYTES) -> SplitModel:
    """Move the main graph's initializers' data into a weights section."""
    inputs, outputs = onnx_io(model)
    tensors: list[tuple[str, str, tuple[int, ...], bytes]] = []
    stubs: list[onnx.TensorProto] = []
    kept = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        dtype = arr.dtype.name
        if dtype not in DTYPE_SIZES or arr.nbytes < min_bytes:
            stubs.append(init)
            kept += 1
            continue
        le = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        tensors.append((init.name, dtype, tuple(int(d) for d in arr.shape), le.tobytes()))
        stub = onnx.TensorProto()
        stub.name = init.name
        stub.data_type = init.data_type
        stub.dims.extend(init.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", PLACEHOLDER_LOCATION),
            ("offset", "0"),
            ("length", str(arr.nbytes)),
        ):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        stubs.append(stub)
    graph_model = onnx.ModelProto()
    graph_model.CopyFrom(model)
    del graph_model.graph.initializer[:]
    graph_model.graph.initializer.extend(stubs)
    return SplitModel(
        graph=graph_model.SerializeToString(),
        weights=build_weights_section(tensors),
        inputs=inputs,
        outputs=outputs,
        moved_tensors=len(tensors),
        moved_bytes=sum(len(t[3]) for t in tensors),
        kept_tensors=kept,
    )
