"""Calibration, evaluation and sample data: ``.npz`` files or folders of ``.npy``, keyed by
input, and the batch layout that says how a model's inputs are cut into rows.

An ``.npz`` holds one array per model input, named after it, plus an optional
``labels`` array (integer class per row) for accuracy. A folder holds ``NAME.npy`` per
input (and optionally ``labels.npy``). Arrays are loaded with ``allow_pickle=False``.

Rows run along each input's batch axis (:func:`batch_layout`): axis 0 for most inputs,
another axis for a state input such as ``[2, batch, 128]``, and none for an input that
is the same for every row (a scalar such as a sample rate, a state of fixed shape), which
the data holds once, in the model's shape, and every feed gets whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.manifest import TensorSpec
from edgeseal.packager.onnx_model import ModelError

__all__ = ["SYNTHETIC", "USER", "BatchLayout", "InputData", "batch_layout", "load_inputs"]

LABELS = "labels"
#: Where data came from, as the accuracy report says it.
USER = "user data"
SYNTHETIC = "synthetic inputs"


@dataclass(frozen=True)
class BatchLayout:
    """Per input, the axis its rows run along (None: fed whole to every row), the name of
    the batch dimension (None when fixed), and the batch size the model insists on
    (None when free)."""

    axes: Mapping[str, int | None]
    name: str | None
    fixed: int | None


def batch_layout(specs: tuple[TensorSpec, ...]) -> BatchLayout:
    """The batch dimension is the symbolic name most inputs lead with, found at whatever
    axis each input has it; with every leading dim fixed, the leading size most inputs
    share (the smaller on a tie), and the inputs that lead with it. Scalars are never
    batched."""
    firsts = [s.shape[0] for s in specs if s.shape]
    named = [d for d in firsts if isinstance(d, str)]
    axes: dict[str, int | None] = {}
    if named:
        name = Counter(named).most_common(1)[0][0]
        for s in specs:
            if name != "?" and name in s.shape:
                axes[s.name] = s.shape.index(name)
            elif s.shape and s.shape[0] == name:
                axes[s.name] = 0
            else:
                axes[s.name] = None
        return BatchLayout(axes, None if name == "?" else name, None)
    counts = Counter(d for d in firsts if isinstance(d, int) and d > 0)
    top = max(counts.values(), default=0)
    # The leading size most inputs share; on a tie the smaller (a state [2, 1, 128]
    # beside audio [1, 512] leaves the batch at 1).
    fixed = min((d for d, n in counts.items() if n == top), default=None)
    for s in specs:
        axes[s.name] = 0 if s.shape and fixed is not None and s.shape[0] == fixed else None
    return BatchLayout(axes, None, fixed)


def _take(a: npt.NDArray[Any], axis: int | None, start: int, stop: int) -> npt.NDArray[Any]:
    if axis is None:
        return a
    index: list[slice] = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


@dataclass(frozen=True)
class InputData:
    inputs: dict[str, npt.NDArray[np.generic]]
    labels: npt.NDArray[np.int64] | None
    #: The axis rows run along per input (None: fed whole); inputs not named: axis 0.
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)
    #: :data:`USER` or :data:`SYNTHETIC`, for the accuracy report.
    source: str = USER

    def axis(self, name: str) -> int | None:
        return self.batch_axes.get(name, 0)

    @property
    def rows(self) -> int:
        for name, a in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(a.shape[axis])
        return 1

    def feed(self, start: int, stop: int) -> dict[str, npt.NDArray[np.generic]]:
        """Rows ``start:stop`` of every batched input, and every other input whole."""
        return {k: _take(v, self.axis(k), start, stop) for k, v in self.inputs.items()}

    def _with(
        self, inputs: dict[str, npt.NDArray[np.generic]], labels: npt.NDArray[np.int64] | None
    ) -> InputData:
        return InputData(inputs, labels, self.batch_axes, self.source)

    def split(self, fraction: float) -> tuple[InputData, InputData]:
        """(first part, rest): calibrate on one, evaluate on the other."""
        cut = max(1, int(self.rows * fraction))
        labels = self.labels
        return (
            self._with(self.feed(0, cut), None if labels is None else labels[:cut]),
            self._with(self.feed(cut, self.rows), None if labels is None else labels[cut:]),
        )

    def head(self, n: int) -> dict[str, npt.NDArray[np.generic]]:
        return self.feed(0, n)


def load_inputs(path: Path, specs: tuple[TensorSpec, ...]) -> InputData:
    """Load and check data for a model with inputs ``specs``: a batched input holds rows
    along its batch axis; an input fed whole holds one value in the model's shape."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    try:
        if path.is_dir():
            for f in sorted(path.glob("*.npy")):
                arrays[f.stem] = np.load(f, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ModelError(f"cannot read data {path}: {e}") from e
    labels = arrays.pop(LABELS, None)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ModelError(
            f"data {path} has no array for input(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    layout = batch_layout(specs)
    inputs = {}
    rows: set[int] = set()
    for spec in specs:
        a = arrays[spec.name]
        if a.dtype.name != spec.dtype:
            try:
                a = a.astype(spec.dtype)
            except (TypeError, ValueError) as e:
                raise ModelError(
                    f"input {spec.name}: cannot use {a.dtype} data as {spec.dtype}"
                ) from e
        axis = layout.axes.get(spec.name)
        if a.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and i != axis and a.shape[i] != d
            for i, d in enumerate(spec.shape)
        ):
            whole = "" if axis is not None else " (this input is fed whole, not per row)"
            raise ModelError(
                f"input {spec.name}: data shape {a.shape} does not fit the "
                f"model's {list(spec.shape)}{whole}"
            )
        if axis is not None:
            rows.add(int(a.shape[axis]))
        inputs[spec.name] = a
    if len(rows) > 1 or (labels is not None and rows and labels.shape[0] not in rows):
        raise ModelError(f"data {path}: inputs and labels must have the same number of rows")
    return InputData(
        inputs, None if labels is None else labels.astype(np.int64), dict(layout.axes), USER
    )
