"""Quantization with ONNX Runtime's own tools: dynamic int8, static int8 (QDQ), fp16.

Pre-processing as ONNX Runtime recommends (symbolic shape inference and optimization)
runs first; per-channel weights where the operator supports it. Works on files in a
private working folder on the workstation (the workstation has the float model anyway);
nothing of it reaches the device except through the sealed bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx

from edgeseal.packager.datasets import InputData
from edgeseal.packager.onnx_model import ModelError

__all__ = ["CalibrationMethod", "QuantizeMode", "quantize_onnx"]

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
    """ONNX Runtime's CalibrationDataReader protocol over in-memory arrays."""

    def __init__(self, data: InputData, batch: int = 16) -> None:
        self._it: Iterator[dict[str, npt.NDArray[np.generic]]] = (
            {k: v[i : i + batch] for k, v in data.inputs.items()}
            for i in range(0, data.rows, batch)
        )

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        return next(self._it, None)


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
    except Exception as e:
        log.warning("ONNX Runtime pre-processing failed (%s); quantizing the model as is", e)
        return src
    return dst


def quantize_onnx(
    src: Path,
    workdir: Path,
    mode: QuantizeMode,
    *,
    calibration: InputData | None = None,
    method: CalibrationMethod = CalibrationMethod.MINMAX,
    per_channel: bool = True,
) -> Path:
    """Quantize ``src`` into ``workdir``; returns the path of the model to seal."""
    if mode is QuantizeMode.NONE:
        return src
    from onnxruntime import quantization as q

    out = workdir / f"{src.stem}.{mode.value}.onnx"
    try:
        if mode is QuantizeMode.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = onnx.load(str(src))
            onnx.save(convert_float_to_float16(model, keep_io_types=True), str(out))
            return out
        pre = _preprocess(src, workdir / f"{src.stem}.pre.onnx")
        if mode is QuantizeMode.DYNAMIC_INT8:
            q.quantize_dynamic(
                str(pre), str(out), weight_type=q.QuantType.QInt8, per_channel=per_channel
            )
            return out
        if calibration is None:
            raise ModelError(
                "static-int8 needs calibration data (--calibration data.npz "
                "or a folder of .npy files)"
            )
        q.quantize_static(
            str(pre),
            str(out),
            _Reader(calibration),
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
        return out
    except ModelError:
        raise
    except Exception as e:  # ORT's quantizer raises assorted types
        raise ModelError(f"{mode.value} quantization failed: {e}") from e
