"""ONNX models: read the I/O schema and split the graph from its weights.

The split is what lets the agent keep exactly one plaintext copy of the weights: the
``graph`` section keeps every initializer's name, type and shape but no data, and the
``weights`` section holds the data, aligned, for the agent to hand to ONNX Runtime as
views of its locked buffer (``SessionOptions.add_initializer``). Initializers smaller
than ``min_bytes`` (shape constants and the like) and those of types the weights section
cannot carry stay in the graph, which is sealed as well.

ONNX Runtime's graph optimizations (constant folding from ``basic`` on, fusions above)
read initializers from the graph before the session takes the weights handed over from
memory, so a split graph must not leave them anything to compute from moved weights:
:func:`fold_constants` evaluates every node whose inputs are all constants at pack time
(e.g. the ``Reshape`` that ``quantize_dynamic`` puts over each Conv bias), and the
packager seals the folded graph. ``edgeseal.packager.devicecheck`` then proves it by
opening the split form as the device does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeseal.core.errors import EdgesealError
from edgeseal.core.manifest import TensorSpec
from edgeseal.core.weights import DTYPE_SIZES, PLACEHOLDER_LOCATION, build_weights_section

__all__ = [
    "ModelError",
    "SplitModel",
    "dim_hints",
    "fold_constants",
    "load_onnx",
    "observed_outputs",
    "onnx_io",
    "split_onnx",
    "with_output_shapes",
]

MIN_WEIGHT_BYTES = 256
#: Operators never folded at pack time: quantize/dequantize pairs stay for ONNX Runtime's
#: int8 kernels (its own constant folding leaves them too), random ops are not constant,
#: sequences and optionals are not tensors an initializer can hold.
_NO_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "SequenceConstruct",
        "SequenceEmpty",
        "SplitToSequence",
        "Optional",
        "If",
        "Loop",
        "Scan",
    }
)


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


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Every name a graph's nodes read, nested subgraphs included."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _subgraph_inputs(attr.g)
            for g in attr.graphs:
                names |= _subgraph_inputs(g)
    return names


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every main-graph node whose inputs are all constants replaced by
    initializers holding its outputs (computed by ONNX Runtime, optimizations off), and
    the initializers only those nodes read dropped; and how many nodes were folded.

    Constants are initializers that are not also graph inputs (those can be overridden)
    and the outputs of folded nodes. Nodes producing graph outputs, nodes with subgraphs
    and :data:`_NO_FOLD` operators stay."""
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    constants = {i.name for i in graph.initializer if i.name not in graph_inputs}
    outputs = {o.name for o in graph.output}
    folded: list[onnx.NodeProto] = []
    folded_at: set[int] = set()
    for index, node in enumerate(graph.node):  # ONNX requires topological order
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and all(i == "" or i in constants for i in node.input)
            and not any(o in outputs for o in node.output)
            and not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
        ):
            folded.append(node)
            folded_at.add(index)
            constants.update(o for o in node.output if o)
    if not folded:
        return model, 0
    import onnxruntime as ort

    needed = {i for n in folded for i in n.input if i}
    produced = [o for n in folded for o in n.output if o]
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    del sub.graph.node[:], sub.graph.input[:], sub.graph.output[:], sub.graph.value_info[:]
    del sub.graph.initializer[:]
    sub.graph.node.extend(folded)
    sub.graph.initializer.extend(i for i in graph.initializer if i.name in needed)
    sub.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in produced)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            sub.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        values = dict(zip(produced, session.run(produced, {}), strict=True))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelError(f"cannot fold the model's constant subgraphs: {e}") from e
    if not all(isinstance(v, np.ndarray) for v in values.values()):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept_nodes = [n for i, n in enumerate(graph.node) if i not in folded_at]
    del out.graph.node[:]
    out.graph.node.extend(kept_nodes)
    read = _subgraph_inputs(out.graph) | outputs
    kept_inits = [i for i in graph.initializer if i.name in read or i.name in graph_inputs]
    new_inits = [numpy_helper.from_array(values[o], o) for o in produced if o in read]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept_inits, *new_inits])
    return out, len(folded)


