"""Small, real sample models made on the spot. Stable API for demos, tests and benchmarks.

Nothing is downloaded: every model is built in memory from weights drawn with
:func:`numpy.random.default_rng`, so the same arguments always give the same bytes.
Each maker that produces a checkable model has a numpy reference computation using
the very same weights, so a caller can compare a runtime's answer with the truth:

* :func:`make_onnx_classifier` / :func:`reference_onnx_classifier`: a two-layer
  perceptron with a softmax head (ONNX, opset 13, IR version 8).
* :func:`make_onnx_weighted`: an ONNX model whose weights add up to a requested size,
  for size and speed benchmarks.
* :func:`make_tflite_dense` / :func:`reference_tflite_dense`: a single fully connected
  layer with a fused ReLU (TFLite flatbuffer; needs the ``ai-edge-litert`` package).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.errors import MissingExtraError

__all__ = [
    "Dataset",
    "make_onnx_classifier",
    "make_onnx_cnn",
    "make_onnx_weighted",
    "make_tflite_dense",
    "make_trained_classifier",
    "reference_onnx_classifier",
    "reference_tflite_dense",
    "synthetic_blobs",
]

FloatArray = npt.NDArray[np.float32]

#: Opset and IR version the ONNX samples are pinned to, so older runtimes load them.
_ONNX_OPSET = 13
_ONNX_IR_VERSION = 8
#: Protobuf refuses to serialize messages of 2 GiB or more; keep a margin for the graph.
_PROTOBUF_LIMIT = 2**31 - 2**20


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _classifier_weights(
    seed: int, n_in: int, hidden: int, n_classes: int
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """The classifier's (W1, b1, W2, b2), all float32, drawn from ``default_rng(seed)``."""
    _check_positive(n_in=n_in, hidden=hidden, n_classes=n_classes)
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_in, hidden), dtype=np.float32) / np.float32(np.sqrt(n_in))
    b1 = rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.1)
    w2 = rng.standard_normal((hidden, n_classes), dtype=np.float32) / np.float32(np.sqrt(hidden))
    b2 = rng.standard_normal(n_classes, dtype=np.float32) * np.float32(0.1)
    return w1, b1, w2, b2


def _dense_weights(seed: int, n_in: int, n_out: int) -> tuple[FloatArray, FloatArray]:
    """The dense layer's weights [n_out, n_in] and bias [n_out], float32, from ``seed``."""
    _check_positive(n_in=n_in, n_out=n_out)
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
    bias = rng.standard_normal(n_out, dtype=np.float32) * np.float32(0.1)
    return weights, bias


