"""The sample models run in the real runtimes and agree with their numpy references."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeseal.core.errors import MissingExtraError
from edgeseal.packager import samples


def _run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x})
    return np.asarray(out)


def _run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = interpreter_mod.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(out["index"]))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_classifier_runs_in_onnxruntime_and_matches_numpy(batch: int) -> None:
    model = samples.make_onnx_classifier()
    x = np.random.default_rng(42).standard_normal((batch, 8), dtype=np.float32)
    got = _run_onnx(model, x)
    assert got.shape == (batch, 4)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, samples.reference_onnx_classifier(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)


def test_onnx_classifier_has_pinned_opset_symbolic_batch_and_shape_initializer() -> None:
    model = onnx.load_from_string(samples.make_onnx_classifier())
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    (inp,) = model.graph.input
    assert inp.name == "input"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert dims[1].dim_value == 8
    assert [o.name for o in model.graph.output] == ["probs"]
    int64 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64]
    assert len(int64) == 1
    assert "Reshape" in [n.op_type for n in model.graph.node]


def test_onnx_classifier_honours_custom_sizes() -> None:
    kwargs = {"seed": 5, "n_in": 3, "hidden": 7, "n_classes": 6}
    x = np.random.default_rng(1).standard_normal((2, 3), dtype=np.float32)
    got = _run_onnx(samples.make_onnx_classifier(**kwargs), x)
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got, samples.reference_onnx_classifier(x, **kwargs), rtol=1e-5)


def test_onnx_classifier_is_deterministic_and_seeds_give_different_outputs() -> None:
    assert samples.make_onnx_classifier(seed=1) == samples.make_onnx_classifier(seed=1)
    x = np.random.default_rng(0).standard_normal((3, 8), dtype=np.float32)
    out0 = _run_onnx(samples.make_onnx_classifier(seed=0), x)
    out1 = _run_onnx(samples.make_onnx_classifier(seed=1), x)
    assert not np.allclose(out0, out1)
    np.testing.assert_allclose(out1, samples.reference_onnx_classifier(x, seed=1), rtol=1e-5)


def test_tflite_dense_runs_in_litert_and_matches_numpy() -> None:
    model = samples.make_tflite_dense()
    assert model[4:8] == b"TFL3"
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    got = _run_tflite(model, x)
    assert got.shape == (1, 2)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, samples.reference_tflite_dense(x), rtol=1e-5, atol=1e-7)


def test_tflite_dense_seeds_give_different_outputs() -> None:
    x = np.random.default_rng(3).standard_normal((1, 6), dtype=np.float32)
    outs = []
    for seed in (0, 1, 2):
        got = _run_tflite(samples.make_tflite_dense(seed=seed, n_in=6, n_out=5), x)
        want = samples.reference_tflite_dense(x, seed=seed, n_in=6, n_out=5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        outs.append(got)
    assert not np.allclose(outs[0], outs[1])
    assert not np.allclose(outs[1], outs[2])


def test_tflite_dense_without_litert_raises_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    with pytest.raises(MissingExtraError, match="pip install ai-edge-litert"):
        samples.make_tflite_dense()


def test_onnx_weighted_reaches_requested_size_and_runs_with_finite_output() -> None:
    target = 8 * 1024 * 1024
    data = samples.make_onnx_weighted(total_weight_bytes=target)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    assert model.ir_version == 8
    weight_bytes = sum(
        onnx.numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )
    assert 0.9 * target <= weight_bytes <= 1.2 * target
    x = np.random.default_rng(0).standard_normal((1, 1024), dtype=np.float32)
    out = _run_onnx(data, x)
    assert out.shape[0] == 1
    assert np.isfinite(out).all()
    assert np.abs(out).max() > 0


def test_onnx_weighted_fills_an_uneven_size_with_a_narrower_last_layer() -> None:
    target = 3 * 64 * 64 * 4 + 10 * 64 * 4
    model = onnx.load_from_string(samples.make_onnx_weighted(total_weight_bytes=target, width=64))
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert shapes == [(64, 64)] * 3 + [(64, 10)]
    out = _run_onnx(model.SerializeToString(), np.ones((1, 64), dtype=np.float32))
    assert out.shape == (1, 10)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("total", [0, -1, 2**31])
def test_onnx_weighted_rejects_sizes_out_of_range(total: int) -> None:
    with pytest.raises(ValueError, match="total_weight_bytes"):
        samples.make_onnx_weighted(total_weight_bytes=total)
