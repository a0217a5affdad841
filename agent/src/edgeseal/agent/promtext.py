"""The Prometheus text exposition format (version 0.0.4), written by hand: it is small.

:class:`Exposition` collects metric families (one ``# HELP`` and ``# TYPE`` line each,
then their samples, label values escaped) and :class:`Histogram` counts observations
into cumulative buckets. Internal API.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Exposition", "Histogram", "HistogramSnapshot"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds, in seconds, of the latency buckets (Prometheus's usual default set).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

#: Longest label value written; longer ones are cut (a value can come from a file).
MAX_LABEL_CHARS = 128


def escape_label(value: str) -> str:
    """A label value as the format quotes it: backslash, double quote and newline escaped."""
    value = value[:MAX_LABEL_CHARS]
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, infinities as the format spells them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Families in the order they are added; each family's samples after its header."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Begin family ``name`` of type ``kind`` (counter, gauge, histogram)."""
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self._lines.append(f"{name}{_labels(labels)} {format_value(value)}")

    def histogram(self, name: str, labels: Mapping[str, str], snap: HistogramSnapshot) -> None:
        """The ``_bucket`` (cumulative, ``le`` last), ``_sum`` and ``_count`` samples."""
        for bound, count in zip(snap.bounds, snap.cumulative, strict=True):
            self.sample(f"{name}_bucket", {**labels, "le": format_value(bound)}, count)
        self.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, snap.count)
        self.sample(f"{name}_sum", labels, snap.total)
        self.sample(f"{name}_count", labels, snap.count)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram at one moment: cumulative counts per upper bound, sum and count."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    total: float
    count: int


class Histogram:
    """Observations counted into buckets by upper bound (thread-safe)."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or not math.isfinite(bounds[-1]):
            raise ValueError("bounds must be finite, rising and not empty")
        self._bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)  # the first bound >= value (le is inclusive)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        running, cumulative = 0, []
        for c in counts[:-1]:
            running += c
            cumulative.append(running)
        return HistogramSnapshot(self._bounds, tuple(cumulative), total, running + counts[-1])