def _onnx_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """Wrap ``graph`` in a model pinned to opset 13 and IR version 8."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _ONNX_OPSET)],
        producer_name="edgeseal.packager.samples",
    )
    model.ir_version = _ONNX_IR_VERSION
    return model


def make_onnx_classifier(
    *, seed: int = 0, n_in: int = 8, hidden: int = 16, n_classes: int = 4
) -> bytes:
    """A serialized ONNX classifier: input ``"input"`` float32 ``["batch", n_in]``.

    The graph is Reshape(to ``[-1, n_in]``, shape from an int64 initializer), MatMul,
    Add, Relu, MatMul, Add and Softmax over the last axis; its output ``"probs"`` is
    float32 ``["batch", n_classes]`` and each row sums to one. The batch dimension is
    symbolic. :func:`reference_onnx_classifier` computes the same function in numpy.
    """
    w1, b1, w2, b2 = _classifier_weights(seed, n_in, hidden, n_classes)
    initializers = [
        numpy_helper.from_array(np.array([-1, n_in], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "W1"], ["h1_mm"], name="dense1"),
        helper.make_node("Add", ["h1_mm", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h1_relu"], name="relu1"),
        helper.make_node("MatMul", ["h1_relu", "W2"], ["logits_mm"], name="dense2"),
        helper.make_node("Add", ["logits_mm", "b2"], ["logits"], name="bias2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgeseal_sample_classifier",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        outputs=[helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=initializers,
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def reference_onnx_classifier(
    x: npt.ArrayLike, *, seed: int = 0, n_in: int = 8, hidden: int = 16, n_classes: int = 4
) -> FloatArray:
    """What :func:`make_onnx_classifier` with the same arguments computes for ``x``.

    ``x`` is reshaped to ``[-1, n_in]``; the result is float32 ``[batch, n_classes]``.
    """
    w1, b1, w2, b2 = _classifier_weights(seed, n_in, hidden, n_classes)
    flat = np.asarray(x, dtype=np.float64).reshape(-1, n_in)
    h = np.maximum(flat @ w1.astype(np.float64) + b1, 0.0)
    logits = h @ w2.astype(np.float64) + b2
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs: FloatArray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def make_onnx_weighted(*, total_weight_bytes: int, seed: int = 0, width: int = 1024) -> bytes:
    """A serialized ONNX model whose float32 weights add up to about ``total_weight_bytes``.

    The graph is a chain of MatMul layers with ``[width, width]`` weights, each followed
    by Tanh to keep values bounded, and a last MatMul of ``[width, k]`` (1 <= k <= width)
    that takes up the remainder, so the total is within ``2 * width`` bytes of the
    request (at least one column). Input ``"input"`` is float32 ``[1, width]``, output
    ``"output"`` is float32 ``[1, k]``. Made for benchmarks; it has no numpy reference.

    Raises:
        ValueError: a size or width is not positive, or the model would reach
            protobuf's 2 GiB limit.
    """
    _check_positive(total_weight_bytes=total_weight_bytes, width=width)
    column_bytes = width * 4
    total_columns = max(1, round(total_weight_bytes / column_bytes))
    if total_columns * column_bytes >= _PROTOBUF_LIMIT:
        raise ValueError(
            f"total_weight_bytes={total_weight_bytes} would reach protobuf's 2 GiB limit"
        )
    n_full = (total_columns - 1) // width
    last_columns = total_columns - n_full * width

    layers = [width] * n_full + [last_columns]
    nodes: list[onnx.NodeProto] = []
    current = "input"
    for index in range(len(layers)):
        product = "output" if index == n_full else f"mm{index}"
        nodes.append(
            helper.make_node("MatMul", [current, f"W{index}"], [product], name=f"dense{index}")
        )
        if index < n_full:
            current = f"act{index}"
            nodes.append(helper.make_node("Tanh", [product], [current], name=f"tanh{index}"))
    graph = helper.make_graph(
        nodes,
        "edgeseal_sample_weighted",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width])],
        outputs=[helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, last_columns])],
    )
    model = _onnx_model(graph)

    # The weights go straight into the model's graph: building them as a list first and
    # handing it to make_graph/make_model would copy hundreds of megabytes twice.
    # Uniform on [-a, a) with a = sqrt(3 / width) has variance 1 / width, which keeps the
    # activations of the chain near unit scale; uniform draws are several times cheaper
    # than normal ones at this size.
    rng = np.random.default_rng(seed)
    half_range = np.float32(np.sqrt(3.0 / width))
    for index, columns in enumerate(layers):
        weights = rng.random((width, columns), dtype=np.float32)
        weights -= np.float32(0.5)
        weights *= np.float32(2.0) * half_range
        tensor = model.graph.initializer.add()
        tensor.name = f"W{index}"
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend([width, columns])
        tensor.raw_data = weights.tobytes()
    data: bytes = model.SerializeToString()
    return data


def make_tflite_dense(*, seed: int = 0, n_in: int = 4, n_out: int = 2) -> bytes:
    """A TFLite flatbuffer with one FULLY_CONNECTED op and a fused ReLU.

    Input ``"input"`` is float32 ``[1, n_in]``, output ``"output"`` float32
    ``[1, n_out]``; weights are float32 ``[n_out, n_in]`` with a bias ``[n_out]``.
    :func:`reference_tflite_dense` computes the same function in numpy.

    Raises:
        MissingExtraError: LiteRT (``ai-edge-litert``), whose schema module builds the
            flatbuffer, is not installed.
    """
    try:
        import ai_edge_litert.schema_py_generated as schema
        import flatbuffers
    except ImportError as exc:
        raise MissingExtraError(
            "making a TFLite model needs LiteRT: pip install ai-edge-litert"
        ) from exc

    weights, bias = _dense_weights(seed, n_in, n_out)

    def buffer(data: FloatArray | None = None) -> Any:
        buf = schema.BufferT()
        if data is not None:
            buf.data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        return buf

    def tensor(name: str, shape: list[int], buffer_index: int) -> Any:
        t = schema.TensorT()
        t.name = name
        t.shape = shape
        t.type = schema.TensorType.FLOAT32
        t.buffer = buffer_index
        return t

    # Buffer 0 is the empty sentinel every TFLite model starts with.
    buffers = [buffer(), buffer(), buffer(weights), buffer(bias), buffer()]
    tensors = [
        tensor("input", [1, n_in], 1),
        tensor("weights", [n_out, n_in], 2),
        tensor("bias", [n_out], 3),
        tensor("output", [1, n_out], 4),
    ]

    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1

    options = schema.FullyConnectedOptionsT()
    options.fusedActivationFunction = schema.ActivationFunctionType.RELU

    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1, 2]
    op.outputs = [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = options

    subgraph = schema.SubGraphT()
    subgraph.name = "main"
    subgraph.tensors = tensors
    subgraph.inputs = [0]
    subgraph.outputs = [3]
    subgraph.operators = [op]

    model = schema.ModelT()
    model.version = 3
    model.description = "edgeseal sample dense"
    model.operatorCodes = [code]
    model.subgraphs = [subgraph]
    model.buffers = buffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def reference_tflite_dense(
    x: npt.ArrayLike, *, seed: int = 0, n_in: int = 4, n_out: int = 2
) -> FloatArray:
    """What :func:`make_tflite_dense` with the same arguments computes for ``x``.

    ``x`` is reshaped to ``[-1, n_in]``; the result is float32 ``[batch, n_out]``.
    """
    weights, bias = _dense_weights(seed, n_in, n_out)
    flat = np.asarray(x, dtype=np.float64).reshape(-1, n_in)
    out: FloatArray = np.maximum(flat @ weights.T.astype(np.float64) + bias, 0.0).astype(np.float32)
    return out


# --- trained models, for the accuracy gate ------------------------------------------


class Dataset:
    """Features and labels of a synthetic classification task, split for train and test."""

    def __init__(self, x: FloatArray, y: npt.NDArray[np.int64], *, test_fraction: float = 0.3):
        cut = int(len(x) * (1 - test_fraction))
        self.x_train, self.y_train = x[:cut], y[:cut]
        self.x_test, self.y_test = x[cut:], y[cut:]


def synthetic_blobs(
    *, seed: int = 0, n: int = 2000, n_in: int = 16, n_classes: int = 4, spread: float = 1.0
) -> Dataset:
    """Gaussian clusters, one per class, with means drawn from ``default_rng(seed)``."""
    _check_positive(n=n, n_in=n_in, n_classes=n_classes)
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, n_in)).astype(np.float32) * np.float32(2.0)
    y = rng.integers(0, n_classes, size=n).astype(np.int64)
    x = means[y] + rng.standard_normal((n, n_in)).astype(np.float32) * np.float32(spread)
    return Dataset(x.astype(np.float32), y)


def _train_mlp(
    x: FloatArray,
    y: npt.NDArray[np.int64],
    *,
    hidden: int,
    n_classes: int,
    seed: int,
    epochs: int = 300,
    lr: float = 0.2,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Full-batch gradient descent on softmax cross-entropy; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    n_in = x.shape[1]
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = (rng.standard_normal((hidden, n_classes)) / np.sqrt(hidden)).astype(np.float32)
    b2 = np.zeros(n_classes, np.float32)
    onehot = np.eye(n_classes, dtype=np.float32)[y]
    for _ in range(epochs):
        h = np.maximum(x @ w1 + b1, 0)
        logits = h @ w2 + b2
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(x)
        gw2, gb2 = h.T @ g, g.sum(axis=0)
        gh = (g @ w2.T) * (h > 0)
        gw1, gb1 = x.T @ gh, gh.sum(axis=0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2
    return w1, b1, w2, b2


def make_trained_classifier(
    *,
    seed: int = 0,
    data: Dataset | None = None,
    hidden: int = 32,
    n_classes: int = 4,
    outlier: float = 0.0,
) -> tuple[bytes, Dataset]:
    """An MLP trained in numpy on :func:`synthetic_blobs`; returns (ONNX bytes, data).

    With ``outlier``, the model takes one extra input feature, always zero in the data,
    whose weights are ``outlier``: the float model answers exactly as before, but a
    per-tensor int8 scale sized for the outlier rounds every real weight to zero, which
    is how a quantization can truly break a model.
    """
    ds = data or synthetic_blobs(seed=seed, n_classes=n_classes)
    w1, b1, w2, b2 = _train_mlp(
        ds.x_train, ds.y_train, hidden=hidden, n_classes=n_classes, seed=seed
    )
    n_in = ds.x_train.shape[1]
    if outlier:
        w1 = np.vstack([w1, np.full((1, hidden), outlier, np.float32)])
        pad = Dataset.__new__(Dataset)
        for name in ("x_train", "x_test"):
            x = getattr(ds, name)
            setattr(pad, name, np.hstack([x, np.zeros((len(x), 1), np.float32)]))
        pad.y_train, pad.y_test = ds.y_train, ds.y_test
        ds, n_in = pad, n_in + 1
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h1_mm"], name="dense1"),
        helper.make_node("Add", ["h1_mm", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h1_relu"], name="relu1"),
        helper.make_node("MatMul", ["h1_relu", "W2"], ["logits_mm"], name="dense2"),
        helper.make_node("Add", ["logits_mm", "b2"], ["logits"], name="bias2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgeseal_trained_mlp",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        outputs=[helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"), (b2, "b2"))
        ],
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString()), ds


def make_onnx_cnn(*, seed: int = 0, size: int = 8, filters: int = 4, n_classes: int = 3) -> bytes:
    """A small CNN: Conv 3x3 (padding 1) + Relu + MaxPool 2x2 + Flatten + MatMul + Add +
    Softmax on ``"image"`` float32 ``["batch", 1, size, size]``; output ``"probs"``."""
    _check_positive(size=size, filters=filters, n_classes=n_classes)
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((filters, 1, 3, 3)) / 3).astype(np.float32)
    kb = (rng.standard_normal(filters) * 0.1).astype(np.float32)
    flat = filters * (size // 2) * (size // 2)
    w = (rng.standard_normal((flat, n_classes)) / np.sqrt(flat)).astype(np.float32)
    b = (rng.standard_normal(n_classes) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "K", "Kb"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node(
            "MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool"
        ),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "W"], ["mm"], name="dense"),
        helper.make_node("Add", ["mm", "b"], ["logits"], name="bias"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "edgeseal_sample_cnn",
        inputs=[
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])
        ],
        outputs=[helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(a, n) for a, n in ((k, "K"), (kb, "Kb"), (w, "W"), (b, "b"))
        ],
    )
    model = _onnx_model(graph)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
