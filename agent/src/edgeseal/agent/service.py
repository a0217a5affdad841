"""The agent: the models it serves, from its store, through its device's keys.

:class:`Agent` is the one place that installs, opens, serves, quarantines and falls back.
The local API, the CLI and the update channels call it; none of them touch the store or
the key store themselves.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgeseal.agent.device import DeviceHome, machine_architecture
from edgeseal.agent.guard import InferResult, ServingModel
from edgeseal.agent.memory import make_process_undumpable
from edgeseal.agent.opener import open_bundle
from edgeseal.agent.preflight import InstalledSlot
from edgeseal.agent.store import ModelStore, StoreError
from edgeseal.agent.version import __version__
from edgeseal.core.config import Config
from edgeseal.core.errors import EdgesealError, NotARecipientError, RollbackError
from edgeseal.core.keystore import KeyStore
from edgeseal.core.reader import BundleFile, VerifiedBundle, VerifyPolicy
from edgeseal.hardware.floors import FileFloors, TpmFloors, VersionFloors

__all__ = ["Agent", "NoSuchModelError", "ShadowStats", "floors_for"]

log = logging.getLogger(__name__)
RUNTIMES = ("onnxruntime", "litert")


class NoSuchModelError(EdgesealError):
    """No model of that name is installed (or none is serving)."""


def floors_for(home: DeviceHome) -> VersionFloors:
    """TPM NV counters when the device key is in a TPM, else a file in the home."""
    info = home.info()
    store = info.get("store", {})
    if store.get("kind") == "tpm":
        return TpmFloors(store["tcti"], owner_auth=os.environ.get("EDGESEAL_TPM_OWNER_AUTH"))
    return FileFloors(home.path / "floors.json")


Listener = Callable[[str, str, Mapping[str, Any]], None]


@dataclass
class ShadowStats:
    """What a shadowed candidate did with live traffic (see :meth:`Agent.start_shadow`)."""

    #: Requests the serving model answered while the shadow was set.
    seen: int = 0
    #: Of those, the ones the candidate ran on (every ``every``-th).
    requests: int = 0
    #: Candidate calls that raised (any exception: schema, non-finite outputs, a crash).
    errors: int = 0
    #: Rows the candidate scored, and those it found out of distribution.
    rows: int = 0
    ood_rows: int = 0
    #: Rows where both answered a classifier-like output (last dim > 1), and where their
    #: top-1 differs.
    compared_rows: int = 0
    disagreements: int = 0

    def to_obj(self) -> dict[str, Any]:
        def rate(n: int, d: int) -> float:
            return round(n / d, 4) if d else 0.0

        return {
            **vars(self),
            "error_rate": rate(self.errors, self.requests),
            "ood_rate": rate(self.ood_rows, self.rows),
            "disagreement_rate": rate(self.disagreements, self.compared_rows),
        }


@dataclass
class _Shadow:
    candidate: ServingModel
    every: int
    stats: ShadowStats
    busy: int = 0


def _disagreements(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[int, int]:
    """(rows compared, rows whose top-1 differs) over the outputs both have with the same
    shape and a last dimension above 1."""
    compared = differ = 0
    for name, x in a.items():
        y = b.get(name)
        if (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == y.shape
            and x.ndim >= 2  # rows by classes
            and x.shape[-1] > 1
        ):
            top_x, top_y = np.argmax(x, axis=-1), np.argmax(y, axis=-1)
            compared += int(top_x.size)
            differ += int(np.count_nonzero(top_x != top_y))
    return compared, differ


class Agent:
    def __init__(
        self,
        home: DeviceHome,
        config: Config,
        *,
        key_store: KeyStore | None = None,
        floors: VersionFloors | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.key_store = key_store or home.key_store(passphrase=passphrase)
        root = Path(config.agent.store) if config.agent.store else home.path / "models"
        self.store = ModelStore(root, floors or floors_for(home))
        self.serving: dict[str, ServingModel] = {}
        self.undumpable = make_process_undumpable()
        self._lock = threading.RLock()
        #: Called as listener(event, model, details) on install, quarantine, fall-back.
        self.listeners: list[Listener] = []
        self.events: list[dict[str, Any]] = []
        #: Candidates run beside the serving model on live traffic (an OTA trial).
        self._shadows: dict[str, _Shadow] = {}
        self._shadow_cv = threading.Condition()
        #: What :meth:`stage` verified, per model, carried to :meth:`check_staged`.
        self._staged_verified: dict[str, VerifiedBundle] = {}

    # -- policy ------------------------------------------------------------------------

    def policy(self, model: str | None, *, installing: bool) -> VerifyPolicy:
        state = self.home.trust_state()
        return VerifyPolicy(
            anchor=state.anchor,
            trust=state,
            now=self.home.trusted_now() if installing else None,
            floor=self.store.floors.get(model) if model and installing else None,
            architecture=machine_architecture(),
            agent_version=__version__,
            runtimes=RUNTIMES,
            clock_skew=timedelta(seconds=self.config.device.clock_skew),
            limits=self.config.limits,
        )

    def _emit(self, event: str, model: str, **details: Any) -> None:
        self.events.append({"event": event, "model": model, **details})
        del self.events[:-100]
        for listener in list(self.listeners):
            try:
                listener(event, model, details)
            except Exception:  # a channel's bug must not stop serving
                log.exception("listener failed on %s for %s", event, model)

    # -- opening -----------------------------------------------------------------------

    def _open(
        self,
        path: Path,
        *,
        installing: bool,
        model: str | None,
        verified: VerifiedBundle | None = None,
    ) -> ServingModel:
        opened = open_bundle(
            path,
            key_store=self.key_store,
            policy=self.policy(model, installing=installing),
            config=self.config,
            preflight=None if installing else InstalledSlot(),
            # Sealed TensorRT engine caches (runtime.trt_engine_cache) live by the slots.
            engine_cache_dir=self.store.root / model / "trt-cache" if model else None,
            verified=verified,
        )
        return ServingModel.start(opened, self.config.agent, self._quarantined)

    def check(self, bundle: Path, model: str) -> ServingModel:
        """Open a bundle as an install would (floor, expiry, golden vectors), not serving."""
        return self._open(bundle, installing=True, model=model)

    def verify(self, bundle: Path) -> VerifiedBundle:
        """Verify ``bundle`` for installing (V1-V11: trust, signature, expiry, target,
        floor) and that it is wrapped for this device (V12's lookup, no key needed). The
        result is what :meth:`stage` takes, so the file is verified once."""
        with BundleFile.open(bundle) as bf:
            vb = bf.verify(self.policy(None, installing=True))
        if vb.manifest.recipient_for(self.key_store.key_id) is None:
            raise NotARecipientError(
                f"bundle {vb.manifest.model_name} v{vb.manifest.version} is not wrapped "
                "for this device's key"
            )
        name, version = vb.manifest.model_name, vb.manifest.version
        floor = self.store.floors.get(name)
        if version < floor:  # V10 (the policy above names no model, so no floor)
            raise RollbackError(
                f"{name} v{version} is below this device's version floor {floor} "
                "(an older release is not accepted back)"
            )
        return vb

    def stage(self, bundle: Path, *, verified: VerifiedBundle | None = None) -> tuple[str, int]:
        """Copy ``bundle`` into the free slot; the serving slot is untouched. Returns
        (model, version). ``verified`` is what :meth:`verify` returned for ``bundle``
        (verified here when not given). The bundle is verified once: the copy is checked
        against that result by digest, and the result is carried to
        :meth:`check_staged`."""
        vb = verified if verified is not None else self.verify(bundle)
        name, version = vb.manifest.model_name, vb.manifest.version

        def check_copy(copy: Path) -> None:
            # The bytes copied are the bytes verified: the prelude by its digest (V1, V6),
            # every sealed chunk by the manifest's digests (V13's first half, no key
            # needed), before the copy displaces anything: a bundle changed after its
            # verification, or a corrupted or spliced payload, must not displace the
            # fallback slot it would be staged into.
            with BundleFile.open(copy) as bf:
                bf.check_copy_of(vb)
                bf.check_chunk_digests(vb)

        self.store.stage(
            name, bundle, version=version, bundle_id=vb.manifest.bundle_id, check_copy=check_copy
        )
        self._staged_verified[name] = vb
        return name, version

    def check_staged(self, name: str) -> ServingModel:
        """Open the staged copy as an install would and run its golden vectors. The
        caller commits it (:meth:`commit_staged`) or discards it. A copy staged by this
        agent is checked against its carried verification by digest; one staged before
        a restart is verified in full."""
        journal = self.store.journal(name)
        if journal.staged is None:
            raise StoreError(f"nothing is staged for {name}")
        vb = self._staged_verified.pop(name, None)
        slot = journal.slots.get(journal.staged)
        if vb is not None and (slot is None or slot.bundle_id != vb.manifest.bundle_id):
            vb = None  # staged by someone else since: not what was verified here
        try:
            return self._open(
                self.store.slot_path(name, journal.staged),
                installing=True,
                model=name,
                verified=vb,
            )
        except BaseException as e:
            self.store.discard_staged(name, f"{type(e).__name__}: {e}")
            raise

    def discard_staged(self, name: str, reason: str) -> None:
        self._staged_verified.pop(name, None)
        self.store.discard_staged(name, reason)

    def commit_staged(self, name: str, checked: ServingModel) -> dict[str, Any]:
        """Make the checked staged slot active and serve it; the old one is the fallback."""
        with self._lock:
            # The verified trust statements first: merging them cannot fail on anything
            # the bundle carries (only on I/O), and a failure here leaves the store as it
            # was instead of a committed slot with an exit status of 1.
            self.home.remember_trust(checked.opened.bundle)
            self.home.advance_trusted_time(
                checked.opened.manifest.created,
                clock_skew=timedelta(seconds=self.config.device.clock_skew),
            )
            journal = self.store.commit(name)
            old = self.serving.get(name)
            self.serving[name] = checked
        if old is not None:
            old.retire()
        self._emit("installed", name, version=checked.identity["version"])
        return {**checked.identity, "slot": journal.active, "fallback": journal.fallback}

    def install(self, bundle: Path) -> dict[str, Any]:
        """Stage, check and commit in one go. Any failure leaves the serving model as it
        was."""
        with self._lock:
            name, _ = self.stage(bundle)
            checked = self.check_staged(name)
            return self.commit_staged(name, checked)

    def load_all(self) -> dict[str, str]:
        """Open every installed model's active slot; a slot that fails falls back."""
        results = {}
        for name in self.store.models():
            try:
                results[name] = self._load(name)
            except EdgesealError as e:
                log.error("cannot serve %s: %s", name, e.diagnostics())
                results[name] = f"not serving: {e}"
        return results

    def _load(self, name: str) -> str:
        path = self.store.active_path(name)
        if path is None:
            raise NoSuchModelError(f"{name} has no active slot")
        try:
            sm = self._open(path, installing=False, model=name)
        except EdgesealError as e:
            journal = self.store.journal(name)
            if journal.fallback is None:
                raise
            log.error("%s active slot fails (%s); falling back", name, e)
            self.store.fall_back(name, f"{type(e).__name__}: {e}")
            self._emit("fell_back", name, reason=str(e))
            fallback_path = self.store.active_path(name)
            assert fallback_path is not None
            sm = self._open(fallback_path, installing=False, model=name)
        with self._lock:
            old = self.serving.pop(name, None)
            self.serving[name] = sm
        if old is not None:
            old.retire()
        return f"serving v{sm.identity['version']}"

    def reload(self) -> dict[str, str]:
        """Re-open everything from the store (SIGHUP). Each model keeps answering until its
        replacement is open; a model that no longer opens, or is gone, stops serving."""
        results = self.load_all()
        installed = set(self.store.models())
        with self._lock:
            stale = [
                self.serving.pop(n)
                for n in list(self.serving)
                if n not in installed or results.get(n, "").startswith("not serving")
            ]
        for sm in stale:
            sm.retire()
        return results

    # -- serving -----------------------------------------------------------------------

    def model(self, name: str) -> ServingModel:
        sm = self.serving.get(name)
        if sm is None:
            raise NoSuchModelError(f"no model named {name!r} is serving")
        return sm

    def infer(self, name: str, feed: Mapping[str, Any]) -> InferResult:
        sm = self.model(name)
        while not sm.acquire():  # replaced since the lookup: the replacement serves
            sm = self.model(name)
        try:
            result = sm.infer(feed)
            if sm.claim_due_checks():
                self._check_in_background(sm)
        finally:
            sm.release()
        if self._shadows:
            self._run_shadow(name, feed, result)
        return result

    def _check_in_background(self, sm: ServingModel) -> None:
        """Run ``sm``'s due integrity checks (golden vectors, digests of the weights) on a
        thread of their own, started now: on schedule, but not on the caller's time. The
        model stays open until they are done; a failure quarantines it as before."""
        if not sm.acquire():  # retired meanwhile: its replacement keeps its own schedule
            return

        def work() -> None:
            try:
                sm.run_due_checks()
            finally:
                sm.release()

        name = f"edgeseal-check-{sm.identity['model']}"
        threading.Thread(target=work, name=name, daemon=True).start()

    # -- shadow inference (OTA trials) -----------------------------------------------------

    def start_shadow(self, name: str, candidate: ServingModel, *, every: int = 1) -> None:
        """Run ``candidate`` beside the serving model ``name`` on live traffic until
        :meth:`stop_shadow`. The caller always gets the serving model's answer; the
        candidate runs afterwards on the same thread and the same feed (every ``every``-th
        request), so a trial adds the candidate's cost to the requests it samples. Its
        failures are counted, never raised. The caller keeps owning ``candidate``."""
        if every < 1:
            raise ValueError("every must be at least 1")
        with self._shadow_cv:
            self._shadows[name] = _Shadow(candidate, every, ShadowStats())

    def shadow_stats(self, name: str) -> dict[str, Any] | None:
        with self._shadow_cv:
            sh = self._shadows.get(name)
            return sh.stats.to_obj() if sh else None

    def stop_shadow(self, name: str) -> dict[str, Any]:
        """Stop shadowing ``name``; once this returns no request is still running the
        candidate (so it may be closed or committed). Returns the stats
        (:class:`ShadowStats` with rates); empty if no shadow was set."""
        with self._shadow_cv:
            sh = self._shadows.pop(name, None)
            if sh is None:
                return {}
            self._shadow_cv.wait_for(lambda: sh.busy == 0)
            return sh.stats.to_obj()

    def _run_shadow(self, name: str, feed: Mapping[str, Any], result: InferResult) -> None:
        with self._shadow_cv:
            sh = self._shadows.get(name)
            if sh is None:
                return
            st = sh.stats
            st.seen += 1
            if (st.seen - 1) % sh.every:
                return
            sh.busy += 1
        ok, rows, ood_rows, compared, differ = False, 0, 0, 0, 0
        try:
            shadow = sh.candidate.infer(feed)
            rows = int(next(iter(feed.values())).shape[0]) if feed else 0
            ood_rows = shadow.ood_rows
            compared, differ = _disagreements(result.outputs, shadow.outputs)
            ok = True
        except Exception as e:  # the candidate's trouble is a statistic, not the caller's
            log.debug("shadow %s v%s failed: %s", name, sh.candidate.identity["version"], e)
        finally:
            with self._shadow_cv:
                st.requests += 1
                if ok:
                    st.rows += rows
                    st.ood_rows += ood_rows
                    st.compared_rows += compared
                    st.disagreements += differ
                else:
                    st.errors += 1
                sh.busy -= 1
                self._shadow_cv.notify_all()

    def run_checks(self) -> None:
        """Run the scheduled integrity checks that are due (called by the daemon)."""
        for sm in list(self.serving.values()):
            if sm.quarantined or not sm.acquire():
                continue
            try:
                if sm.claim_due_checks():
                    sm.run_due_checks()
            finally:
                sm.release()

    def _quarantined(self, sm: ServingModel, reason: str) -> None:
        name = sm.identity["model"]
        log.error("quarantined %s v%s: %s", name, sm.identity["version"], reason)
        if self.serving.get(name) is not sm:  # replaced already: what serves is not at fault
            return
        self._emit("quarantined", name, version=sm.identity["version"], reason=reason)
        threading.Thread(target=self._fall_back_after, args=(name, reason), daemon=True).start()

    def _fall_back_after(self, name: str, reason: str) -> None:
        try:
            self.store.fall_back(name, reason)
        except StoreError as e:
            log.error("%s stays quarantined: %s", name, e)
            return
        try:
            self._load(name)
            self._emit("fell_back", name, reason=reason)
        except EdgesealError as e:
            log.error("%s: the fallback slot fails too: %s", name, e)

    def fall_back(self, name: str, reason: str) -> None:
        """An order (from an update channel or the operator) to serve the fallback slot."""
        self.store.fall_back(name, reason)
        self._load(name)
        self._emit("fell_back", name, reason=reason)

    def status(self) -> dict[str, Any]:
        return {
            "agent_version": __version__,
            "device": self.home.info().get("device_id"),
            "key_store": self.key_store.kind,
            "hardware_backed": self.key_store.hardware_backed,
            "floors": getattr(self.store.floors, "label", self.store.floors.kind),
            "undumpable": self.undumpable,
            "models": {n: sm.status() for n, sm in sorted(self.serving.items())},
            "store": self.store.status(),
        }

    def close(self) -> None:
        with self._lock:
            for sm in self.serving.values():
                sm.close()
            self.serving.clear()
