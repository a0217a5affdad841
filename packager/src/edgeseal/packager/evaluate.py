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
from edgeseal.packager.datasets import InputData

__all__ = ["AccuracyDropError", "AccuracyReport", "Threshold", "evaluate", "gate"]


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


def _run(session: Any, data: InputData, batch: int = 64) -> tuple[list[npt.NDArray[Any]], float]:
    outs: list[list[npt.NDArray[Any]]] = []
    times = []
    for i in range(0, data.rows, batch):
        feed = {k: v[i : i + batch] for k, v in data.inputs.items()}
        t0 = time.perf_counter()
        outs.append(session.run(None, feed))
        times.append((time.perf_counter() - t0) * 1e3)
    merged = [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]
    return merged, statistics.median(times)


def evaluate(
    original: Path, candidate: Path, data: InputData, *, mode: str, batch: int | None = None
) -> AccuracyReport:
    """Compare on ``data`` in batches of ``batch`` rows (a model's fixed batch size; 64 when
    the batch dimension is free)."""
    a_sess, b_sess = _session(original), _session(candidate)
    names = [o.name for o in a_sess.get_outputs()]
    a, lat_a = _run(a_sess, data, batch or 64)
    b, lat_b = _run(b_sess, data, batch or 64)
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
    first = a[0]
    if first.ndim == 2 and first.shape[1] > 1 and np.issubdtype(first.dtype, np.floating):
        top_a, top_b = a[0].argmax(axis=1), b[0].argmax(axis=1)
        agreement = float((top_a == top_b).mean())
        if data.labels is not None:
            acc_a = float((top_a == data.labels).mean())
            acc_b = float((top_b == data.labels).mean())
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
    )


def gate(report: AccuracyReport, threshold: Threshold | None, *, accept: bool) -> list[str]:
    """The reasons the report fails ``threshold``; raises unless ``accept``."""
    reasons = []
    if threshold is not None:
        drop = report.top1_drop
        if threshold.top1_drop is not None and drop is not None and drop > threshold.top1_drop:
            reasons.append(f"top-1 dropped by {drop:.2%} (limit {threshold.top1_drop:.2%})")
        worst = max((o.max_abs_error for o in report.outputs), default=0.0)
        if threshold.max_abs_error is not None and worst > threshold.max_abs_error:
            reasons.append(f"max abs error {worst:.4g} (limit {threshold.max_abs_error:.4g})")
    if reasons and not accept:
        raise AccuracyDropError("accuracy gate failed: " + "; ".join(reasons), report)
    return reasons