def observed_outputs(
    model: onnx.ModelProto,
    data: Any,
    layout: Any,
    declared: tuple[TensorSpec, ...],
) -> tuple[TensorSpec, ...]:
    """The output specs as the model really computes them: ``model`` run (ONNX Runtime,
    basic optimizations) on one batch of ``data`` and, when the batch is free, on two
    rows as well. A dimension that changes between the runs is symbolic (the declared
    name where there was one, else the batch's); one that does not keeps a declared
    symbolic name (it may follow another input's size) or takes the observed size.
    Outputs that are not tensors keep their declaration.

    ``data`` is an :class:`edgeseal.packager.datasets.InputData`, ``layout`` its
    :class:`~edgeseal.packager.datasets.BatchLayout`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    first = session.run(None, data.feed(0, layout.fixed or 1))
    second = session.run(None, data.feed(0, 2)) if layout.fixed is None and data.rows >= 2 else None
    specs = []
    for i, spec in enumerate(declared):
        a = first[i]
        if not isinstance(a, np.ndarray):
            specs.append(spec)
            continue
        b = second[i] if second is not None else None
        same_rank = len(spec.shape) == a.ndim
        dims: list[int | str] = []
        for axis, size in enumerate(a.shape):
            was = spec.shape[axis] if same_rank else None
            varies = isinstance(b, np.ndarray) and b.ndim == a.ndim and b.shape[axis] != size
            if varies:
                dims.append(was if isinstance(was, str) else (layout.name or "batch"))
            elif isinstance(was, str):
                dims.append(was)
            else:
                dims.append(int(size))
        specs.append(TensorSpec(spec.name, spec.dtype, tuple(dims)))
    return tuple(specs)


def with_output_shapes(model: onnx.ModelProto, specs: tuple[TensorSpec, ...]) -> onnx.ModelProto:
    """``model`` with its graph outputs declaring the shapes of ``specs`` (ONNX Runtime
    checks every result against the declaration, and logs each mismatch)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {s.name: s for s in specs}
    for vi in out.graph.output:
        spec = by_name.get(vi.name)
        if spec is None or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in spec.shape:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif d != "?":
                dim.dim_param = d
    return out


def dim_hints(model: onnx.ModelProto) -> dict[str, int]:
    """Sizes the model's weights imply for its inputs' symbolic dims, keyed by dim name
    (or ``input:axis`` for an unnamed one): an input read directly by ``MatMul`` or
    ``Gemm`` with a weight matrix (its inner dimension), or by ``Conv`` (its channels)."""
    graph = model.graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    ranks = {
        i.name: list(i.type.tensor_type.shape.dim) for i in graph.input if i.name not in weights
    }
    hints: dict[str, int] = {}

    def hint(name: str, axis: int, size: int) -> None:
        dims = ranks[name]
        if not -len(dims) <= axis < len(dims) or size <= 0:
            return
        d = dims[axis]
        if not d.HasField("dim_value"):
            hints.setdefault(d.dim_param or f"{name}:{axis % len(dims)}", size)

    for node in graph.node:
        if not node.input or node.input[0] not in ranks or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        if w is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" and len(w) >= 2:
            hint(node.input[0], -1, w[-2])
        elif node.op_type == "Gemm" and len(w) == 2:
            inner = w[1] if attrs.get("transB") else w[0]
            hint(node.input[0], 0 if attrs.get("transA") else 1, inner)
        elif node.op_type == "Conv" and len(w) >= 3:
            hint(node.input[0], 1, w[1] * int(attrs.get("group", 1)))
    return hints


#: Beyond this a model cannot be saved as one protobuf for ONNX Runtime to optimize.
_MAX_OFFLINE_BYTES = 1 << 30


def optimize_offline(model: onnx.ModelProto, work: Path) -> onnx.ModelProto:
    """``model`` after ONNX Runtime's basic graph optimizations (constant folding, and
    fusions such as Conv with BatchNormalization, Add or Mul), computed once here.

    The device builds its session from the graph with the weights handed over from
    memory; at "basic" ONNX Runtime would rerun these optimizations there, and the ones
    that rewrite weights read them from the graph's external-data placeholder instead
    (the device refused such models, or pack did). Sealing the optimized graph leaves
    the device's basic pass nothing to rewrite. Basic optimizations use standard
    operators only, so the graph stays portable across CPUs and providers. A model too
    large for one protobuf is returned as it is."""
    if model.ByteSize() > _MAX_OFFLINE_BYTES:
        return model
    import onnxruntime as ort

    src, dst = work / "offline-in.onnx", work / "offline-out.onnx"
    try:
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelError(f"ONNX Runtime cannot optimize the model: {e}") from e
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
