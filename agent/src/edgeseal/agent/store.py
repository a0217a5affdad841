"""The model store: two slots per model, a journal, and the version floor.

    <root>/<model>/slot-a.esb, slot-b.esb   sealed bundles (ciphertext only)
    <root>/<model>/journal.json             which slot is active, fallback, staged

Only the agent writes it (``agent install`` and the update channels go through it). Every
change is a new journal written atomically (temp file, fsync, rename, fsync dir), so a
power cut leaves the old journal or the new one, never a mix; a staged bundle is written
the same way beside the active one, which it never touches. The journal that records a
staged copy is written after the copy is whole and before it replaces the slot's old
file, so no journal ever names a slot for content it no longer holds (the fallback that
staging gives up), and a full disk, for the copy or for that journal, leaves the store
as it was.

Floors: committing raises the model's version floor to the lowest version still kept
(the fallback's), so the device can fall back one step but never further. Staging
refuses, before anything is written, what would move the model backwards or freeze it:
a version below the one serving, the serving version with other content, and a version
more than :data:`MAX_VERSION_STEP` above the floor (a fast-forward that would lock the
model's floor out of reach).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeseal.core.encoding import canonical_json, format_time, utcnow
from edgeseal.core.errors import EdgesealError, RollbackError
from edgeseal.core.files import atomic_write, atomic_writer
from edgeseal.core.manifest import validate_name
from edgeseal.hardware.floors import MAX_STEP, VersionFloors

__all__ = ["AlreadyInstalledError", "Journal", "ModelStore", "SlotInfo", "StoreError"]

SLOTS = ("a", "b")
#: The furthest a new version may lie above the floor: the TPM counters' own cap, so a
#: fast-forward is refused at staging, on every kind of floor, not half-way through a commit.
MAX_VERSION_STEP = MAX_STEP


class StoreError(EdgesealError):
    """The model store cannot do what was asked (no such model, nothing staged...)."""


class AlreadyInstalledError(StoreError):
    """The bundle is the one already serving: nothing to do (a replay or a repeated
    delivery), and the fallback slot is kept."""


@dataclass(frozen=True)
class SlotInfo:
    version: int
    bundle_id: str
    installed: str
    state: str = "good"  # good | failed: <why>

    def to_obj(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "bundle_id": self.bundle_id,
            "installed": self.installed,
            "state": self.state,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> SlotInfo:
        return cls(int(obj["version"]), str(obj["bundle_id"]), str(obj["installed"]), obj["state"])


@dataclass
class Journal:
    model: str
    active: str | None = None
    fallback: str | None = None
    staged: str | None = None
    slots: dict[str, SlotInfo] = field(default_factory=dict)
    #: The update channel's own state for this model (opaque to the store), so a channel
    #: resumes at the right step after a crash.
    channel: dict[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "active": self.active,
            "fallback": self.fallback,
            "staged": self.staged,
            "slots": {k: v.to_obj() for k, v in sorted(self.slots.items())},
            "channel": self.channel,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Journal:
        return cls(
            model=obj["model"],
            active=obj.get("active"),
            fallback=obj.get("fallback"),
            staged=obj.get("staged"),
            slots={k: SlotInfo.from_obj(v) for k, v in obj.get("slots", {}).items()},
            channel=dict(obj.get("channel", {})),
        )

    def free_slot(self) -> str:
        """The slot a new bundle goes to: never the active one."""
        return next(s for s in SLOTS if s != self.active)


class ModelStore:
    def __init__(self, root: Path, floors: VersionFloors) -> None:
        self.root = root
        self.floors = floors
        self._lock = threading.RLock()
        root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across threads and processes (the daemon and the CLI)."""
        with self._lock, (self.root / ".lock").open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _dir(self, model: str) -> Path:
        return self.root / validate_name(model, "model name")

    def slot_path(self, model: str, slot: str) -> Path:
        return self._dir(model) / f"slot-{slot}.esb"

    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/journal.json"))

    def journal(self, model: str) -> Journal:
        path = self._dir(model) / "journal.json"
        try:
            return Journal.from_obj(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return Journal(model)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path} is damaged: {e}") from e

    def _write(self, j: Journal) -> None:
        atomic_write(self._dir(j.model) / "journal.json", canonical_json(j.to_obj()), mode=0o600)

    def active_path(self, model: str) -> Path | None:
        j = self.journal(model)
        return self.slot_path(model, j.active) if j.active else None

    def stage(self, model: str, bundle: Path, *, version: int, bundle_id: str) -> Path:
        """Copy ``bundle`` into the free slot (atomically) and record it as staged.

        Order: the copy to a temporary file, whole and synced; then the journal; then the
        rename over the slot's file. A failure before the rename (a full disk, for the
        copy or for the journal) removes the copy and raises :class:`StoreError`: the
        store is as it was. A crash between journal and rename leaves the journal naming
        the slot as staged (never as the fallback whose file is still there); a staged
        slot is only tested after the update channel has recorded the staging, and is
        otherwise staged again."""
        with self._locked():
            j = self.journal(model)
            self._refuse_backwards(j, version, bundle_id)
            slot = j.free_slot()
            dest = self.slot_path(model, slot)
            try:
                with bundle.open("rb") as src, atomic_writer(dest, mode=0o600) as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
                    if j.fallback == slot:
                        j.fallback = None
                    j.slots[slot] = SlotInfo(version, bundle_id, format_time(utcnow()), "staged")
                    j.staged = slot
                    self._write(j)
            except OSError as e:
                full = e.errno in (errno.ENOSPC, errno.EDQUOT)
                why = "no space left on the device" if full else (e.strerror or str(e))
                raise StoreError(f"cannot stage {model} v{version} in slot {slot}: {why}") from e
            return dest

    def _refuse_backwards(self, j: Journal, version: int, bundle_id: str) -> None:
        floor = self.floors.get(j.model)
        if version < floor:
            raise RollbackError(f"{j.model} v{version} is below this device's floor {floor}")
        if version > floor + MAX_VERSION_STEP:
            raise RollbackError(
                f"{j.model} v{version} is more than {MAX_VERSION_STEP} versions above the "
                f"floor {floor}: refused as a fast-forward"
            )
        active = j.slots.get(j.active) if j.active else None
        if active is None:
            return
        if version < active.version:
            raise RollbackError(
                f"{j.model} v{version} is older than the serving v{active.version} "
                "(a fall-back goes through the fallback slot, not an install)"
            )
        if bundle_id == active.bundle_id:
            raise AlreadyInstalledError(
                f"{j.model} v{version} (bundle {bundle_id[:8]}) is already serving"
            )
        if version == active.version:
            raise RollbackError(
                f"{j.model} v{version} is already serving with other content (bundle "
                f"{active.bundle_id[:8]}); a new release needs a higher version"
            )

    def discard_staged(self, model: str, reason: str) -> None:
        with self._locked():
            j = self.journal(model)
            if j.staged is None:
                return
            j.slots[j.staged] = replace(j.slots[j.staged], state=f"failed: {reason}")
            j.staged = None
            self._write(j)

    def commit(self, model: str) -> Journal:
        """The staged slot becomes active, the active one its fallback; the floor rises to
        the lowest version kept."""
        with self._locked():
            j = self.journal(model)
            if j.staged is None:
                raise StoreError(f"nothing is staged for {model}")
            new = j.staged
            j.fallback = j.active if j.active and j.slots[j.active].state == "good" else None
            j.active = new
            j.staged = None
            j.slots[new] = replace(j.slots[new], state="good")
            kept = [j.slots[s].version for s in (j.active, j.fallback) if s]
            self._write(j)
            self.floors.raise_to(model, min(kept))
            return j

    def fall_back(self, model: str, reason: str) -> Journal:
        """Serve the fallback slot; the failed one is marked and is no fallback."""
        with self._locked():
            j = self.journal(model)
            if j.active is None or j.fallback is None:
                raise StoreError(f"{model} has no fallback slot to return to")
            bad = j.active
            j.slots[bad] = replace(j.slots[bad], state=f"failed: {reason}")
            j.active, j.fallback = j.fallback, None
            self._write(j)
            return j

    def finalize(self, model: str) -> Journal:
        """The active version is final: the fallback slot is released and the floor rises
        to the active version (after probation, or a signed finalize order)."""
        with self._locked():
            j = self.journal(model)
            if j.active is None:
                raise StoreError(f"{model} has nothing active to finalize")
            j.fallback = None
            self._write(j)
            self.floors.raise_to(model, j.slots[j.active].version)
            return j

    def set_channel_state(self, model: str, state: dict[str, Any]) -> None:
        with self._locked():
            j = self.journal(model)
            j.channel = dict(state)
            self._write(j)

    def status(self) -> dict[str, Any]:
        out = {}
        for m in self.models():
            j = self.journal(m)
            out[m] = {**j.to_obj(), "floor": self.floors.get(m)}
        return out
