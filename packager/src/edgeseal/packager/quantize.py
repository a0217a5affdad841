"""Quantization with ONNX Runtime's own tools: dynamic int8, static int8 (QDQ), fp16.

Pre-processing as ONNX Runtime recommends (symbolic shape inference and optimization)
runs first; per-channel weights where the operator supports it. Works on files in a
private working folder on the workstation (the workstation has the float model anyway);
nothing of it reaches the device except through the sealed bundle.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx

from edgeseal.packager.datasets import InputData
from edgeseal.packager.onnx_model import ModelError, fold_constants

__all__ = [
    "CalibrationMethod",
    "QuantizeMode",
    "Quantized",
    "is_int8",
    "private_workdir",
    "quantize",
]

log = logging.getLogger(__name__)


class QuantizeMode(str, Enum):
    NONE = "none"
    DYNAMIC_INT8 = "dynamic-int8"
    STATIC_INT8 = "static-int8"
    FP16 = "fp16"


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over in-memory arrays, in batches of
    the model's own size (a fixed batch of 1 gets one row per feed)."""

    def __init__(self, data: InputData, fixed_batch: int | None = None) -> None:
        batch = fixed_batch or 16
        usable = data.rows - data.rows % batch if fixed_batch else data.rows
        self._it: Iterator[dict[str, npt.NDArray[np.generic]]] = (
            data.feed(i, i + batch) for i in range(0, usable, batch)
        )

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        return next(self._it, None)


#: Operators that mark a model as already quantized to 8-bit integers.
INT8_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
    }
)
#: Per-channel quantization (an axis on QuantizeLinear/DequantizeLinear) needs opset 13.
PER_CHANNEL_OPSET = 13


@dataclass(frozen=True)
class Quantized:
    """The model to seal, and what the quantizer did that the report should say."""

    path: Path
    notes: tuple[str, ...] = ()


def is_int8(model: onnx.ModelProto) -> bool:
    return any(n.op_type in INT8_OPS for n in model.graph.node)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _upgrade_for_per_channel(src: Path, workdir: Path, notes: list[str]) -> tuple[Path, bool]:
    """(model to quantize, per-channel): a model older than opset 13 is converted with
    ONNX's version converter; when that fails, it is quantized per tensor."""
    model = onnx.load(str(src))
    old = _opset(model)
    if old >= PER_CHANNEL_OPSET:
        return src, True
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter raises assorted types per missing adapter
        notes.append(
            f"opset {old} cannot be converted to {PER_CHANNEL_OPSET} ({str(e)[:200]}): "
            "weights quantized per tensor"
        )
        return src, False
    out = workdir / f"{src.stem}.opset{PER_CHANNEL_OPSET}.onnx"
    onnx.save(converted, str(out))
    notes.append(
        f"opset {old} converted to {PER_CHANNEL_OPSET} (ONNX version converter) "
        "for per-channel weights"
    )
    return out, True


def _preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's recommended pre-processing. Symbolic shape inference (the slow part)
    runs only when an input has a symbolic dimension."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = onnx.load(str(src), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    symbolic = any(
        not d.HasField("dim_value")
        for i in graph.input
        if i.name not in init
        for d in i.type.tensor_type.shape.dim
    )
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=not symbolic)
    except Exception as e:  # shape inference raises assorted types on models it cannot read
        log.warning("ONNX Runtime pre-processing failed (%s); quantizing the model as is", e)
        return src
    return dst


@contextmanager
def private_workdir(workdir: Path) -> Iterator[None]:
    """Run with ``workdir`` as the current directory and Python's temp dir: ONNX Runtime's
    tools write files (``sym_shape_infer_temp.onnx``, ``<uuid>.data`` with the weights,
    calibration models) into the current directory and the temp dir. Restored after."""
    cwd, tmp = Path.cwd(), tempfile.tempdir
    os.chdir(workdir)
    tempfile.tempdir = str(workdir)
    try:
        yield
    finally:
        tempfile.tempdir = tmp
        os.chdir(cwd)


