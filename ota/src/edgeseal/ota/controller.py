"""The rollout controller: offers a bundle to a group in waves, watches the devices'
status, halts by itself and orders fall-backs. Provisional API.

The decisions are :mod:`edgeseal.ota.rollout`'s (pure); this module does the I/O around
them: one MQTT connection as the controller identity (status and events of every device
in, signed offers and orders out), a :class:`~edgeseal.ota.server.ChunkServer` for the
data plane, and a :class:`~edgeseal.ota.rollout_store.RolloutStore` for everything that
must survive a restart. Nothing is kept only in memory that the next :meth:`step` needs:
a controller killed at any point and started again (``ota resume``) reads the rollout,
its open wave and the devices' phases from the store, and the devices' latest words from
their retained status messages.

Offers are retained on each device's ``control`` topic (or, for a one-wave rollout with
``group_offer``, on the group's): a device that is offline when its wave opens gets the
offer when it comes back. On a halt the controller clears the retained offers of devices
that have not started, so a halted rollout reaches nobody new.

Several controllers: with a PostgreSQL store and ``share`` (MQTT 5 shared subscriptions,
``$share/<name>/...``), several processes split status intake and chunk serving. Each
rollout is driven (judged, advanced, offered) by one process at a time: the holder of its
lease in the store (taken by :meth:`create` and :meth:`resume`, renewed at every step,
taken over by another process stepping it when it lapses). The others only write the
statuses they receive to the store and serve chunks; with ``share`` the driver judges
from the statuses in the store, since its own subscription receives only its part. Give
each controller its own signer: devices keep one sequence book per signer (docs/ota.md,
"Running at scale").
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeseal.core.errors import UsageError
from edgeseal.core.keys import Signer
from edgeseal.core.trust import TrustAnchor
from edgeseal.ota.messages import make_message
from edgeseal.ota.mqtt import ChannelError, MqttConnection
from edgeseal.ota.rollout import (
    FAILED,
    IN_PROGRESS,
    Policy,
    Verdict,
    device_phase,
    judge_wave,
    plan_waves,
    tally,
)
from edgeseal.ota.rollout_store import RolloutRecord, RolloutStore
from edgeseal.ota.server import BundleOffer, ChunkServer, describe_bundle, sign_offer
from edgeseal.ota.topics import Topics

__all__ = ["DEFAULT_CHUNK_BYTES", "Controller", "RolloutError", "rollout_report"]

log = logging.getLogger("edgeseal.ota.controller")

#: Transport chunk size of offers (AWS IoT Core needs 128 KiB or less: --chunk-size).
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_STATUS_BYTES = 256 * 1024
#: Offers are valid this long; a device that comes back later than that needs a new one.
OFFER_VALIDITY_DAYS = 7


class RolloutError(UsageError):
    """A rollout cannot be made or changed as asked (no such rollout, empty group...).

    The operator fixes it by changing the command (another group, rollout id or bundle,
    halting the running rollout first): a :class:`UsageError`, so the CLI exits 2."""


def _now_utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


@dataclass
class _Signing:
    signer: Signer
    certificate: dict[str, Any]
    revocations: dict[str, Any] | None
    #: The root rotation statements (oldest first) every message carries, so a device
    #: that has not followed a rotation yet can check a certificate of the new root.
    rotations: list[dict[str, Any]] = field(default_factory=list)


#: An offer the broker has not acknowledged in this long is sent again.
UNACKED_RESEND_SECONDS = 60.0
#: A rollout whose driver has not stepped it in this long is taken over by another
#: controller stepping it (controllers' clocks must agree to well within this).
DRIVER_LEASE_SECONDS = 30.0


class Controller:
    """One controller process. ``connect(**kw)`` makes an :class:`MqttConnection` as the
    controller identity (``subscriptions`` and ``on_message`` are passed in)."""

    def __init__(
        self,
        store: RolloutStore,
        connect: Callable[..., MqttConnection],
        *,
        topics: Topics | None = None,
        signer: Signer,
        certificate: Mapping[str, Any],
        revocations: Mapping[str, Any] | None = None,
        rotations: Sequence[Mapping[str, Any]] = (),
        anchor: TrustAnchor | None = None,
        share: str | None = None,
        clock: Callable[[], float] = time.time,
        data_connections: int = 2,
    ) -> None:
        self.store = store
        self.topics = topics or Topics()
        self.signing = _Signing(
            signer,
            dict(certificate),
            dict(revocations) if revocations else None,
            [dict(r) for r in rotations],
        )
        self.anchor = anchor
        self.clock = clock
        self.share = share
        #: Who this controller is in the store's rollout leases.
        self.driver_id = f"{platform.node()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._inbox: dict[str, tuple[float, dict[str, Any]]] = {}
        self._refusals: list[tuple[str, dict[str, Any]]] = []
        known = store.devices()
        self.latest: dict[str, dict[str, Any]] = {d.device: dict(d.status) for d in known}
        #: When each device's latest status arrived (on ``clock``).
        self.latest_seen: dict[str, float] = {d.device: d.last_seen for d in known}
        self.messages_in = 0
        self.messages_out = 0
        self._bundles: dict[str, BundleOffer] = {}
        # rollout -> offers queued but not yet acknowledged by the broker: (devices, when,
        # paho's message info). A device is marked offered in the store only once its
        # offer is acknowledged, so a controller killed in between offers it again.
        self._unacked: dict[str, list[tuple[tuple[str, ...], float, Any]]] = {}

        def shared(**kw: Any) -> MqttConnection:
            if share:
                kw["subscriptions"] = [f"$share/{share}/{t}" for t in kw["subscriptions"]]
            return connect(**kw)

        self.conn = shared(
            subscriptions=[self.topics.all_devices("status"), self.topics.all_devices("events")],
            on_message=self._on_message,
        )
        self.server = ChunkServer(shared, self.topics, publishers=data_connections)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self.conn.start()
        self.server.start()
        if not (self.conn.wait_connected(timeout) and self.server.wait_connected(timeout)):
            self.stop()
            address = self.conn.address
            # A broker that is down or refuses us is the user's environment, not a bug: exit 1.
            raise ChannelError(
                f"the controller could not reach the broker at {address.host}:{address.port} "
                f"within {timeout:g} s (is it running, and do its certificates and ACL let "
                "the controller in?)"
            )

    def stop(self) -> None:
        self.server.stop()
        self.conn.stop()

    # -- intake (paho's thread: queue only) ---------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device(topic)
        if parsed is None or not payload or len(payload) > MAX_STATUS_BYTES:
            return
        device, kind = parsed
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        with self._lock:
            self.messages_in += 1
            if kind == "status":
                self._inbox[device] = (self.clock(), obj)
            elif obj.get("event") == "refused" and obj.get("rollout"):
                self._refusals.append((device, obj))

    def _drain(self) -> tuple[dict[str, tuple[float, dict[str, Any]]], list[Any]]:
        with self._lock:
            inbox, self._inbox = self._inbox, {}
            refusals, self._refusals = self._refusals, []
        if inbox:
            self.store.record_statuses(inbox)
            for d, (seen, st) in inbox.items():
                self.latest[d] = st
                self.latest_seen[d] = seen
        return inbox, refusals

    # -- making a rollout -------------------------------------------------------------------
    def create(
        self,
        bundle: Path,
        *,
        group: str,
        members: Sequence[str],
        policy: Policy,
        signer_name: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        group_offer: bool | None = None,
        rollout_id: str | None = None,
    ) -> RolloutRecord:
        """Verify the bundle against the root, plan the waves and store the rollout. With
        one wave (``--waves 100%``) the offer goes to the group topic unless told not to."""
        if not members:
            raise RolloutError(f"group {group!r} has no devices")
        if self.anchor is None:
            raise RuntimeError("the controller needs the trust anchor to describe a bundle")
        offer = describe_bundle(Path(bundle).absolute(), chunk_bytes, self.anchor)
        outsiders = sorted(set(members) - offer.recipients)
        if outsiders:
            named = ", ".join(outsiders[:10]) + (" ..." if len(outsiders) > 10 else "")
            raise RolloutError(
                f"{len(outsiders)} of group {group!r} cannot decrypt {offer.model} "
                f"v{offer.version} (not among its recipients): {named}; pack it --to them, "
                "or deploy to a group of its recipients"
            )
        for r in self.store.rollouts(state="running"):
            if r.target == group and r.model == offer.model:
                raise RolloutError(
                    f"rollout {r.id} of {r.model} v{r.version} to {group} is still running: "
                    f"halt it first (edgeseal ota halt {r.id}) or resume it"
                )
        rid = rollout_id or f"{offer.model}-v{offer.version}-{uuid.uuid4().hex[:8]}"
        waves = plan_waves(rid, members, policy.waves)
        single = len(waves) == 1
        record = RolloutRecord(
            id=rid,
            created=self.clock(),
            model=offer.model,
            version=offer.version,
            bundle_id=offer.bundle_id,
            bundle_path=str(offer.path),
            target=group,
            signer=signer_name,
            policy=policy,
            chunk_bytes=chunk_bytes,
            group_offer=single if group_offer is None else (group_offer and single),
        )
        self.store.create_rollout(record, waves)
        self._claim(rid, force=True)
        self._bundles[offer.bundle_id] = offer
        return record

    def _claim(self, rollout_id: str, *, force: bool = False) -> bool:
        """Take or renew the lease to drive this rollout; False: another controller does."""
        return self.store.claim_rollout(
            rollout_id, self.driver_id, now=self.clock(), ttl=DRIVER_LEASE_SECONDS, force=force
        )

    def _offer(self, r: RolloutRecord) -> BundleOffer:
        offer = self._bundles.get(r.bundle_id)
        if offer is None:
            if self.anchor is None:
                raise RuntimeError("the controller needs the trust anchor to describe a bundle")
            offer = describe_bundle(Path(r.bundle_path), r.chunk_bytes, self.anchor)
            if offer.bundle_id != r.bundle_id:
                raise RolloutError(f"{r.bundle_path} is no longer the bundle of rollout {r.id}")
            self._bundles[r.bundle_id] = offer
        self.server.add(offer)
        return offer

    def _seq(self) -> int:
        return self.store.next_seq(self.signing.signer.key_id, floor=int(self.clock() * 1000))

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> Any:
        self.messages_out += 1
        return self.conn.publish(topic, payload, retain=retain)

    # -- offers and orders ------------------------------------------------------------------
    def _send_offers(self, r: RolloutRecord, devices: Sequence[str]) -> None:
        """Queue signed offers; :meth:`_settle` records them once the broker has them.
        Nothing is queued while the broker is unreachable (the next step offers)."""
        if not devices or not self.conn.connected.is_set():
            return
        offer = self._offer(r)
        now = self.clock()
        s = self.signing
        unacked = self._unacked.setdefault(r.id, [])
        if r.group_offer:
            wire = sign_offer(
                s.signer, s.certificate, offer, seq=self._seq(), to=("group", r.target),
                now=_now_utc(now), rollout=r.id, revocations=s.revocations,
                rotations=s.rotations,
            )  # fmt: skip
            info = self._publish(self.topics.group(r.target), wire, retain=True)
            unacked.append((tuple(devices), now, info))
        else:
            for d in devices:
                wire = sign_offer(
                    s.signer, s.certificate, offer, seq=self._seq(), to=("device", d),
                    now=_now_utc(now), rollout=r.id, revocations=s.revocations,
                    rotations=s.rotations,
                )  # fmt: skip
                info = self._publish(self.topics.device(d, "control"), wire, retain=True)
                unacked.append(((d,), now, info))

    def _settle(self, rollout_id: str) -> None:
        """Mark offered the devices whose offers the broker has acknowledged (paho sends
        unacknowledged ones again after a reconnect, so a broker restart only delays)."""
        pending = self._unacked.get(rollout_id)
        if not pending:
            return
        acked: dict[float, list[str]] = {}
        left = []
        now = self.clock()
        for devices, at, info in pending:
            try:
                published = info.is_published()
            except (RuntimeError, ValueError):
                # Published while the connection fell (paho may still deliver it, but this
                # info never says so): offer again; a device takes a repeat as a duplicate.
                continue
            if published:
                acked.setdefault(at, []).extend(devices)
            elif now - at < UNACKED_RESEND_SECONDS:
                left.append((devices, at, info))
        self._unacked[rollout_id] = left
        for at, ds in acked.items():
            self.store.mark_offered(rollout_id, ds, at)

    def _in_flight(self, rollout_id: str) -> set[str]:
        return {d for devices, _, _ in self._unacked.get(rollout_id, ()) for d in devices}

    def order(self, r: RolloutRecord, action: str, devices: Sequence[str], reason: str = "") -> int:
        """Send a signed order (fall-back, finalize, quarantine) about this rollout's
        version to each device. Returns how many were sent."""
        s = self.signing
        for d in devices:
            wire = make_message(
                s.signer, s.certificate, action=action, seq=self._seq(), to=("device", d),
                model=r.model, version=r.version, bundle_id=r.bundle_id,
                now=_now_utc(self.clock()), revocations=s.revocations,
                rotations=s.rotations, rollout=r.id,
                reason=reason,
            )  # fmt: skip
            self._publish(self.topics.device(d, "control"), wire, retain=False)
        return len(devices)

    def _clear_offers(self, r: RolloutRecord, devices: Sequence[str]) -> None:
        """Remove retained offers (an empty retained message), so nobody new starts."""
        if r.group_offer:
            self._publish(self.topics.group(r.target), b"", retain=True)
            return
        for d in devices:
            self._publish(self.topics.device(d, "control"), b"", retain=True)

    # -- the loop ---------------------------------------------------------------------------
    def _update_phases(self, r: RolloutRecord, refusals: Sequence[Any]) -> None:
        rows = self.store.phases(r.id)
        updates: dict[str, tuple[str, str, float | None]] = {}
        latest: Mapping[str, Any] = self.latest
        seen: Mapping[str, float] = self.latest_seen
        if self.share:
            # Our subscription got only our share of the statuses; every controller
            # writes what it got to the store, so the store has the whole picture.
            stored = self.store.statuses_seen([d for d, row in rows.items() if row.offered_at])
            latest = {d: st for d, (_, st) in stored.items()}
            seen = {d: at for d, (at, _) in stored.items()}
        for d, row in rows.items():
            if row.offered_at is None:
                continue
            st = latest.get(d)
            model = st.get("models", {}).get(r.model) if isinstance(st, dict) else None
            said = device_phase(model, rollout=r.id, version=r.version)
            if said is None:
                continue
            phase, reason = said
            if phase in FAILED and seen.get(d, 0.0) < row.offered_at:
                # A failure said before this offer was out (a wave opened again by
                # ``ota resume``): the device tries the new offer; its next status counts.
                continue
            ood = None
            if phase == "committed" and isinstance(model, dict):
                raw = model.get("ood_rate")
                ood = float(raw) if isinstance(raw, (int, float)) else None
            if (phase, reason, ood) != (row.phase, row.reason, row.ood_rate):
                updates[d] = (phase, reason, ood)
        updates.update(self._refused(r, rows, refusals))
        self.store.set_phases(r.id, updates, self.clock())

    @staticmethod
    def _refused(
        r: RolloutRecord, rows: Mapping[str, Any], refusals: Sequence[Any]
    ) -> dict[str, tuple[str, str, float | None]]:
        """Devices of this rollout, still in progress, that refused one of its messages."""
        out: dict[str, tuple[str, str, float | None]] = {}
        for d, ev in refusals:
            known = rows.get(d)
            if ev.get("rollout") == r.id and known is not None and known.phase in IN_PROGRESS:
                out[d] = ("refused", str(ev.get("reason", "")), None)
        return out

    def step(self, rollout_id: str) -> RolloutRecord:
        """Take in what devices said, then open, judge and close waves as the rules say."""
        _, refusals = self._drain()
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        if r.state != "running":
            return r
        self._offer(r)  # serve its chunks (again, after a restart)
        self._settle(r.id)
        if not self._claim(r.id):
            # Another controller drives it: what we took in is in the store already, but
            # refusals are events, not statuses, so they are recorded here.
            if refusals:
                refused = self._refused(r, self.store.phases(r.id), refusals)
                self.store.set_phases(r.id, refused, self.clock())
            return r
        waves = self.store.waves(r.id)
        wave = waves[r.wave]
        rows = self.store.phases(r.id)
        if wave.opened_at is None or any(rows[d].offered_at is None for d in wave.devices):
            self.store.open_wave(r.id, r.wave, self.clock())
            self._send_offers(r, self._not_offered(r, wave.devices))
            return self.store.rollout(r.id) or r
        self._update_phases(r, refusals)
        rows = self.store.phases(r.id)
        phases = {d: rows[d].phase or "offered" for d in wave.devices}
        oods = {d: rows[d].ood_rate for d in wave.devices if rows[d].ood_rate is not None}
        verdict = judge_wave(
            phases,
            r.policy,
            opened_at=wave.opened_at,
            now=self.clock(),
            last=r.wave == len(waves) - 1,
            ood_rates={d: float(v) for d, v in oods.items() if v is not None},
        )
        return self._apply(r, verdict, phases)

    def _not_offered(self, r: RolloutRecord, devices: Sequence[str]) -> list[str]:
        """Devices with no acknowledged offer, less those whose offer is on its way."""
        rows = self.store.phases(r.id)
        flying = self._in_flight(r.id)
        return [d for d in devices if rows[d].offered_at is None and d not in flying]

    def _apply(
        self, r: RolloutRecord, verdict: Verdict, phases: Mapping[str, str]
    ) -> RolloutRecord:
        now = self.clock()
        if verdict.action == "wait":
            return r
        if not self.store.close_wave(r.id, r.wave, f"{verdict.action}: {verdict.reason}", now):
            return self.store.rollout(r.id) or r  # another controller closed it first
        if verdict.timed_out:
            late = ("timed-out", "no answer within the wave timeout", None)
            self.store.set_phases(r.id, dict.fromkeys(verdict.timed_out, late), now)
        log.info("rollout %s wave %d: %s (%s)", r.id, r.wave + 1, verdict.action, verdict.reason)
        if verdict.action == "pass":
            self.store.open_wave(r.id, r.wave + 1, now)
            r = replace(r, wave=r.wave + 1)
            self._send_offers(r, self.store.waves(r.id)[r.wave].devices)
        elif verdict.action == "done":
            self.store.update_rollout(r.id, now=now, state="done", reason=verdict.reason)
        else:
            self.halt(r.id, verdict.reason, phases=phases)
        return self.store.rollout(r.id) or r

    def halt(
        self, rollout_id: str, reason: str, *, phases: Mapping[str, str] | None = None
    ) -> RolloutRecord:
        """Stop the rollout: no new offers; clear the retained offers of devices that have
        not started; with ``auto_fallback``, order the halted wave's devices back: those
        that committed the new version to their fallback slot, and those still
        downloading, testing or on trial out of the update (else they would commit it
        later, after the halt)."""
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        now = self.clock()
        self.store.update_rollout(r.id, now=now, state="halted", reason=reason)
        self._unacked.pop(r.id, None)
        rows = self.store.phases(r.id)
        untouched = [d for d, row in rows.items() if row.phase in ("", "offered")]
        self._clear_offers(r, untouched)
        if r.policy.auto_fallback:
            wave = self.store.waves(r.id)[r.wave]
            current = phases or {d: rows[d].phase for d in wave.devices}
            # Offered devices may have started without saying so yet: they are ordered
            # too (a device with nothing in progress ignores the order as stale) but keep
            # their phase, so a resume offers again to those that never started.
            reached = {d for d in wave.devices if current.get(d) in {"committed", *IN_PROGRESS}}
            back = sorted(d for d in reached if current.get(d) != "offered")
            self.order(r, "fall-back", sorted(reached), reason=f"rollout {r.id} halted: {reason}")
            if back:
                ordered = ("fallen-back", "ordered back: rollout halted", None)
                self.store.set_phases(r.id, dict.fromkeys(back, ordered), now)
        return self.store.rollout(r.id) or r

    def resume(self, rollout_id: str, policy: Policy | None = None) -> RolloutRecord:
        """Open a halted rollout again (its current wave's clock restarts; devices that
        failed stay failed, so change the thresholds with ``policy`` if they are why it
        halted). A running rollout is just picked up."""
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        if r.state == "done":
            raise RolloutError(f"rollout {rollout_id} is done")
        now = self.clock()
        if r.state == "halted":
            # The wave's clock restarts; offers cleared at the halt go out again to the
            # devices that never started (and to those that timed out).
            self.store.reopen_wave(r.id, r.wave, now)
        self.store.update_rollout(r.id, now=now, state="running", reason="", policy=policy)
        self._claim(r.id, force=True)  # whoever resumes it drives it
        return self.store.rollout(r.id) or r

    def run(
        self,
        rollout_id: str,
        *,
        poll: float = 0.5,
        on_step: Callable[[RolloutRecord], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RolloutRecord:
        """Step until the rollout is done or halted (or ``stop`` is set)."""
        while True:
            r = self.step(rollout_id)
            if on_step is not None:
                on_step(r)
            if r.state != "running" or (stop is not None and stop.is_set()):
                return r
            time.sleep(poll)


def rollout_report(store: RolloutStore, rollout_id: str) -> dict[str, Any]:
    """What ``ota status`` shows: the rollout, and per wave the count of devices in each
    phase, with the devices that failed and why."""
    r = store.rollout(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r}")
    rows = store.phases(r.id)
    waves = []
    for w in store.waves(r.id):
        phases = {d: rows[d].phase or ("offered" if w.opened_at else "waiting") for d in w.devices}
        t = tally({d: p for d, p in phases.items() if p != "waiting"})
        counts = {p: n for p, n in t.by_phase.items() if n}
        waves.append(
            {
                "wave": w.index + 1,
                "devices": len(w.devices),
                "opened_at": w.opened_at,
                "closed_at": w.closed_at,
                "verdict": w.verdict,
                "phases": counts,
                "failures": {
                    d: rows[d].reason or rows[d].phase for d in w.devices if rows[d].phase in FAILED
                },
                "ood_rate": t.ood_rate,
            }
        )
    total = tally({d: row.phase for d, row in rows.items() if row.phase})
    return {
        "rollout": r.id,
        "model": r.model,
        "version": r.version,
        "bundle_id": r.bundle_id,
        "group": r.target,
        "state": r.state,
        "reason": r.reason,
        "wave": r.wave + 1,
        "created": r.created,
        "updated": r.updated,
        "policy": r.policy.to_obj(),
        "devices": len(rows),
        "committed": total.committed,
        "failed": total.failed,
        "in_progress": total.in_progress,
        "waves": waves,
    }
