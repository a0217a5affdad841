"""Golden tolerances of int8 models cover every CPU family's integer kernels and still
refuse another model.

The int8 GEMM has two results across CPUs: exact int32 accumulation (ARM NEON and
dot-product, x86 VNNI) and x86's u8s8 path without VNNI, whose adjacent pair sums
saturate at int16. The packager emulates both on the golden inputs; these tests check
the emulations against numpy and that the tolerance built from them stays tight.

The tests do not depend on the CPU that runs them. The one runner whose result does
(ONNX Runtime's own kernels at "all", ``KernelRunner.host``) is, besides this machine's,
replaced by the emulation of each family: golden data packed "on" a VNNI or arm64
machine (exact) and "on" an AVX2 machine (pairsum16) are both made here, and each must
pass with this machine's real kernels and refuse the same changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.extras import array_to_obj
from edgeseal.core.golden import check_golden, golden_vectors
from edgeseal.packager.datasets import InputData
from edgeseal.packager.golden import (
    EXACT,
    KERNEL_FACTOR,
    KERNEL_FAMILIES,
    PAIRSUM16,
    KernelRunner,
    Runner,
    _emulate_integer_kernels,
    host_kernel_family,
    host_kernels,
    make_golden,
    onnx_runners,
    synthetic_inputs,
)
from edgeseal.packager.onnx_model import onnx_io
from edgeseal.packager.quantize import QuantizeMode, quantize
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
def int8_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, Path]]:
    """The fleet's classifier (seed 1) and one trained from another seed (2), each
    quantized dynamic and static int8; the float sources under "float"."""
    d = tmp_path_factory.mktemp("int8")
    models: dict[str, dict[int, Path]] = {"float": {}, **{m.value: {} for m in MODES}}
    for seed in (1, 2):
        src = d / f"clf{seed}.onnx"
        src.write_bytes(make_onnx_classifier(seed=seed))
        models["float"][seed] = src
        for mode in MODES:
            models[mode.value][seed] = _quantize(src, d / f"{mode.value}-{seed}", mode)
    return models


MODES = (QuantizeMode.DYNAMIC_INT8, QuantizeMode.STATIC_INT8)


def _data(model: Path) -> InputData:
    inputs, _ = onnx_io(onnx.load(str(model)))
    return synthetic_inputs(inputs)


def _quantize(src: Path, work: Path, mode: QuantizeMode) -> Path:
    work.mkdir()
    return quantize(src, work, mode, calibration=_data(src)).path


#: Where the golden data is made: this machine, or as if on a machine of each family.
PACKERS = ("this-machine", EXACT, PAIRSUM16)


def _runners(model: Path, packer: str = "this-machine") -> tuple[Runner, list[Runner]]:
    """``onnx_runners(model)`` as on ``packer``: its own-kernel runner replaced by this
    machine's emulation of that family (tagged as the packer would tag it)."""
    reference, variants = onnx_runners(model)
    if packer == "this-machine":
        return reference, variants
    (own,) = [r for r in variants if isinstance(r, KernelRunner) and r.host]
    twin = next(
        r
        for r in (reference, *variants)
        if isinstance(r, KernelRunner) and r.kernel == packer and not r.host
    )
    simulated = KernelRunner(twin.run, packer if own.kernel is not None else None)
    simulated.host = True
    return reference, [simulated if r is own else r for r in variants]


def _golden(model: Path, mode: QuantizeMode, packer: str = "this-machine") -> dict[str, Any]:
    reference, variants = _runners(model, packer)
    return make_golden(reference, variants, _data(model), mode=mode.value)


def test_the_host_family_is_read_from_the_cpu_flags() -> None:
    assert host_kernels("flags : avx avx2 avx512_vnni", "x86_64")[0] == EXACT
    assert host_kernels("flags : avx avx2 avx_vnni", "x86_64")[0] == EXACT
    assert host_kernels("flags : avx avx2 fma", "x86_64") == (
        PAIRSUM16,
        "x86_64 with AVX2, without VNNI: u8s8 pair sums saturate at int16",
    )
    assert host_kernels("flags : sse4_2", "x86_64")[0] is None
    assert host_kernels("", "aarch64")[0] == EXACT
    assert host_kernels("", "riscv64")[0] is None


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_this_machines_own_kernels_match_the_emulation_of_its_family(
    int8_models: dict[str, dict[int, Path]], mode: QuantizeMode
) -> None:
    """The emulations are checked against real kernels on every CPU that runs the suite:
    this machine's own int8 kernels are nearer the emulation of the family its CPU flags
    name than the other family's, and within that family's tolerance."""
    family = host_kernel_family()
    if family is None:
        pytest.skip("this CPU's int8 kernel family is unknown")
    model = int8_models[mode.value][1]
    reference, variants = onnx_runners(model)
    (own,) = [r for r in variants if isinstance(r, KernelRunner) and r.host]
    golden = make_golden(reference, variants, _data(model), mode=mode.value)
    vectors = golden_vectors(golden)
    got = [own(vec.feed) for vec in vectors]

    def distance(kernel: str) -> float:
        return max(
            vec.by_kernel[kernel]["probs"].error(g["probs"])
            for g, vec in zip(got, vectors, strict=True)
        )

    other = next(k for k in KERNEL_FAMILIES if k != family)
    assert distance(family) <= golden["kernel_tolerances"][family]["probs"]["atol"]
    assert distance(family) <= distance(other)


