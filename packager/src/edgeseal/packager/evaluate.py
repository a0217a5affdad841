"""The accuracy gate: run the original and the candidate side by side and compare.

Both run in ONNX Runtime on the CPU, the runtime the device uses. For every output:
max and mean absolute error and cosine similarity; for classifiers (a 2-D score
output), top-1 agreement and, with labels, accuracy before and after; sizes and
latency of each. :func:`gate` turns a report and a threshold into a pass or a refusal.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.errors import EdgesealError
from edgeseal.packager.datasets import USER, InputData

__all__ = [
    "AccuracyDropError",
    "AccuracyReport",
    "GateUsageError",
    "Threshold",
    "evaluate",
    "gate",
    "gate_status",
    "has_class_scores",
]


class AccuracyDropError(EdgesealError):
    """The quantized model lost more accuracy than the threshold allows."""

    def __init__(self, message: str, report: AccuracyReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    hint = "loosen --max-accuracy-drop, try static-int8 with calibration, or --accept-accuracy-drop"


@dataclass(frozen=True)
class OutputStats:
    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float


@dataclass(frozen=True)
class AccuracyReport:
    mode: str
    size_before: int
    size_after: int
    rows: int
    outputs: tuple[OutputStats, ...]
    top1_agreement: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    latency_ms_before: float
    latency_ms_after: float
    #: Where the rows came from: user data, or inputs synthesized from the model's specs
    #: (error figures only: no accuracy claim can be made on them).
    data_source: str = USER
    #: What the top-1 figures measure: "accuracy against labels", "top-1 agreement"
    #: (classifier scores, no labels), or "output error only" (no class scores).
    metric: str = "output error only"
    #: What the quantizer did that a reader should know (opset converted, per tensor...).
    notes: tuple[str, ...] = ()

    @property
    def top1_drop(self) -> float | None:
        if self.accuracy_before is not None and self.accuracy_after is not None:
            return self.accuracy_before - self.accuracy_after
        return None if self.top1_agreement is None else 1.0 - self.top1_agreement

    def to_obj(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["outputs"] = [asdict(o) for o in self.outputs]
        obj["top1_drop"] = self.top1_drop
        return obj


@dataclass(frozen=True)
class Threshold:
    """``1%`` (top-1 drop, or 1 - agreement without labels) or ``abs=0.05`` (max error)."""

    top1_drop: float | None = None
    max_abs_error: float | None = None

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = text.strip()
        try:
            if t.startswith("abs="):
                return cls(max_abs_error=float(t[4:]))
            if t.endswith("%"):
                return cls(top1_drop=float(t[:-1]) / 100)
            return cls(top1_drop=float(t))
        except ValueError:
            raise ValueError(
                f"--max-accuracy-drop takes e.g. 1% or abs=0.05, not {text!r}"
            ) from None


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(
    session: Any, data: InputData, batch: int = 64, *, exact: bool = False
) -> tuple[list[npt.NDArray[Any]], float]:
    """Outputs over ``data`` in feeds of ``batch`` rows (``exact``: only whole feeds, for
    a model with a fixed batch size), concatenated, and the median feed's latency."""
    outs: list[list[npt.NDArray[Any]]] = []
    times = []
    stop = data.rows - data.rows % batch if exact else data.rows
    for i in range(0, max(stop, 1), batch):
        feed = data.feed(i, i + batch)
        t0 = time.perf_counter()
        outs.append(session.run(None, feed))
        times.append((time.perf_counter() - t0) * 1e3)
    merged = [np.concatenate([np.atleast_1d(o[j]) for o in outs]) for j in range(len(outs[0]))]
    return merged, statistics.median(times)


def has_class_scores(output: npt.NDArray[Any]) -> bool:
    """A classifier's output: float scores of shape (rows, classes), classes > 1."""
    return output.ndim == 2 and output.shape[1] > 1 and np.issubdtype(output.dtype, np.floating)


