"""What the device does with a verified control message, and where an interrupted update
resumes. Pure: values in, a decision out; the updater does the I/O.

The update states, persisted in the model store's journal (``journal.channel``)::

    idle -> downloading -> verifying -> staged -> testing -> [trial] -> committed
                 |              |          |         |  \\------+----> fallen-back
                 \\--------------+----------+---------+----> failed (refused, no space...)

``trial`` only when the offer asks for one (:class:`~edgeseal.ota.messages.Trial`): the
health-checked candidate runs beside the serving model on live traffic, then
:func:`trial_verdict` decides. A trial interrupted by a crash is run again from the start.

``committed`` and ``fallen-back`` and ``failed`` are at rest: nothing to resume. After a
crash, :func:`resume_step` says what to redo; every step is safe to run twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeseal.ota.messages import ControlMessage, Trial

__all__ = [
    "AT_REST",
    "STATES",
    "Decision",
    "SeqBook",
    "SlotView",
    "judge",
    "resume_step",
    "trial_verdict",
]

STATES = (
    "idle",
    "downloading",
    "verifying",
    "staged",
    "testing",
    "trial",
    "committed",
    "fallen-back",
    "failed",
)
AT_REST = frozenset({"idle", "committed", "fallen-back", "failed"})
RECENT = 64


@dataclass(frozen=True)
class Decision:
    """``accept`` (act on it), ``ignore`` (harmless: a duplicate, or late and stale) or
    ``refuse`` (report it: a replay, a downgrade, not for us)."""

    verdict: str
    reason: str = ""


@dataclass(frozen=True)
class SeqBook:
    """The last sequence number seen per signer, and the digests of recent messages."""

    last: Mapping[str, int] = field(default_factory=dict)
    recent: tuple[str, ...] = ()

    def seen(self, msg: ControlMessage) -> bool:
        return msg.digest in self.recent

    def is_replay(self, msg: ControlMessage) -> bool:
        return msg.seq <= self.last.get(msg.signer.key_id, -1)

    def record(self, msg: ControlMessage) -> SeqBook:
        last = dict(self.last)
        last[msg.signer.key_id] = max(msg.seq, last.get(msg.signer.key_id, -1))
        return SeqBook(last, (*self.recent, msg.digest)[-RECENT:])

    def to_obj(self) -> dict[str, Any]:
        return {"last": dict(self.last), "recent": list(self.recent)}

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> SeqBook:
        last = obj.get("last", {})
        recent = obj.get("recent", [])
        return cls(
            {str(k): int(v) for k, v in last.items()} if isinstance(last, dict) else {},
            tuple(str(d) for d in recent)[-RECENT:] if isinstance(recent, list) else (),
        )


@dataclass(frozen=True)
class SlotView:
    """What the device holds for the message's model."""

    active: tuple[int, str] | None = None  # (version, bundle_id)
    fallback: tuple[int, str] | None = None
    floor: int = 0
    #: The update in progress (not at rest): its bundle id and version.
    pending: tuple[int, str] | None = None


def judge(
    msg: ControlMessage,
    *,
    device_id: str,
    groups: Sequence[str],
    seqs: SeqBook,
    slots: SlotView,
) -> Decision:
    """Decide what to do with a verified message. Order matters: duplicates first (QoS 1
    redelivery and retained messages are normal and silent), then addressing, then
    replays, then what the message asks against what the device holds."""
    if seqs.seen(msg):
        return Decision("ignore", "duplicate")
    kind, target = msg.to
    if (kind == "device" and target != device_id) or (kind == "group" and target not in groups):
        return Decision("refuse", f"addressed to {kind} {target!r}, not to this device")
    if seqs.is_replay(msg):
        last = seqs.last.get(msg.signer.key_id)
        return Decision("refuse", f"replay: sequence {msg.seq} is not after {last}")
    if msg.action == "install":
        return _judge_offer(msg, slots)
    return _judge_order(msg, slots)


def _judge_offer(msg: ControlMessage, slots: SlotView) -> Decision:  # noqa: PLR0911 - one return per rule
    if msg.version < slots.floor:
        return Decision("refuse", f"downgrade: v{msg.version} is below the floor {slots.floor}")
    if slots.active is not None:
        version, bundle_id = slots.active
        if msg.version == version:
            if msg.bundle_id == bundle_id:
                return Decision("ignore", f"v{version} is already active")
            return Decision("refuse", f"v{version} is active with other content: refused")
        if msg.version < version:
            return Decision("refuse", f"downgrade: v{msg.version} is older than active v{version}")
    pending = slots.pending
    if pending is not None and pending[1] == msg.bundle_id:
        return Decision("ignore", f"v{msg.version} is already being installed")
    if pending is not None and msg.version < pending[0]:
        return Decision("refuse", f"v{msg.version} is older than v{pending[0]} in progress")
    return Decision("accept")


def _judge_order(msg: ControlMessage, slots: SlotView) -> Decision:
    """Orders are about one version: a late order about another is stale, and harmless.
    A fall-back order about the update in progress stops it (a halted rollout orders its
    wave back, and a device still downloading or on trial must not commit later)."""
    if msg.action == "fall-back" and slots.pending == (msg.version, msg.bundle_id):
        return Decision("accept", f"v{msg.version} is in progress: it stops")
    active = slots.active
    if active is None or active != (msg.version, msg.bundle_id):
        what = f"v{active[0]}" if active else "nothing"
        return Decision("ignore", f"stale {msg.action} order for v{msg.version}; {what} is active")
    if msg.action == "fall-back" and slots.fallback is None:
        return Decision("refuse", f"cannot fall back from v{msg.version}: no fallback slot")
    if msg.action == "finalize" and slots.fallback is None and slots.floor >= msg.version:
        return Decision("ignore", f"v{msg.version} is already final")
    return Decision("accept")


def resume_step(state: str, *, staged: bool, active_bundle: str | None, offer_bundle: str) -> str:
    """After a restart in ``state``: the step to run now.

    ``staged`` says whether the store has a staged slot; ``active_bundle`` is the bundle id
    now active. The store's journal is the truth about slots; the channel state is the
    truth about intent.
    """
    if state in AT_REST:
        return "rest"
    if active_bundle == offer_bundle:
        return "report-committed"  # the commit landed; the crash came before we said so
    if state == "downloading":
        return "download"
    if state == "verifying":
        return "verify"
    # staged, testing or trial: the staged slot is there to test again (a trial restarts
    # from the beginning), or it is gone (it failed)
    return "test" if staged else "verify"


def trial_verdict(trial: Trial, stats: Mapping[str, Any]) -> str:
    """Why a finished trial fails ("" if it passes). ``stats`` as
    :meth:`edgeseal.agent.service.ShadowStats.to_obj`. Too little traffic fails: a
    candidate nobody exercised has shown nothing, and the serving model is known good."""
    requests = int(stats.get("requests", 0))
    if requests < trial.min_requests:
        return f"trial: too little traffic ({requests} requests, {trial.min_requests} needed)"
    error_rate = float(stats.get("error_rate", 0.0))
    if error_rate > trial.max_error_rate:
        return (
            f"trial: error rate {error_rate:.4f} over {trial.max_error_rate} "
            f"({stats.get('errors', 0)} of {requests} requests)"
        )
    ood_rate = float(stats.get("ood_rate", 0.0))
    if ood_rate > trial.max_ood_rate:
        return (
            f"trial: OOD rate {ood_rate:.4f} over {trial.max_ood_rate} "
            f"({stats.get('ood_rows', 0)} of {stats.get('rows', 0)} rows)"
        )
    return ""
