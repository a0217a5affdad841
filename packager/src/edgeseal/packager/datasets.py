"""Calibration and evaluation data: ``.npz`` files or folders of ``.npy``, keyed by input.

An ``.npz`` holds one array per model input, named after it, plus an optional
``labels`` array (integer class per row) for accuracy. A folder holds ``NAME.npy`` per
input (and optionally ``labels.npy``). Arrays are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgeseal.core.manifest import TensorSpec
from edgeseal.packager.onnx_model import ModelError

__all__ = ["InputData", "load_inputs"]

LABELS = "labels"


@dataclass(frozen=True)
class InputData:
    inputs: dict[str, npt.NDArray[np.generic]]
    labels: npt.NDArray[np.int64] | None

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def split(self, fraction: float) -> tuple[InputData, InputData]:
        """(first part, rest): calibrate on one, evaluate on the other."""
        cut = max(1, int(self.rows * fraction))
        first = {k: v[:cut] for k, v in self.inputs.items()}
        rest = {k: v[cut:] for k, v in self.inputs.items()}
        labels = self.labels
        return (
            InputData(first, None if labels is None else labels[:cut]),
            InputData(rest, None if labels is None else labels[cut:]),
        )

    def head(self, n: int) -> dict[str, npt.NDArray[np.generic]]:
        return {k: v[:n] for k, v in self.inputs.items()}


def load_inputs(path: Path, specs: tuple[TensorSpec, ...]) -> InputData:
    """Load and check data for a model with inputs ``specs``."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    try:
        if path.is_dir():
            for f in sorted(path.glob("*.npy")):
                arrays[f.stem] = np.load(f, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read data {path}: {e}") from e
    labels = arrays.pop(LABELS, None)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ModelError(
            f"data {path} has no array for input(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    inputs = {}
    for spec in specs:
        a = arrays[spec.name]
        if a.dtype.name != spec.dtype:
            try:
                a = a.astype(spec.dtype)
            except TypeError as e:
                raise ModelError(
                    f"input {spec.name}: cannot use {a.dtype} data as {spec.dtype}"
                ) from e
        if a.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and i > 0 and a.shape[i] != d
            for i, d in enumerate(spec.shape)
        ):
            raise ModelError(
                f"input {spec.name}: data shape {a.shape} does not fit the "
                f"model's {list(spec.shape)}"
            )
        inputs[spec.name] = a
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1 or (labels is not None and labels.shape[0] not in rows):
        raise ModelError(f"data {path}: inputs and labels must have the same number of rows")
    return InputData(inputs, None if labels is None else labels.astype(np.int64))
