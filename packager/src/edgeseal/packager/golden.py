"""Golden vectors, the input profile and provenance: what the device checks itself with.

Golden vectors are a handful of inputs with the final model's outputs on this machine
and a per-output absolute tolerance. The tolerance comes from the measured spread of the
same model under other execution settings (graph optimizations off and all on, one
thread), times a safety factor, with a floor relative to the output's scale that depends
on the number format (float32 models are checked tightly; int8/fp16 kernels differ more
across CPUs, e.g. x86 against arm64).
"""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.extras import array_from_obj, array_to_obj
from edgeseal.core.golden import numeric_outputs
from edgeseal.core.manifest import TensorSpec
from edgeseal.core.profile import make_profile
from edgeseal.packager.datasets import InputData

__all__ = [
    "Runner",
    "fixed_batch",
    "input_profile",
    "make_golden",
    "onnx_runners",
    "provenance",
    "synthetic_inputs",
    "tflite_runners",
]

SAFETY_FACTOR = 16.0
#: Tolerance floor relative to each output's largest magnitude, by quantization mode.
RELATIVE_FLOOR = {"none": 1e-4, "fp16": 1e-2, "dynamic-int8": 2e-2, "static-int8": 2e-2}


Runner = Callable[[dict[str, npt.NDArray[Any]]], dict[str, npt.NDArray[Any]]]


def onnx_runners(model: Path) -> tuple[Runner, list[Runner]]:
    """The reference runner (basic optimizations) and variants to measure spread with."""
    import onnxruntime as ort

    def runner(level: str, threads: int = 0) -> Runner:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return lambda feed: dict(zip(names, sess.run(None, feed), strict=True))

    return runner("ORT_ENABLE_BASIC"), [
        runner("ORT_DISABLE_ALL"),
        runner("ORT_ENABLE_ALL", threads=1),
    ]


def tflite_runners(model: bytes) -> tuple[Runner, list[Runner]]:
    from ai_edge_litert.interpreter import Interpreter

    def runner(threads: int | None) -> Runner:
        interp = Interpreter(model_content=model, num_threads=threads)
        interp.allocate_tensors()
        ins = {d["name"]: d for d in interp.get_input_details()}
        outs = interp.get_output_details()

        def run(feed: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
            for k, v in feed.items():
                if tuple(v.shape) != tuple(ins[k]["shape"]):
                    interp.resize_tensor_input(ins[k]["index"], v.shape)
                    interp.allocate_tensors()
                interp.set_tensor(ins[k]["index"], v)
            interp.invoke()
            return {d["name"]: interp.get_tensor(d["index"]).copy() for d in outs}

        return run

    return runner(None), [runner(1)]


def make_golden(
    reference: Runner,
    variants: list[Runner],
    data: InputData,
    *,
    mode: str,
    count: int = 8,
    batch: int = 1,
) -> dict[str, Any]:
    """Record the outputs for ``count`` feeds of ``batch`` rows (a model with a fixed batch
    dimension takes exactly that many) and derive per-output tolerances from the spread."""
    n = min(count, data.rows // batch)
    if n == 0:
        raise ValueError(f"need at least {batch} rows of data for golden vectors")
    rows = [{k: v[i * batch : (i + 1) * batch] for k, v in data.inputs.items()} for i in range(n)]
    # Real rows are often classified with near-certainty, where a saturated softmax hides
    # any change to the weights. Half the vectors are midpoints of two real rows instead:
    # nearer the decision boundaries, where outputs move with the weights.
    for i in range(n // 2, n):
        a, b = rows[i], rows[(i + 1) % n]
        rows[i] = {
            k: ((a[k].astype(np.float64) + b[k].astype(np.float64)) / 2).astype(a[k].dtype)
            if a[k].dtype.kind == "f"
            else a[k]
            for k in a
        }
    vectors: list[dict[str, Any]] = []
    spreads: dict[str, float] = {}
    for feed in rows:
        expected = numeric_outputs(reference(feed))
        for variant in variants:
            other = numeric_outputs(variant(feed))
            for name, y in expected.items():
                d = float(
                    np.abs(other[name].astype(np.float64) - y.astype(np.float64)).max(initial=0.0)
                )
                spreads[name] = max(spreads.get(name, 0.0), d)
        vectors.append(
            {
                "inputs": {k: array_to_obj(v) for k, v in feed.items()},
                "outputs": {k: array_to_obj(v) for k, v in expected.items()},
            }
        )
    tolerances = {}
    for name in vectors[0]["outputs"]:
        scale = max(
            float(np.abs(array_from_obj(v["outputs"][name])).max(initial=0.0)) for v in vectors
        )
        atol = max(
            SAFETY_FACTOR * spreads.get(name, 0.0),
            RELATIVE_FLOOR.get(mode, 2e-2) * max(scale, 1e-6),
        )
        tolerances[name] = {"atol": atol, "measured_spread": spreads.get(name, 0.0)}
    return {"vectors": vectors, "tolerances": tolerances, "mode": mode}


def fixed_batch(specs: tuple[TensorSpec, ...]) -> int | None:
    """The batch size a model insists on (a fixed first dimension), or None when free."""
    first = specs[0].shape[0] if specs and specs[0].shape else None
    return first if isinstance(first, int) and first > 0 else None


def synthetic_inputs(specs: tuple[TensorSpec, ...], *, rows: int = 16, seed: int = 0) -> InputData:
    """Inputs drawn from the model's own input specs, when no data was given."""
    rng = np.random.default_rng(seed)
    rows *= fixed_batch(specs) or 1
    inputs: dict[str, npt.NDArray[Any]] = {}
    for spec in specs:
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            inputs[spec.name] = rng.standard_normal((rows, *dims)).astype(dtype)
        else:
            inputs[spec.name] = rng.integers(0, 8, size=(rows, *dims)).astype(dtype)
    return InputData(inputs, None)


def input_profile(data: InputData) -> dict[str, Any]:
    """The profile the agent checks requests against (``edgeseal.core.profile``)."""
    return make_profile(data.inputs)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def provenance(
    *,
    source: Path,
    final: Path,
    calibration: Path | None,
    evaluation: Path | None,
    settings: dict[str, Any],
    report: dict[str, Any] | None,
) -> dict[str, Any]:
    """A record linking the float model to the shipped one (sealed and signed)."""
    return {
        "source_model_sha256": _digest(source),
        "final_model_sha256": _digest(final),
        "calibration_sha256": _digest(calibration),
        "evaluation_sha256": _digest(evaluation),
        "settings": settings,
        "accuracy": report,
        "tools": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **{d: _version(d) for d in ("onnx", "onnxruntime", "edgeseal-packager", "numpy")},
        },
    }
