"""The device's updater: from a verified offer to a committed model, or back.

Transport-agnostic: the MQTT channel (:mod:`edgeseal.ota.channel`) feeds it control
messages and chunk frames and gives it a :class:`Link` to ask for chunks and report; the
decisions are :mod:`edgeseal.ota.decide`'s and the slots are the agent's model store's.
All methods run on one thread (the channel's worker).

Where things live on the device:

    <home>/ota/incoming/<bundle_id>.part   the bundle being downloaded (ciphertext)
    <home>/ota/seqs.json                   last sequence number per signer, recent digests
    <store>/<model>/journal.json           ``channel``: this model's update state and offer

A download resumes from what is on disk: after a restart the ``.part`` file is hashed
chunk by chunk against the offer's digests, and only the missing or bad chunks are asked
for again, so no per-chunk bookkeeping has to survive a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from edgeseal.agent.guard import ServingModel
from edgeseal.agent.service import Agent
from edgeseal.agent.version import __version__ as agent_version
from edgeseal.core.config import OtaConfig
from edgeseal.core.encoding import b64d, b64e, canonical_json, format_time, utcnow
from edgeseal.core.errors import EdgesealError
from edgeseal.core.files import atomic_write, describe_os_error
from edgeseal.core.manifest import is_bundle_id
from edgeseal.core.trust import TrustAnchor
from edgeseal.ota.decide import (
    AT_REST,
    Decision,
    SeqBook,
    SlotView,
    judge,
    resume_step,
    trial_verdict,
)
from edgeseal.ota.messages import (
    ControlMessage,
    OtaMessageError,
    decode_chunk,
    verify_message,
)

__all__ = ["Faults", "HealthError", "Link", "Updater"]

log = logging.getLogger("edgeseal.ota")


#: A candidate slower than the serving model by less than this per golden pass is not
#: refused for latency, whatever the ratio.
LATENCY_SLACK = 0.002


class HealthError(EdgesealError):
    """A staged model failed its health check; the serving model stays."""


class Link(Protocol):
    """What the updater needs from its transport."""

    def fetch(self, bundle_id: str, indices: Sequence[int]) -> None: ...

    def publish_status(self, status: Mapping[str, Any]) -> None: ...

    def publish_event(self, event: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Faults:
    """Fault injection for tests and the fleet simulator only (``EDGESEAL_UNSAFE_OTA_FAULTS``,
    e.g. ``kill-at=testing,fail-health,corrupt-chunk=3``). Never set on a real device."""

    kill_at: str = ""
    fail_health: bool = False
    corrupt_chunk: int = -1
    drop_after_chunks: int = -1
    kill_after_chunks: int = -1

    @classmethod
    def from_text(cls, text: str) -> Faults:
        values: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = item.partition("=")
            if key == "kill-at":
                values["kill_at"] = value
            elif key == "fail-health":
                values["fail_health"] = True
            elif key == "corrupt-chunk":
                values["corrupt_chunk"] = int(value)
            elif key == "drop-after-chunks":
                values["drop_after_chunks"] = int(value)
            elif key == "kill-after-chunks":
                values["kill_after_chunks"] = int(value)
            else:
                raise ValueError(f"unknown OTA fault {key!r}")
        if values:
            log.warning("UNSAFE: OTA fault injection is on: %s", text)
        return cls(**values)


@dataclass
class _Download:
    msg: ControlMessage
    wire: bytes
    path: Path
    fd: int
    have: set[int] = field(default_factory=set)
    asked: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    written_since_sync: int = 0

    def missing(self) -> list[int]:
        return [i for i in range(self.msg.chunk_count) if i not in self.have]


@dataclass
class _Trial:
    """A trial window in progress: the checked candidate, shadowing the serving model."""

    msg: ControlMessage
    checked: ServingModel
    started: float


@dataclass
class Counters:
    bytes_received: int = 0
    chunks_received: int = 0
    chunks_dropped: int = 0
    messages_refused: int = 0
    messages_ignored: int = 0


class Updater:
    def __init__(
        self,
        agent: Agent,
        config: OtaConfig,
        device_id: str,
        link: Link,
        *,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.monotonic,
        kill: Callable[[str], None] | None = None,
    ) -> None:
        self.agent = agent
        self.config = config
        self.device_id = device_id
        self.link = link
        self.faults = faults or Faults()
        self.clock = clock
        #: What a kill fault does: SIGKILL this process. The fleet simulator, which runs
        #: many devices in one process, abandons the one device instead.
        self.kill = kill or _kill_process
        self.dir = agent.home.path / "ota"
        (self.dir / "incoming").mkdir(parents=True, exist_ok=True, mode=0o700)
        self.counters = Counters()
        self.download: _Download | None = None
        self.last_refusal = ""
        #: Asks the channel to run :meth:`tick` again soon (an HTTP download continues).
        self.kick: Callable[[], None] = lambda: None
        #: Trials in progress, by model (in memory only: a restart runs a trial again).
        self.trials: dict[str, _Trial] = {}
        #: When each committed model's probation began, on ``clock`` (monotonic): at the
        #: commit, or at the first tick after a start. A wall-clock jump can neither end
        #: it early (the floor would rise, for good on a TPM counter) nor hold it off; a
        #: restart starts the window again, as it does a trial.
        self.probation: dict[str, float] = {}

    # -- persisted state ---------------------------------------------------------------

    def _seqs(self) -> SeqBook:
        try:
            return SeqBook.from_obj(json.loads((self.dir / "seqs.json").read_bytes()))
        except FileNotFoundError:
            return SeqBook()
        except (ValueError, AttributeError) as e:
            # A damaged book only forgets history; sequence numbers still rise from here.
            log.error("%s is damaged (%s); starting a new sequence book", self.dir, e)
            return SeqBook()

    def _record(self, msg: ControlMessage) -> None:
        atomic_write(self.dir / "seqs.json", canonical_json(self._seqs().record(msg).to_obj()))

    def _state(self, model: str) -> dict[str, Any]:
        return dict(self.agent.store.journal(model).channel)

    def _set_state(self, model: str, state: str, **details: Any) -> None:
        old = self._state(model)
        new = {**old, **details, "state": state, "since": format_time(utcnow())}
        log.info(
            "%s: %s -> %s %s", model, old.get("state", "idle"), state, details.get("reason", "")
        )
        self.agent.store.set_channel_state(model, new)
        self.link.publish_event(
            {
                "event": "transition",
                "model": model,
                "from": old.get("state", "idle"),
                "to": state,
                "reason": details.get("reason", ""),
                "version": details.get("version", old.get("version")),
                "rollout": new.get("rollout", ""),
                "time": new["since"],
            }
        )
        self.report()
        if self.faults.kill_at == state:
            self.kill(f"UNSAFE fault: killing this process at {state}")

    def _slots(self, model: str) -> SlotView:
        j = self.agent.store.journal(model)
        ch = j.channel

        def pick(slot: str | None) -> tuple[int, str] | None:
            if slot is None or slot not in j.slots:
                return None
            return j.slots[slot].version, j.slots[slot].bundle_id

        pending = None
        if ch.get("state", "idle") not in AT_REST:
            pending = (int(ch.get("version", 0)), str(ch.get("bundle_id", "")))
        return SlotView(
            pick(j.active), pick(j.fallback), self.agent.store.floors.get(model), pending
        )

    # -- status ------------------------------------------------------------------------

    def _part_path(self, bundle_id: str) -> Path:
        """Where an offered bundle is downloaded to, until it is staged."""
        return self.dir / "incoming" / f"{bundle_id}.part"

    def status(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name in self.agent.store.models():
            j = self.agent.store.journal(name)
            sm = self.agent.serving.get(name)
            rows = sm.counters.rows if sm else 0
            models[name] = {
                "state": j.channel.get("state", "idle"),
                "reason": j.channel.get("reason", ""),
                "rollout": j.channel.get("rollout", ""),
                "offered": j.channel.get("version"),
                "active": j.slots[j.active].version if j.active else None,
                "fallback": j.slots[j.fallback].version if j.fallback else None,
                "floor": self.agent.store.floors.get(name),
                "quarantined": sm.quarantined if sm else None,
                "ood_rate": round(sm.counters.ood_rows / rows, 4) if sm and rows else 0.0,
                "trial": self._trial_status(name, j.channel.get("trial")),
            }
        d = self.download
        return {
            "device": self.device_id,
            "time": format_time(utcnow()),
            "agent_version": agent_version,
            "key_store": self.agent.key_store.kind,
            "models": models,
            "download": (
                {
                    "model": d.msg.model,
                    "version": d.msg.version,
                    "have": len(d.have),
                    "of": d.msg.chunk_count,
                }
                if d
                else None
            ),
            "audit_head": self._audit_head(),
            "counters": dict(vars(self.counters)),
            "last_refusal": self.last_refusal,
        }

    def _trial_status(self, name: str, stored: Any) -> dict[str, Any] | None:
        """The trial in progress (its window and live figures) or the last one's result
        (window, figures, passed), or None."""
        if not isinstance(stored, dict):
            return None
        if name in self.trials:
            return {**stored, "stats": self.agent.shadow_stats(name), "passed": None}
        return dict(stored)

    def _audit_head(self) -> str | None:
        configured = self.agent.config.agent.audit_log
        path = Path(configured) if configured else self.agent.home.path / "audit.log"
        try:
            return str(json.loads(path.with_name(path.name + ".anchor").read_bytes())["head"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def report(self) -> None:
        self.link.publish_status(self.status())

    def _refuse(self, reason: str, msg: ControlMessage | None = None) -> None:
        self.counters.messages_refused += 1
        self.last_refusal = reason
        log.warning("refused OTA message: %s", reason)
        event: dict[str, Any] = {
            "event": "refused",
            "reason": reason,
            "time": format_time(utcnow()),
        }
        if msg is not None:
            event.update(
                model=msg.model, version=msg.version, action=msg.action, rollout=msg.rollout
            )
        self.link.publish_event(event)
        self.report()

    # -- control messages ----------------------------------------------------------------

    def _verified_message(self, unverified_wire: bytes) -> tuple[ControlMessage, TrustAnchor]:
        """A control message checked against this device's trust and time now."""
        state = self.agent.home.trust_state()
        anchor = state.anchor
        msg = verify_message(
            unverified_wire,
            anchor=anchor,
            trust=state,
            known_revocations=None,
            now=self.agent.home.trusted_now(),
            clock_skew=timedelta(seconds=self.agent.config.device.clock_skew),
            max_bundle_bytes=self.config.max_bundle_bytes,
        )
        return msg, anchor

    def handle_control(self, unverified_wire: bytes) -> Decision:
        try:
            msg, _ = self._verified_message(unverified_wire)
        except EdgesealError as e:
            self._refuse(f"{type(e).__name__}: {e}")
            return Decision("refuse", str(e))
        if msg.trust is not None:  # verified statements: kept whatever is decided below
            self.agent.home.remember(msg.trust)
        slots = self._slots(msg.model)
        decision = judge(
            msg,
            device_id=self.device_id,
            groups=self.config.groups,
            seqs=self._seqs(),
            slots=slots,
        )
        if decision.verdict == "refuse":
            self._refuse(decision.reason, msg)
            return decision
        if decision.verdict == "ignore":
            self.counters.messages_ignored += 1
            if decision.reason != "duplicate":
                self._record(msg)
            return decision
        self.agent.home.advance_trusted_time(
            msg.issued, clock_skew=timedelta(seconds=self.agent.config.device.clock_skew)
        )
        # Act first, then record: a crash in between leaves the message unrecorded, so its
        # redelivery (retained, or queued in the session) is judged again, and finds the
        # update in progress or the order already done. Recorded first, a crash would make
        # the redelivery a "duplicate" and the update would never start.
        if msg.action == "install":
            self._start(msg, unverified_wire)
        else:
            self._order(msg, slots)
        self._record(msg)
        return decision

    def _order(self, msg: ControlMessage, slots: SlotView) -> None:
        """Carry out an accepted order; ``slots`` are the ones it was judged against."""
        reason = f"{msg.action} ordered by {msg.signer.name}" + (
            f": {msg.reason}" if msg.reason else ""
        )
        if msg.action == "finalize":
            self.agent.store.finalize(msg.model)
            self._set_state(msg.model, "committed", reason="finalized", final=True)
            return
        if msg.action == "quarantine":
            sm = self.agent.serving.get(msg.model)
            if sm is not None:
                sm.quarantine(reason)  # the agent falls back by itself when it can
            return
        if slots.pending == (msg.version, msg.bundle_id):
            self._stop_update(msg.model, msg.bundle_id, reason)
        else:
            self.agent.fall_back(msg.model, reason)
        self._set_state(msg.model, "fallen-back", reason=reason, rollout=msg.rollout)

    def _stop_update(self, model: str, bundle_id: str, reason: str) -> None:
        """Stop the update in progress (ordered back before it committed): the download
        and its partial file go, a trial is dropped with its staged slot; what serves
        stays as it is."""
        d = self.download
        if d is not None and d.msg.bundle_id == bundle_id:
            self.download = None
            os.close(d.fd)
            d.path.unlink(missing_ok=True)
        self._abort_trial(model, reason)
        with contextlib.suppress(EdgesealError):
            self.agent.discard_staged(model, reason)
        log.info("%s: the update to %s stopped: %s", model, bundle_id[:16], reason)

    # -- downloading -------------------------------------------------------------------

    def _start(self, msg: ControlMessage, wire: bytes) -> None:
        if self.download is not None:
            self._abandon(f"superseded by v{msg.version}")
        self._abort_trial(msg.model, f"superseded by v{msg.version}")
        self._set_state(
            msg.model,
            "downloading",
            offer=b64e(wire),
            version=msg.version,
            bundle_id=msg.bundle_id,
            rollout=msg.rollout,
            reason="",
            final=False,
            trial=None,
        )
        self._open_download(msg, wire)

    def _open_download(self, msg: ControlMessage, wire: bytes) -> None:
        path = self._part_path(msg.bundle_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != msg.size:
                os.ftruncate(fd, msg.size)
                os.posix_fallocate(fd, 0, msg.size)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            why = describe_os_error(e)
            self._set_state(msg.model, "failed", reason=f"download: {why}")
            return
        d = _Download(msg, wire, path, fd)
        # Resume: what is already on disk and matches its digest need not come again.
        for i in range(msg.chunk_count):
            piece = os.pread(fd, msg.chunk_length(i), i * msg.chunk_bytes)
            if hashlib.sha256(piece).digest() == msg.chunks[i]:
                d.have.add(i)
        self.download = d
        log.info(
            "downloading %s v%s: %d/%d chunks on disk",
            msg.model,
            msg.version,
            len(d.have),
            msg.chunk_count,
        )
        self._pump()

    def _abandon(self, reason: str) -> None:
        d = self.download
        if d is None:
            return
        self.download = None
        os.close(d.fd)
        d.path.unlink(missing_ok=True)
        self._set_state(d.msg.model, "failed", reason=reason)

    def _pump(self) -> None:
        """Ask for the next window of chunks, over HTTP or MQTT."""
        d = self.download
        if d is None:
            return
        missing = d.missing()
        if not missing:
            self._finish_download()
            return
        if d.msg.url:
            self._http_fetch(d, missing)
            return
        now = self.clock()
        in_flight = [i for i, t in d.asked.items() if now - t < self.config.chunk_timeout]
        room = self.config.window - len(in_flight)
        ask = [
            i for i in missing if i not in d.asked or now - d.asked[i] >= self.config.chunk_timeout
        ]
        ask = ask[: max(room, 0)]
        if ask:
            for i in ask:
                d.asked[i] = now
            self.link.fetch(d.msg.bundle_id, ask)

    def handle_chunk(self, unverified_frame: bytes) -> None:
        d = self.download
        try:
            frame = decode_chunk(unverified_frame)
        except OtaMessageError:
            self.counters.chunks_dropped += 1
            return
        if d is None or frame.bundle_id != d.msg.bundle_id or frame.index >= d.msg.chunk_count:
            self.counters.chunks_dropped += 1  # late, duplicated or from another bundle
            return
        self._accept_chunk(d, frame.index, frame.data)
        self._pump()

    def _accept_chunk(self, d: _Download, index: int, unverified_data: bytes) -> bool:
        data = unverified_data
        if self.faults.corrupt_chunk == index and index not in d.have:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.faults = replace(self.faults, corrupt_chunk=-1)
        self.counters.bytes_received += len(data)
        if index in d.have:
            return True
        if len(data) != d.msg.chunk_length(index) or (
            hashlib.sha256(data).digest() != d.msg.chunks[index]
        ):
            self.counters.chunks_dropped += 1
            d.asked.pop(index, None)
            log.warning("chunk %d of %s does not match its digest: dropped", index, d.msg.bundle_id)
            return False
        try:
            os.pwrite(d.fd, data, index * d.msg.chunk_bytes)
        except OSError as e:
            self._abandon(f"download: cannot write: {e.strerror}")
            return False
        d.have.add(index)
        d.asked.pop(index, None)
        self.counters.chunks_received += 1
        d.written_since_sync += 1
        if d.written_since_sync >= 64:
            os.fsync(d.fd)
            d.written_since_sync = 0
        if self.faults.kill_after_chunks == len(d.have):
            os.fsync(d.fd)
            self.kill(f"UNSAFE fault: killing this process after {len(d.have)} chunks")
        if self.faults.drop_after_chunks == len(d.have):
            self.faults = replace(self.faults, drop_after_chunks=-1)
            raise ConnectionAbortedError("UNSAFE fault: dropping the connection mid-download")
        return True

    def _http_fetch(self, d: _Download, missing: list[int]) -> None:
        """Fetch the first run of missing chunks (at most ``window``) with one HTTP Range
        request, then return to the channel's loop (``kick`` brings it back at once), so
        control messages never wait behind a download. Each chunk must arrive whole within
        ``chunk_timeout`` of its first byte being asked for: a server that drips bytes is
        cut off and asked again later, like a lost chunk over MQTT."""
        first = last = missing[0]
        while last + 1 in missing[: self.config.window] and last - first + 1 < self.config.window:
            last += 1
        start = first * d.msg.chunk_bytes
        end = last * d.msg.chunk_bytes + d.msg.chunk_length(last) - 1
        headers = {"Range": f"bytes={start}-{end}"}
        req = urllib.request.Request(d.msg.url, headers=headers)  # noqa: S310 - http(s) only (verify_message)
        timeout = self.config.chunk_timeout
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                if resp.status != 206:
                    raise OSError(f"server answered {resp.status}, not 206 Partial Content")
                for i in range(first, last + 1):
                    piece = _read_within(resp, d.msg.chunk_length(i), time.monotonic() + timeout)
                    if not self._accept_chunk(d, i, piece) or self.download is not d:
                        break
        except (OSError, urllib.error.URLError) as e:
            log.warning("HTTP download of %s: %s (will retry)", d.msg.url, e)
            return
        if self.download is not d:
            return
        if not d.missing():
            self._finish_download()
        else:
            self.kick()

    def _finish_download(self) -> None:
        d = self.download
        assert d is not None
        os.fsync(d.fd)
        os.close(d.fd)
        self.download = None
        try:
            self._set_state(d.msg.model, "verifying")
        except OSError as e:
            # The journal cannot take the state (the bundle's preallocation took the last
            # of the disk): give that space back, so the failure can be recorded.
            d.path.unlink(missing_ok=True)
            why = describe_os_error(e)
            self._set_state(
                d.msg.model, "failed", reason=f"verify: the journal cannot be written: {why}"
            )
            return
        self._verify(d.msg, d.path)

    # -- verify, stage, test, commit ---------------------------------------------------

    def _verify(self, msg: ControlMessage, path: Path) -> None:
        try:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != msg.sha256:
                raise OtaMessageError("the downloaded bundle does not match the offer's digest")
            # Verified once (V1-V11, V12's lookup); staging checks its copy against this
            # result by digest, and opening the staged copy carries it too.
            vb = self.agent.verify(path)
            m = vb.manifest
            if (m.model_name, m.version, m.bundle_id) != (msg.model, msg.version, msg.bundle_id):
                raise OtaMessageError(
                    f"the bundle is {m.model_name} v{m.version} ({m.bundle_id[:8]}), "
                    f"not what the offer names ({msg.model} v{msg.version})"
                )
            self.agent.stage(path, verified=vb)
        except (EdgesealError, OSError) as e:
            path.unlink(missing_ok=True)
            self._set_state(msg.model, "failed", reason=f"verify: {type(e).__name__}: {e}")
            return
        self._set_state(msg.model, "staged")
        self._test(msg)

    def _test(self, msg: ControlMessage) -> None:
        self._set_state(msg.model, "testing")
        try:
            checked = self.agent.check_staged(msg.model)  # opens it; golden vectors
        except EdgesealError as e:
            self._fell_back(msg, f"health: {type(e).__name__}: {e}")
            return
        try:
            self._health(msg, checked)
        except HealthError as e:
            checked.close()
            self.agent.discard_staged(msg.model, str(e))
            self._fell_back(msg, f"health: {e}")
            return
        if msg.trial is not None:
            if msg.model in self.agent.serving:
                self._start_trial(msg, checked)
                return
            # No live traffic can reach a model that is not serving yet: nothing to trial
            # against and nothing to protect, so the first install commits after health.
            log.info("%s v%s: nothing serving, so no trial", msg.model, msg.version)
        self.agent.commit_staged(msg.model, checked)
        self._committed(msg)

    def _fell_back(self, msg: ControlMessage, reason: str, **details: Any) -> None:
        self._part_path(msg.bundle_id).unlink(missing_ok=True)
        self._set_state(msg.model, "fallen-back", reason=reason, **details)

    def _committed(self, msg: ControlMessage, **details: Any) -> None:
        self._part_path(msg.bundle_id).unlink(missing_ok=True)
        self.probation[msg.model] = self.clock()
        self._set_state(
            msg.model, "committed", reason="", committed_at=time.time(), final=False, **details
        )

    # -- trial window (shadow inference on live traffic) ---------------------------------

    def _start_trial(self, msg: ControlMessage, checked: ServingModel) -> None:
        assert msg.trial is not None
        self._set_state(msg.model, "trial", reason="", trial={"window": msg.trial.to_obj()})
        self.trials[msg.model] = _Trial(msg, checked, self.clock())
        self.agent.start_shadow(msg.model, checked)

    def _abort_trial(self, model: str, reason: str) -> None:
        """Drop a trial without a verdict (superseded, or the agent fell back): the
        candidate is closed and the staged slot discarded."""
        t = self.trials.pop(model, None)
        if t is None:
            return
        self.agent.stop_shadow(model)
        t.checked.close()
        with contextlib.suppress(EdgesealError):
            self.agent.discard_staged(model, f"trial abandoned: {reason}")
        log.info("%s: trial of v%s abandoned: %s", model, t.msg.version, reason)

    def _check_trials(self) -> None:
        for model, t in list(self.trials.items()):
            assert t.msg.trial is not None
            if self._state(model).get("state") != "trial":
                self._abort_trial(model, "the update is no longer on trial")
            elif self.clock() - t.started >= t.msg.trial.seconds:
                self._finish_trial(model, t)

    def _finish_trial(self, model: str, t: _Trial) -> None:
        assert t.msg.trial is not None
        del self.trials[model]
        stats = self.agent.stop_shadow(model)
        why = trial_verdict(t.msg.trial, stats)
        result = {"window": t.msg.trial.to_obj(), "stats": stats, "passed": not why}
        self.link.publish_event(
            {
                "event": "trial",
                "model": model,
                "version": t.msg.version,
                "rollout": t.msg.rollout,
                "passed": not why,
                "reason": why,
                "stats": stats,
                "time": format_time(utcnow()),
            }
        )
        if why:
            t.checked.close()
            self.agent.discard_staged(model, why)
            self._fell_back(t.msg, why, trial=result)
            return
        self.agent.commit_staged(model, t.checked)
        self._committed(t.msg, trial=result)

    def _health(self, msg: ControlMessage, checked: ServingModel) -> None:
        if self.faults.fail_health:
            raise HealthError("UNSAFE fault: health check forced to fail")
        serving = self.agent.serving.get(msg.model)
        if serving is None:
            return
        if not msg.breaking:
            old, new = serving.opened.manifest, checked.opened.manifest
            for what, a, b in (
                ("inputs", old.inputs, new.inputs),
                ("outputs", old.outputs, new.outputs),
            ):
                if [t.to_obj() for t in a] != [t.to_obj() for t in b]:
                    raise HealthError(
                        f"{what} differ from the serving model's and the offer does not "
                        "flag a breaking change"
                    )
        budget = self.config.latency_budget
        if budget > 0:
            before, after = _golden_time(serving), _golden_time(checked)
            # Both the ratio and an absolute cost: a sub-millisecond model's ratio is mostly
            # scheduler noise on a busy board.
            if before > 0 and after > budget * before and after - before > LATENCY_SLACK:
                raise HealthError(
                    f"golden inputs take {after * 1e3:.2f} ms, over {budget}x the serving "
                    f"model's {before * 1e3:.2f} ms"
                )

    # -- lifecycle -----------------------------------------------------------------------

    def resume(self) -> None:
        """After a start: pick every model's update up where it was."""
        for name in self.agent.store.models():
            ch = self._state(name)
            state = ch.get("state", "idle")
            if state in AT_REST or "offer" not in ch:
                continue
            wire = b64d(ch["offer"], "stored offer")
            try:
                msg, _ = self._verified_message(wire)
            except EdgesealError as e:
                bundle_id = str(ch.get("bundle_id", ""))
                if is_bundle_id(bundle_id):  # no partial download stays
                    self._part_path(bundle_id).unlink(missing_ok=True)
                self._set_state(name, "failed", reason=f"resume: the offer no longer holds: {e}")
                continue
            j = self.agent.store.journal(name)
            active = j.slots[j.active].bundle_id if j.active else None
            step = resume_step(
                state, staged=j.staged is not None, active_bundle=active, offer_bundle=msg.bundle_id
            )
            log.info("resuming %s v%s from %s: %s", name, msg.version, state, step)
            if step == "report-committed":
                self._committed(msg)
            elif step == "download":
                self._open_download(msg, wire)
            elif step == "verify":
                path = self._part_path(msg.bundle_id)
                if path.exists():
                    self._verify(msg, path)
                else:
                    self._set_state(name, "downloading", reason="resume: file gone")
                    self._open_download(msg, wire)
            elif step == "test":
                self._test(msg)
        self.report()

    def tick(self) -> None:
        """Periodic work: ask again for overdue chunks; end trial and probation windows."""
        with contextlib.suppress(ConnectionAbortedError):
            self._pump()
        self._check_trials()
        if self.config.probation_seconds <= 0:
            return
        now = self.clock()
        for name in self.agent.store.models():
            ch = self._state(name)
            if ch.get("state") != "committed" or ch.get("final") or ch.get("committed_at") is None:
                self.probation.pop(name, None)
                continue
            if now - self.probation.setdefault(name, now) >= self.config.probation_seconds:
                del self.probation[name]
                self.agent.store.finalize(name)
                self._set_state(name, "committed", reason="probation passed", final=True)

    def on_agent_event(self, event: str, model: str, details: Mapping[str, Any]) -> None:
        """The agent quarantined or fell back by itself: say so."""
        if event == "fell_back":
            self._abort_trial(model, "the agent fell back")
            self._set_state(model, "fallen-back", reason=str(details.get("reason", "")))
        elif event == "quarantined":
            self.report()

    def close(self) -> None:
        # A trial cut short by a stop is run again on the next start (the state stays).
        for model, t in list(self.trials.items()):
            self.agent.stop_shadow(model)
            t.checked.close()
        self.trials.clear()
        d, self.download = self.download, None
        if d is not None:
            os.fsync(d.fd)
            os.close(d.fd)


def _kill_process(why: str) -> None:
    log.warning("%s", why)
    os.kill(os.getpid(), signal.SIGKILL)


def _read_within(resp: Any, n: int, deadline: float) -> bytes:
    """``n`` bytes of an HTTP body, or TimeoutError once ``deadline`` passes (one socket read
    at a time, so a server sending a byte now and then cannot stretch it)."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"chunk not received within the chunk timeout ({have}/{n} bytes)")
        piece = resp.read1(n - have)
        if not piece:
            break
        parts.append(piece)
        have += len(piece)
    return b"".join(parts)


def _golden_time(sm: ServingModel, runs: int = 5) -> float:
    """The fastest of a few golden passes: the least disturbed by other work on the device."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sm.self_check(golden=True, digest=False)
        times.append(time.perf_counter() - t0)
    return min(times)