def evaluate(
    original: Path,
    candidate: Path,
    data: InputData,
    *,
    mode: str,
    batch: int | None = None,
    notes: tuple[str, ...] = (),
) -> AccuracyReport:
    """Compare on ``data`` in batches of ``batch`` rows (a model's fixed batch size; 64 when
    the batch dimension is free)."""
    a_sess, b_sess = _session(original), _session(candidate)
    names = [o.name for o in a_sess.get_outputs()]
    a, lat_a = _run(a_sess, data, batch or 64, exact=batch is not None)
    b, lat_b = _run(b_sess, data, batch or 64, exact=batch is not None)
    stats = []
    for name, x, y in zip(names, a, b, strict=True):
        x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        err = np.abs(x64 - y64)
        denom = float(np.linalg.norm(x64) * np.linalg.norm(y64))
        cosine = float(x64 @ y64 / denom) if denom else 1.0
        stats.append(
            OutputStats(
                name, float(err.max(initial=0.0)), float(err.mean()) if err.size else 0.0, cosine
            )
        )
    agreement = acc_a = acc_b = None
    metric = "output error only"
    if has_class_scores(a[0]):
        top_a, top_b = a[0].argmax(axis=1), b[0].argmax(axis=1)
        agreement = float((top_a == top_b).mean())
        metric = "top-1 agreement"
        if data.labels is not None and data.labels.shape[0] == top_a.shape[0]:
            acc_a = float((top_a == data.labels).mean())
            acc_b = float((top_b == data.labels).mean())
            metric = "accuracy against labels"
    return AccuracyReport(
        mode=mode,
        size_before=original.stat().st_size,
        size_after=candidate.stat().st_size,
        rows=data.rows,
        outputs=tuple(stats),
        top1_agreement=agreement,
        accuracy_before=acc_a,
        accuracy_after=acc_b,
        latency_ms_before=lat_a,
        latency_ms_after=lat_b,
        data_source=data.source,
        metric=metric,
        notes=notes,
    )


class GateUsageError(ValueError):
    """``--max-accuracy-drop`` asks for something this model or this data cannot show."""


def gate(report: AccuracyReport, threshold: Threshold | None, *, accept: bool) -> list[str]:
    """The reasons the report fails ``threshold``; raises unless ``accept``.

    A top-1 bound on a model without class scores, or any bound measured on synthetic
    inputs, cannot be checked: :class:`GateUsageError` (a usage error), never a pass."""
    reasons = []
    if threshold is not None:
        if report.data_source != USER:
            raise GateUsageError(
                "--max-accuracy-drop needs real data to measure on: give --eval, "
                "--calibration or --sample-inputs (on synthetic inputs only error figures "
                "are reported)"
            )
        drop = report.top1_drop
        if threshold.top1_drop is not None and drop is None:
            raise GateUsageError(
                "--max-accuracy-drop with a percentage bounds the top-1 drop of a classifier "
                "(a 2-D score output), and this model's first output has no classes: bound "
                "the output error instead (--max-accuracy-drop abs=0.05), or give no bound "
                "and read the error figures in the report"
            )
        if threshold.top1_drop is not None and drop is not None and drop > threshold.top1_drop:
            reasons.append(f"top-1 dropped by {drop:.2%} (limit {threshold.top1_drop:.2%})")
        worst = max((o.max_abs_error for o in report.outputs), default=0.0)
        if threshold.max_abs_error is not None and worst > threshold.max_abs_error:
            reasons.append(f"max abs error {worst:.4g} (limit {threshold.max_abs_error:.4g})")
    if reasons and not accept:
        raise AccuracyDropError("accuracy gate failed: " + "; ".join(reasons), report)
    return reasons


def gate_status(
    report: AccuracyReport,
    threshold: Threshold | None,
    failures: tuple[str, ...],
    *,
    accepted: bool = True,
) -> str:
    """One line saying what the gate established, and no more."""
    if failures:
        return ("gate failed, accepted: " if accepted else "") + "; ".join(failures)
    if threshold is None:
        return "no bound asked (--max-accuracy-drop): figures only"
    return f"gate passed ({report.metric}, {report.rows} rows of {report.data_source})"
