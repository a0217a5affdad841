"""Compact golden data (format 2, issue 17): what a bundle carries beyond the sealed model
stays within 64 KiB + 2 % of it, and the check still refuses a changed model.

Large inputs are drawn on the device from the golden seed, and each output keeps a seeded
sample of its elements; packer and device derive the same arrays from the seed, so the
drawn values are pinned here: a change to the generator is a format change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.encoding import canonical_json
from edgeseal.core.errors import MalformedBundleError
from edgeseal.core.extras import array_from_obj, array_to_obj
from edgeseal.core.golden import (
    FORMAT,
    check_golden,
    draw_input,
    golden_vectors,
    sample_indices,
)
from edgeseal.packager.golden import (
    EXTREMES,
    MAX_SAMPLES,
    SAMPLE_BUDGET,
    VERBATIM_MAX_ELEMENTS,
    _samples_per_output,
    make_golden,
    onnx_runners,
    synthetic_inputs,
)
from edgeseal.packager.onnx_model import onnx_io
from edgeseal.packager.samples import (
    make_onnx_classifier,
    make_onnx_cnn,
    make_tflite_dense,
    make_trained_classifier,
)


def test_drawn_inputs_and_samples_are_pinned() -> None:
    """The device must draw what the packer drew, on any platform and numpy version: the
    stream is PCG64's raw 64-bit output, mapped with integer and correctly rounded
    float arithmetic only."""
    normal = {"dtype": "float32", "shape": [2, 3], "draw": "normal"}
    normal |= {"mean": 0.5, "std": 2.0, "min": -3.0, "max": 3.0}
    a = draw_input(normal, seed=7, vector=1, name="x")
    assert a.dtype == np.float32 and a.shape == (2, 3)
    assert a.tolist() == PINNED_NORMAL
    assert np.array_equal(a, draw_input(normal, seed=7, vector=1, name="x"))
    assert not np.array_equal(a, draw_input(normal, seed=7, vector=2, name="x"))
    ints = {"dtype": "int64", "shape": [5], "draw": "integers", "low": -2, "high": 9}
    assert draw_input(ints, seed=7, vector=0, name="ids").tolist() == PINNED_INTEGERS
    assert sample_indices(1000, 6, seed=7, vector=0, name="y").tolist() == PINNED_INDICES
    assert sample_indices(5, 6, seed=7, vector=0, name="y").tolist() == [0, 1, 2, 3, 4]
    wide = normal | {"shape": [100_000], "min": -20.0, "max": 20.0}
    big = draw_input(wide, seed=0, vector=0, name="x")
    assert abs(float(big.mean()) - 0.5) < 0.05 and abs(float(big.std()) - 2.0) < 0.05
    clipped = draw_input(normal | {"shape": [100_000]}, seed=0, vector=0, name="x")
    assert clipped.min() >= -3.0 and clipped.max() <= 3.0


PINNED_NORMAL = [
    [2.4342854022979736, 0.9003993272781372, -1.6092454195022583],
    [-0.42512065172195435, -0.5807874202728271, -3.0],
]
PINNED_INTEGERS = [4, 2, 4, -2, 8]
PINNED_INDICES = [126, 215, 373, 702, 856, 945]


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "float32", "shape": [1 << 30], "draw": "normal"},
        {"dtype": "float32", "shape": [-1, 4], "draw": "normal"},
        {"dtype": "float32", "shape": [4], "draw": "normal", "mean": "nan", "std": 1.0},
        {"dtype": "int32", "shape": [4], "draw": "integers", "low": 3, "high": 1},
        {"dtype": "object", "shape": [4], "draw": "integers", "low": 0, "high": 1},
        {"dtype": "float32", "shape": [4], "draw": "laplace"},
    ],
)
def test_a_drawn_input_out_of_bounds_is_malformed(spec: dict[str, Any]) -> None:
    spec = {"mean": 0.0, "std": 1.0, "min": -1.0, "max": 1.0} | spec
    with pytest.raises(MalformedBundleError):
        draw_input(spec, seed=0, vector=0, name="x")


def _segmenter(seed: int = 0, size: int = 64) -> onnx.ModelProto:
    """A per-pixel model: Conv 3x3 (3 -> 4 channels) + Sigmoid on [1, 3, size, size]."""
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((4, 3, 3, 3)) / 3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "K"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["conv"], ["mask"]),
        ],
        "seg",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        outputs=[helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 4, size, size])],
        initializer=[numpy_helper.from_array(k, "K")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _golden(path: Path) -> dict[str, Any]:
    inputs, _ = onnx_io(onnx.load(str(path)))
    reference, variants = onnx_runners(path)
    return make_golden(reference, variants, synthetic_inputs(inputs), mode="none")


def _tweak(path: Path, out: Path, name: str) -> Path:
    """The largest element of initializer ``name`` five per cent larger."""
    m = onnx.load(str(path))
    t = next(t for t in m.graph.initializer if t.name == name)
    arr = numpy_helper.to_array(t).copy()
    arr[np.unravel_index(np.abs(arr).argmax(), arr.shape)] *= 1.05
    t.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(m, str(out))
    return out


def test_a_large_output_is_sampled_and_a_changed_weight_still_fails(tmp_path: Path) -> None:
    onnx.save(_segmenter(), str(tmp_path / "seg.onnx"))
    golden = _golden(tmp_path / "seg.onnx")
    assert golden["format"] == FORMAT and golden["inputs"]["image"]["draw"] == "normal"
    vectors = golden_vectors(golden)
    for v in vectors:
        mask = v.outputs["mask"]
        assert mask.shape == (1, 4, 64, 64) and mask.index is not None
        # the seeded sample, and the largest elements it missed (their indices stored)
        assert mask.values.size == _samples_per_output(8, 1, 1) + EXTREMES
        assert _samples_per_output(8, 1, 1) <= MAX_SAMPLES
    assert len(canonical_json(golden)) < 4 * SAMPLE_BUDGET * 4 / 3 + 8192
    assert check_golden(onnx_runners(tmp_path / "seg.onnx")[0], golden) == []
    tweaked = _tweak(tmp_path / "seg.onnx", tmp_path / "tweaked.onnx", "K")
    assert check_golden(onnx_runners(tweaked)[0], golden)
    onnx.save(_segmenter(seed=1), str(tmp_path / "other.onnx"))
    assert check_golden(onnx_runners(tmp_path / "other.onnx")[0], golden)


def test_drawn_inputs_still_refuse_another_seed_and_a_changed_weight(tmp_path: Path) -> None:
    (tmp_path / "cnn.onnx").write_bytes(make_onnx_cnn(seed=1, size=32))
    golden = _golden(tmp_path / "cnn.onnx")
    assert golden["inputs"]["image"]["draw"] == "normal"  # 1024 elements: drawn
    assert VERBATIM_MAX_ELEMENTS < 32 * 32
    assert check_golden(onnx_runners(tmp_path / "cnn.onnx")[0], golden) == []
    (tmp_path / "other.onnx").write_bytes(make_onnx_cnn(seed=2, size=32))
    assert check_golden(onnx_runners(tmp_path / "other.onnx")[0], golden)
    for name in ("K", "W"):
        tweaked = _tweak(tmp_path / "cnn.onnx", tmp_path / f"tweaked-{name}.onnx", name)
        assert check_golden(onnx_runners(tweaked)[0], golden), name


def test_golden_data_whose_drawn_input_was_swapped_fails(tmp_path: Path) -> None:
    """The statistics are part of the sealed data: other draws give other outputs."""
    (tmp_path / "cnn.onnx").write_bytes(make_onnx_cnn(seed=1, size=32))
    golden = _golden(tmp_path / "cnn.onnx")
    run = onnx_runners(tmp_path / "cnn.onnx")[0]
    assert check_golden(run, dict(golden, seed=golden["seed"] + 1))
    with pytest.raises(MalformedBundleError, match="seed"):
        check_golden(run, dict(golden, seed=-1))


SAMPLES = {
    "classifier.onnx": lambda: make_onnx_classifier(seed=1),
    "trained.onnx": lambda: make_trained_classifier(seed=1, hidden=512)[0],
    "cnn.onnx": lambda: make_onnx_cnn(seed=1, size=64),
    "segmenter.onnx": lambda: _segmenter().SerializeToString(),
    "dense.tflite": lambda: make_tflite_dense(seed=1),
}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_the_bundle_overhead_of_the_sample_models_is_within_issue_17s_bound(
    fleet: Any, tmp_path: Path, sample: str
) -> None:
    """Everything a bundle carries beyond the sealed model (golden data, profile,
    provenance, SBOM, signatures, framing): at most 64 KiB + 2 % of the model."""
    path = tmp_path / sample
    path.write_bytes(SAMPLES[sample]())
    bundle, result = fleet.pack(path)
    sealed = result.graph_bytes + result.weights_bytes
    overhead = bundle.stat().st_size - sealed
    assert overhead <= 65536 + math.floor(0.02 * sealed), (sample, overhead)
    assert fleet.extras(bundle)["golden"]["format"] == FORMAT


def test_extremes_out_of_range_are_malformed(tmp_path: Path) -> None:
    onnx.save(_segmenter(size=16), str(tmp_path / "seg.onnx"))
    golden = _golden(tmp_path / "seg.onnx")
    extremes = golden["vectors"][0]["outputs"]["mask"]["extremes"]
    bad = np.array([16 * 16 * 4], np.int64)  # one past the last element
    extremes["index"] = array_to_obj(np.concatenate([bad, array_from_obj(extremes["index"])[1:]]))
    with pytest.raises(MalformedBundleError, match="out of range"):
        golden_vectors(golden)


@pytest.mark.parametrize("outputs", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("expectations", [1, 3])
def test_sampled_outputs_stay_within_the_golden_share_of_the_bound(
    outputs: int, expectations: int
) -> None:
    """Sampled values (4 bytes for float32) and extremes (an int64 index and a value),
    base64-encoded, over 8 vectors: at most 48 KiB of issue 17's 64 KiB for up to 8
    outputs, int8 models' per-family expectations included."""
    k = _samples_per_output(8, outputs, expectations)
    extremes = min(EXTREMES, k // 8)
    raw = 8 * outputs * expectations * (4 * k + 12 * extremes)
    assert raw * 4 / 3 <= 48 * 1024