@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_int8_golden_vectors_hold_one_tight_expectation_per_kernel_family(
    int8_models: dict[str, dict[int, Path]], mode: QuantizeMode, packer: str
) -> None:
    model = int8_models[mode.value][1]
    reference, variants = _runners(model, packer)
    kernels = [getattr(r, "kernel", None) for r in (reference, *variants)]
    golden = make_golden(reference, variants, _data(model), mode=mode.value)
    legacy = golden["tolerances"]["probs"]
    per_kernel = golden["kernel_tolerances"]
    assert set(per_kernel) == set(KERNEL_FAMILIES)
    assert all(set(v["expected_by_kernel"]) == set(KERNEL_FAMILIES) for v in golden["vectors"])
    for tol in per_kernel.values():
        # Tight: within a family the settings agree (up to a rounding tie), so the floor
        # rules; the single tolerance must span the families' distance.
        assert tol["probs"]["atol"] < legacy["atol"] / 5
    # Packed on any family, every way of computing the model on this machine (its own
    # kernels included) and each family's emulation passes.
    for runner in (reference, *variants, *onnx_runners(model)[1]):
        assert check_golden(runner, golden) == []
    if mode is QuantizeMode.DYNAMIC_INT8:
        # Both emulations always run: the families are the exact and saturating GEMMs.
        assert kernels.count(EXACT) == 2 and kernels.count(PAIRSUM16) == 2
        assert legacy["factor"] == KERNEL_FACTOR and legacy["measured_spread"] > 0
    else:
        # QDQ at basic optimizations is the exact family, the saturating GEMM is emulated,
        # and "all" is the packer's own kernels, of the family its CPU flags name.
        own = packer if packer != "this-machine" else host_kernel_family()
        assert kernels[:2] == [EXACT, EXACT] and kernels[2] == own
        assert kernels[3:] == [PAIRSUM16, PAIRSUM16]


@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_int8_golden_vectors_refuse_another_seed(
    int8_models: dict[str, dict[int, Path]], mode: QuantizeMode, packer: str
) -> None:
    golden = _golden(int8_models[mode.value][1], mode, packer)
    problems = check_golden(onnx_runners(int8_models[mode.value][2])[0], golden)
    assert problems and all("golden vector" in p for p in problems)
    # The single tolerance old agents use still refuses it too.
    legacy = {k: v for k, v in golden.items() if k != "kernel_tolerances"}
    assert check_golden(onnx_runners(int8_models[mode.value][2])[0], legacy)


def _largest_int8_weight(model: onnx.ModelProto) -> tuple[onnx.TensorProto, tuple[int, ...]]:
    weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and t.dims]
    best = max(weights, key=lambda t: int(np.abs(numpy_helper.to_array(t).astype(int)).max()))
    arr = numpy_helper.to_array(best).astype(int)
    return best, tuple(int(i) for i in np.unravel_index(np.abs(arr).argmax(), arr.shape))


def _with_int8_weight(model: Path, out: Path, change: Callable[[int], int]) -> Path:
    m = onnx.load(str(model))
    tensor, index = _largest_int8_weight(m)
    arr = numpy_helper.to_array(tensor).copy()
    arr[index] = np.int8(np.clip(change(int(arr[index])), -128, 127))
    tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
    onnx.save(m, str(out))
    return out


def _max_error(golden: dict[str, Any], model: Path) -> float:
    """The smallest, over kernel families, of the largest error over the vectors."""
    run = onnx_runners(model)[0]
    vectors = golden_vectors(golden)
    got = [run(vec.feed) for vec in vectors]
    return min(
        max(
            vec.by_kernel[k]["probs"].error(g["probs"]) for g, vec in zip(got, vectors, strict=True)
        )
        for k in KERNEL_FAMILIES
    )