def quantize(
    src: Path,
    workdir: Path,
    mode: QuantizeMode,
    *,
    calibration: InputData | None = None,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    per_channel: bool = True,
    fixed_batch: int | None = None,
) -> Quantized:
    """Quantize ``src`` into ``workdir`` (a private folder: ONNX Runtime's tools run with
    it as their current and temp directory); returns the model to seal and notes for
    the report. ``fixed_batch``: the model's fixed batch size, fed exactly (else 16 rows
    per calibration feed)."""
    if mode is QuantizeMode.NONE:
        return Quantized(src)
    src = src.resolve()
    with private_workdir(workdir):
        return _quantize(
            src,
            workdir,
            mode,
            calibration=calibration,
            method=method,
            per_channel=per_channel,
            fixed_batch=fixed_batch,
        )


def _first_that_quantizes(
    run: Callable[[Path], None],
    attempts: list[tuple[Callable[[], Path | None], str]],
    notes: list[str],
    mode: QuantizeMode,
) -> None:
    """Quantize the first of ``attempts`` (a model maker, and how it differs) that the
    quantizer takes; a note says which when it is not the first."""
    failures: list[str] = []
    for make, how in attempts:
        model = make()
        if model is None:
            continue
        try:
            run(model)
        except Exception as e:  # ORT's quantizer raises assorted types
            log.warning("quantization failed (%s)%s", e, f"; {how}" if how else "")
            failures.append(str(e)[:300])
            continue
        if how:
            notes.append(f"quantized {how} (before: {'; '.join(failures)})")
        return
    raise ModelError(
        f"{mode.value} quantization failed: {failures[0]}"
        + (f" (also {'; '.join(failures[1:])})" if failures[1:] else "")
    )


def _quantize(
    src: Path,
    workdir: Path,
    mode: QuantizeMode,
    *,
    calibration: InputData | None,
    method: CalibrationMethod,
    per_channel: bool,
    fixed_batch: int | None,
) -> Quantized:
    from onnxruntime import quantization as q

    out = workdir / f"{src.stem}.{mode.value}.onnx"
    notes: list[str] = []
    try:
        source = onnx.load(str(src))
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError...
        raise ModelError(f"cannot read {src.name} to quantize it: {e}") from e
    if is_int8(source):
        ops = sorted({n.op_type for n in source.graph.node if n.op_type in INT8_OPS})
        raise ModelError(
            f"the model is already quantized to int8 ({', '.join(ops)}): {mode.value} "
            "quantizes float models; pack it with --quantize none, or quantize its "
            "float original"
        )
    try:
        if mode is QuantizeMode.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(source, keep_io_types=True), str(out))
            return Quantized(out)
        if mode is QuantizeMode.STATIC_INT8 and calibration is None:
            raise ModelError(
                "static-int8 needs calibration data (--calibration data.npz, a folder of "
                ".npy files, or --sample-inputs)"
            )
        if per_channel:
            src, per_channel = _upgrade_for_per_channel(src, workdir, notes)
        pre = _preprocess(src, workdir / f"{src.stem}.pre.onnx")

        def run(model: Path) -> None:
            if mode is QuantizeMode.DYNAMIC_INT8:
                q.quantize_dynamic(
                    str(model), str(out), weight_type=q.QuantType.QInt8, per_channel=per_channel
                )
                return
            assert calibration is not None
            q.quantize_static(
                str(model),
                str(out),
                _Reader(calibration, fixed_batch),
                quant_format=q.QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method={
                    CalibrationMethod.MINMAX: q.CalibrationMethod.MinMax,
                    CalibrationMethod.ENTROPY: q.CalibrationMethod.Entropy,
                    CalibrationMethod.PERCENTILE: q.CalibrationMethod.Percentile,
                }[method],
            )

        # Pre-processed first; then the model as given; then with its constant subgraphs
        # folded (weights computed from constants, e.g. a Transpose over an initializer,
        # become initializers, which the quantizer requires of weights).
        def folded() -> Path | None:
            model, count = fold_constants(onnx.load(str(src)))
            if not count:
                return None
            path = workdir / f"{src.stem}.folded.onnx"
            onnx.save(model, str(path))
            return path

        attempts: list[tuple[Callable[[], Path | None], str]] = [(lambda: pre, "")]
        if pre != src:
            attempts.append((lambda: src, "without ONNX Runtime's pre-processing"))
        attempts.append((folded, "with its constant subgraphs folded first"))
        _first_that_quantizes(run, attempts, notes, mode)
        return Quantized(out, tuple(notes))
    except ModelError:
        raise
    except Exception as e:  # ORT's quantizer raises assorted types
        raise ModelError(f"{mode.value} quantization failed: {e}") from e
