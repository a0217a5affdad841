"""Golden tolerances of int8 models cover every CPU family's integer kernels and still
refuse another model.

The int8 GEMM has two results across CPUs: exact int32 accumulation (ARM NEON and
dot-product, x86 VNNI) and x86's u8s8 path without VNNI, whose adjacent pair sums
saturate at int16. The packager emulates both on the golden inputs; these tests check
the emulations against numpy and that the tolerance built from them stays tight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.golden import check_golden
from edgeseal.packager.golden import (
    KERNEL_FACTOR,
    _emulate_integer_kernels,
    make_golden,
    onnx_runners,
    synthetic_inputs,
)
from edgeseal.packager.onnx_model import onnx_io
from edgeseal.packager.quantize import QuantizeMode, quantize_onnx
from edgeseal.packager.samples import make_onnx_classifier


def _matmul_integer_model(w: np.ndarray, w_zp: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
            helper.make_node("MatMulInteger", ["xq", "W", "xzp", "Wzp"], ["y"]),
        ],
        "mmi",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(w_zp, "Wzp")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """ONNX's DynamicQuantizeLinear (uint8, round half to even)."""
    hi, lo = max(0.0, float(x.max())), min(0.0, float(x.min()))
    scale = np.float32((hi - lo) / 255)
    zp = int(np.clip(np.round(np.float32(-lo) / scale), 0, 255))
    return np.clip(np.round(x / scale) + zp, 0, 255).astype(np.int64), zp


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.mark.parametrize("k", [7, 16])
def test_the_integer_kernel_emulations_compute_exact_and_saturated_products(k: int) -> None:
    rng = np.random.default_rng(k)
    w = rng.integers(-128, 128, size=(k, 5)).astype(np.int8)
    w[0] = 127  # large same-sign pairs: the u8s8 pair sums overflow int16
    w[1] = 127
    w_zp = np.array(3, np.int8)  # a nonzero weight zero point takes the correction path
    x = rng.standard_normal((4, k)).astype(np.float32) * 3
    x[:, :2] = 10.0
    model = _matmul_integer_model(w, w_zp)
    exact = _emulate_integer_kernels(model, saturate=False)
    saturated = _emulate_integer_kernels(model, saturate=True)
    assert exact is not None and saturated is not None

    q, zp = _dynamic_quantize(x)
    wi = w.astype(np.int64)
    want_exact = (q - zp) @ (wi - int(w_zp))
    padded_q = np.pad(q, ((0, 0), (0, k % 2)))
    padded_w = np.pad(wi, ((0, k % 2), (0, 0)))
    pairs = (padded_q[:, :, None] * padded_w[None]).reshape(4, -1, 2, 5).sum(axis=2)
    raw = np.clip(pairs, -32768, 32767).sum(axis=1)
    want_saturated = raw - zp * wi.sum(0) - int(w_zp) * q.sum(1, keepdims=True) + k * zp * int(w_zp)
    assert not np.array_equal(want_exact, want_saturated)  # the case does saturate
    np.testing.assert_array_equal(_run(exact, x), want_exact)
    np.testing.assert_array_equal(_run(saturated, x), want_saturated)


@pytest.fixture(scope="module")
def dynamic_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fleet's classifier and one trained from another seed, both dynamic int8."""
    d = tmp_path_factory.mktemp("int8")
    paths = []
    for seed in (1, 2):
        src = d / f"clf{seed}.onnx"
        src.write_bytes(make_onnx_classifier(seed=seed))
        work = d / f"q{seed}"
        work.mkdir()
        paths.append(quantize_onnx(src, work, QuantizeMode.DYNAMIC_INT8))
    return paths[0], paths[1]


def test_int8_tolerances_cover_both_kernel_families_and_refuse_another_seed(
    dynamic_int8: tuple[Path, Path],
) -> None:
    model, other = dynamic_int8
    inputs, _ = onnx_io(onnx.load(str(model)))
    reference, variants = onnx_runners(model)
    assert len(variants) == 4  # two session settings, exact and saturating int8 GEMMs
    golden = make_golden(reference, variants, synthetic_inputs(inputs), mode="dynamic-int8")
    tol = golden["tolerances"]["probs"]
    # Both emulations always run, so the spread is at least their distance, on any host.
    assert tol["factor"] == KERNEL_FACTOR and tol["measured_spread"] > 0
    for runner in (reference, *variants):
        assert check_golden(runner, golden) == []
    # Still tight: on a probability the tolerance stays well below what another seed moves.
    assert tol["atol"] < 0.1
    problems = check_golden(onnx_runners(other)[0], golden)
    assert problems and all("golden vector" in p for p in problems)