@pytest.mark.parametrize("packer", PACKERS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_int8_golden_vectors_refuse_one_changed_weight(
    int8_models: dict[str, dict[int, Path]], mode: QuantizeMode, tmp_path: Path, packer: str
) -> None:
    model = int8_models[mode.value][1]
    golden = _golden(model, mode, packer)
    atol = golden["kernel_tolerances"][EXACT]["probs"]["atol"]
    legacy = {k: v for k, v in golden.items() if k != "kernel_tolerances"}

    # The largest int8 weight negated: within the single tolerance, outside the family's.
    negated = _with_int8_weight(model, tmp_path / "negated.onnx", lambda w: -w)
    assert check_golden(onnx_runners(negated)[0], golden)
    assert _max_error(golden, negated) > 3 * atol
    assert not check_golden(onnx_runners(negated)[0], legacy)

    # One float weight changed before quantizing (the classifier's largest in W1): 5 %
    # for dynamic int8; 10 % for static, whose quantized outputs move in steps of 1/255
    # and may move one step by rounding alone (5 % moves them one step, 10 % two).
    m = onnx.load(str(int8_models["float"][1]))
    w1 = next(t for t in m.graph.initializer if t.name == "W1")
    arr = numpy_helper.to_array(w1).copy()
    arr[np.unravel_index(np.abs(arr).argmax(), arr.shape)] *= (
        1.05 if mode is QuantizeMode.DYNAMIC_INT8 else 1.10
    )
    w1.CopyFrom(numpy_helper.from_array(arr, "W1"))
    onnx.save(m, str(tmp_path / "tweaked.onnx"))
    tweaked = _quantize(tmp_path / "tweaked.onnx", tmp_path / "q", mode)
    assert check_golden(onnx_runners(tweaked)[0], golden)
    assert not check_golden(onnx_runners(tweaked)[0], legacy)  # what one tolerance missed


def test_outputs_mixing_kernel_families_across_vectors_are_refused(
    int8_models: dict[str, dict[int, Path]],
) -> None:
    model = int8_models[QuantizeMode.DYNAMIC_INT8.value][1]
    reference, variants = onnx_runners(model)
    golden = make_golden(reference, variants, _data(model), mode="dynamic-int8")
    exact = next(r for r in variants if getattr(r, "kernel", None) == EXACT)
    saturating = next(r for r in variants if getattr(r, "kernel", None) == PAIRSUM16)
    vectors = golden_vectors(golden)
    # The sample's families differ on some vectors by more than the family tolerance.
    differs = [
        i
        for i, v in enumerate(vectors)
        if np.abs(v.by_kernel[EXACT]["probs"].values - v.by_kernel[PAIRSUM16]["probs"].values).max()
        > golden["kernel_tolerances"][EXACT]["probs"]["atol"]
    ]
    assert len(differs) >= 2
    first = array_to_obj(vectors[differs[0]].feed["input"])["data"]

    def mixed(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Exact kernels on the first vector where the families differ, else saturating."""
        key = array_to_obj(feed["input"])["data"]
        return (exact if key == first else saturating)(feed)

    assert check_golden(exact, golden) == [] and check_golden(saturating, golden) == []
    problems = check_golden(mixed, golden)
    assert problems and all("int8 kernels" in p for p in problems)
    # Old agents' single tolerance would have let it through.
    legacy = {k: v for k, v in golden.items() if k != "kernel_tolerances"}
    assert check_golden(mixed, legacy) == []


def test_golden_data_without_per_family_expectations_uses_the_single_tolerance(
    int8_models: dict[str, dict[int, Path]],
) -> None:
    """Bundles packed before per-family expectations, or whose families are incomplete
    (a family named in kernel_tolerances missing from a vector), keep the old check."""
    model = int8_models[QuantizeMode.DYNAMIC_INT8.value][1]
    golden = _golden(model, QuantizeMode.DYNAMIC_INT8)
    reference = onnx_runners(model)[0]
    old = {k: v for k, v in golden.items() if k != "kernel_tolerances"}
    old["vectors"] = [
        {k: v for k, v in vec.items() if k != "expected_by_kernel"} for vec in golden["vectors"]
    ]
    assert check_golden(reference, old) == []
    old["tolerances"] = {"probs": {"atol": -1.0}}
    assert check_golden(reference, old)
    partial = dict(golden, tolerances={"probs": {"atol": -1.0}})
    partial["vectors"] = [dict(v) for v in golden["vectors"]]
    partial["vectors"][0] = {
        k: v for k, v in partial["vectors"][0].items() if k != "expected_by_kernel"
    }
    assert check_golden(reference, partial)  # falls back to the single tolerance
    # Unknown families are just other candidates; unknown keys are ignored.
    extra = dict(golden, future_field=1)
    assert check_golden(reference, extra) == []
