"""What ``GET /metrics`` says: the agent's series in the Prometheus text format.

One producer, :func:`render_metrics`, serves both the unix socket (each caller sees the
series of the models it may call) and the opt-in TCP listener
(:mod:`edgeseal.agent.metrics_http`, every model). Series:

* per model: requests, rows, OOD rows, rejected (counters), quarantined and the serving
  version (gauges), and ``edgeseal_inference_seconds``, a histogram of the guarded
  inference's time on answered calls;
* per installed model, from the store's journal: the update channel's state, the staged
  (pending) version, whether a fall-back slot is kept, the version floor, and the last
  install / fall-back / quarantine the agent saw;
* the API's error answers by status code;
* the audit log: records written, the time of the last, and whether writes fail;
* ``edgeseal_build_info``: the agent's and Python's versions, value 1.

Internal API.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable, Mapping

from edgeseal.agent.audit import AuditLog
from edgeseal.agent.guard import ServingModel
from edgeseal.agent.promtext import Exposition, Histogram
from edgeseal.agent.service import Agent
from edgeseal.agent.version import __version__
from edgeseal.core.errors import EdgesealError

__all__ = ["LatencyByModel", "render_metrics"]

log = logging.getLogger(__name__)

#: (metric, Prometheus type, help, value of a serving model), one series per model.
_MODEL_SERIES: tuple[tuple[str, str, str, Callable[[ServingModel], int]], ...] = (
    ("requests_total", "counter", "Calls answered.", lambda sm: sm.counters.requests),
    ("rows_total", "counter", "Rows inferred.", lambda sm: sm.counters.rows),
    ("ood_rows_total", "counter", "Rows out of distribution.", lambda sm: sm.counters.ood_rows),
    ("rejected_total", "counter", "Calls the checks refused.", lambda sm: sm.counters.rejected),
    ("quarantined", "gauge", "1 while quarantined.", lambda sm: int(bool(sm.quarantined))),
    ("model_version", "gauge", "Serving bundle version.", lambda sm: int(sm.identity["version"])),
)

#: The events of the agent that are an update's outcome for a model.
_RESULTS = ("installed", "fell_back", "quarantined")


class LatencyByModel:
    """One latency histogram per model name (kept across a model's versions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: dict[str, Histogram] = {}

    def observe(self, model: str, seconds: float) -> None:
        with self._lock:
            h = self._by_model.get(model)
            if h is None:
                h = self._by_model[model] = Histogram()
        h.observe(seconds)

    def items(self) -> list[tuple[str, Histogram]]:
        with self._lock:
            return sorted(self._by_model.items())


def render_metrics(
    agent: Agent,
    *,
    visible: Callable[[str], bool],
    errors: Mapping[int, int],
    latency: LatencyByModel,
    audit: AuditLog | None,
) -> str:
    """The exposition text, with the model series only of the models ``visible`` admits."""
    out = Exposition()
    serving = [(n, sm) for n, sm in sorted(agent.serving.items()) if visible(n)]
    for metric, kind, help_text, value in _MODEL_SERIES:
        out.family(f"edgeseal_{metric}", kind, help_text)
        for n, sm in serving:
            out.sample(f"edgeseal_{metric}", {"model": n}, value(sm))
    out.family(
        "edgeseal_inference_seconds", "histogram", "Time of the guarded inference, answered calls."
    )
    for n, h in latency.items():
        if visible(n):
            out.histogram("edgeseal_inference_seconds", {"model": n}, h.snapshot())
    _updates(out, agent, visible)
    out.family("edgeseal_http_errors_total", "counter", "Error answers of the API, by status.")
    for code, count in sorted(dict(errors).items()):
        out.sample("edgeseal_http_errors_total", {"code": str(code)}, count)
    if audit is not None:
        _audit(out, audit)
    out.family("edgeseal_build_info", "gauge", "The agent's build; the value is always 1.")
    out.sample(
        "edgeseal_build_info", {"version": __version__, "python": platform.python_version()}, 1
    )
    return out.text()


def _updates(out: Exposition, agent: Agent, visible: Callable[[str], bool]) -> None:
    """The update gauges of the installed models, from their journals and the events."""
    rows = []
    for name in agent.store.models():
        if not visible(name):
            continue
        try:
            journal = agent.store.journal(name)
        except (OSError, ValueError, KeyError, TypeError, EdgesealError) as e:
            log.debug("no update metrics for %s: %s", name, e)
            continue
        staged = journal.slots.get(journal.staged) if journal.staged else None
        state = journal.channel.get("state")
        rows.append(
            (
                name,
                str(state) if state else "idle",
                staged.version if staged else 0,
                int(journal.fallback is not None),
                agent.store.floors.get(name),
            )
        )
    last: dict[str, str] = {}
    for event in list(agent.events):
        if event.get("event") in _RESULTS:
            last[str(event.get("model"))] = str(event["event"])
    out.family("edgeseal_ota_state", "gauge", "The update channel's state for the model (1).")
    for name, state, *_ in rows:
        out.sample("edgeseal_ota_state", {"model": name, "state": state}, 1)
    out.family("edgeseal_ota_staged_version", "gauge", "Version staged, not yet serving (0: none).")
    for name, _, staged_version, _, _ in rows:
        out.sample("edgeseal_ota_staged_version", {"model": name}, staged_version)
    out.family("edgeseal_ota_fallback_ready", "gauge", "1 while a fall-back slot is kept.")
    for name, _, _, fallback, _ in rows:
        out.sample("edgeseal_ota_fallback_ready", {"model": name}, fallback)
    out.family("edgeseal_ota_version_floor", "gauge", "Lowest version the model may install.")
    for name, *_, floor in rows:
        out.sample("edgeseal_ota_version_floor", {"model": name}, floor)
    out.family(
        "edgeseal_ota_last_result", "gauge", "The last install, fall-back or quarantine (1)."
    )
    for name, *_ in rows:
        if name in last:
            out.sample("edgeseal_ota_last_result", {"model": name, "result": last[name]}, 1)


def _audit(out: Exposition, audit: AuditLog) -> None:
    written, when = audit.written
    out.family(
        "edgeseal_audit_records_written_total", "counter", "Audit records written since start."
    )
    out.sample("edgeseal_audit_records_written_total", {}, written)
    out.family(
        "edgeseal_audit_last_record_timestamp_seconds",
        "gauge",
        "Unix time of the last audit record written (absent before the first).",
    )
    if when is not None:
        out.sample("edgeseal_audit_last_record_timestamp_seconds", {}, when)
    out.family("edgeseal_audit_failing", "gauge", "1 while the audit log refuses writes.")
    out.sample("edgeseal_audit_failing", {}, int(audit.last_error is not None))
