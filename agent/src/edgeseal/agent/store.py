"""The model store: two slots per model, a journal, and the version floor.

    <root>/<model>/slot-a.esb, slot-b.esb   sealed bundles (ciphertext only)
    <root>/<model>/journal.json             which slot is active, fallback, staged

Only the agent writes it (``agent install`` and the update channels go through it). Every
change is a new journal written atomically (temp file, fsync, rename, fsync dir), so a
power cut leaves the old journal or the new one, never a mix; a staged bundle is written
the same way beside the active one, which it never touches. The journal that records a
staged copy is written after the copy is whole and before it replaces the slot's old
file, so no journal ever names a slot for content it no longer holds (the fallback that
staging gives up). A failure before that replacement (a full disk, for the copy or for
that journal; a failed rename) leaves the store as it was: the previous journal is put
back if the new one was written. A write cut short by a kill or a power cut leaves its
temporary file (``.slot-a.esb.<pid>.<hex>.tmp``, a whole bundle's worth); the store
removes those of its own files when it is opened and before each staging, under its lock.

Floors: committing raises the model's version floor to the lowest version still kept
(the fallback's), so the device can fall back one step but never further. Staging
refuses, before anything is written, what would move the model backwards or freeze it:
a version below the one serving, the serving version with other content, and a version
more than :data:`MAX_VERSION_STEP` above the floor (a fast-forward that would lock the
model's floor out of reach).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeseal.core.encoding import canonical_json, format_time, utcnow
from edgeseal.core.errors import EdgesealError, RollbackError
from edgeseal.core.files import (
    atomic_write,
    describe_os_error,
    fsync_dir,
    leftover_temps,
    synced_temp,
)
from edgeseal.core.manifest import validate_name
from edgeseal.hardware.floors import MAX_STEP, VersionFloors

__all__ = ["AlreadyInstalledError", "Journal", "ModelStore", "SlotInfo", "StoreError"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
JOURNAL = "journal.json"
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
        with self._locked():
            for d in sorted(root.iterdir()):
                if d.is_dir() and _is_model_name(d.name):
                    self._remove_leftovers(d)

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
        return sorted(p.parent.name for p in self.root.glob(f"*/{JOURNAL}"))

    def journal(self, model: str) -> Journal:
        return self._read(model)[0]

    def _read(self, model: str) -> tuple[Journal, bytes | None]:
        """The journal, and the bytes it was read from (None: there is no journal yet)."""
        path = self._dir(model) / JOURNAL
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return Journal(model), None
        try:
            return Journal.from_obj(json.loads(raw)), raw
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path} is damaged: {e}") from e

    def _write(self, j: Journal) -> None:
        atomic_write(self._dir(j.model) / JOURNAL, canonical_json(j.to_obj()), mode=0o600)

    def _put_back(self, model: str, previous: bytes | None) -> str | None:
        """Make the journal ``previous`` again (None: no journal) unless it still is. None
        when it is; otherwise why it could not be put back."""
        path = self._dir(model) / JOURNAL
        try:
            unchanged = path.read_bytes() == previous
        except FileNotFoundError:
            unchanged = previous is None
        except OSError:
            unchanged = False  # unreadable: write it again to be sure
        if unchanged:
            return None
        try:
            if previous is None:
                path.unlink(missing_ok=True)
                fsync_dir(path.parent)
            else:
                atomic_write(path, previous, mode=0o600)
        except OSError as e:
            return describe_os_error(e)
        return None

    def _remove_leftovers(self, model_dir: Path) -> None:
        """Delete the temporary files that writes of this model's slots and journal left
        when they were cut short. Only under the store's lock: every write here holds it,
        so no temporary file of these names belongs to a write in progress."""
        for name in (*(f"slot-{s}.esb" for s in SLOTS), JOURNAL):
            for tmp in leftover_temps(model_dir / name):
                try:
                    tmp.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("cannot remove the leftover %s: %s", tmp, describe_os_error(e))
                else:
                    log.info("removed %s, left by an interrupted write", tmp)

    def active_path(self, model: str) -> Path | None:
        j = self.journal(model)
        return self.slot_path(model, j.active) if j.active else None

    def stage(
        self,
        model: str,
        bundle: Path,
        *,
        version: int,
        bundle_id: str,
        check_copy: Callable[[Path], None] | None = None,
    ) -> Path:
        """Copy ``bundle`` into the free slot (atomically) and record it as staged.

        ``check_copy`` is called with the copy, whole and synced, before anything else
        changes: an error from it removes the copy and propagates, the store as it was.

        Order: the copy to a temporary file, whole and synced; then the journal; then the
        rename over the slot's file; then the directory's sync. A failure up to the
        rename (a full disk, for the copy or for the journal; a failed rename) removes the
        copy, puts the previous journal back if the new one was written, and raises
        :class:`StoreError`: the store is as it was (the error says so when the journal
        could not be put back). A failed sync after the rename raises :class:`StoreError`
        saying the bundle *is* staged: the slot's old content is gone, but a power cut
        before the next sync may still lose the new. A crash between journal and rename
        leaves the journal naming the slot as staged (never as the fallback whose file is
        still there); a staged slot is only tested after the update channel has recorded
        the staging, and is otherwise staged again."""
        with self._locked():
            self._remove_leftovers(self._dir(model))
            j, previous = self._read(model)
            self._refuse_backwards(j, version, bundle_id)
            slot = j.free_slot()
            dest = self.slot_path(model, slot)
            failed = f"cannot stage {model} v{version} in slot {slot}"
            tmp = self._copy_in(bundle, dest, failed)
            if check_copy is not None:
                try:
                    check_copy(tmp)
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
                    raise
            was_fallback = j.fallback == slot
            if was_fallback:
                j.fallback = None
            j.slots[slot] = SlotInfo(version, bundle_id, format_time(utcnow()), "staged")
            j.staged = slot
            try:
                self._write(j)
                tmp.replace(dest)
            except BaseException as e:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                not_restored = self._put_back(model, previous)
                if not isinstance(e, OSError):
                    raise
                why = describe_os_error(e)
                if not_restored is None:
                    raise StoreError(f"{failed}: {why}; the store is as it was") from e
                lost = ", no longer as the fallback" if was_fallback else ""
                raise StoreError(
                    f"{failed}: {why}; the previous journal cannot be put back "
                    f"({not_restored}): it names slot {slot} as staged{lost}, though the slot "
                    "holds what it held before"
                ) from e
            try:
                fsync_dir(dest.parent)
            except OSError as e:
                raise StoreError(
                    f"{model} v{version} is staged in slot {slot}, but the store's directory "
                    f"cannot be synced ({describe_os_error(e)}): what the slot held before is "
                    "gone, and a power cut may yet lose the staged copy"
                ) from e
            return dest

    @staticmethod
    def _copy_in(bundle: Path, dest: Path, failed: str) -> Path:
        """``bundle`` copied to a new temporary file beside ``dest``, synced, mode 0600.
        On failure nothing is left and :class:`StoreError` (prefixed ``failed``) says why."""
        try:
            with bundle.open("rb") as src, synced_temp(dest, mode=0o600) as (out, tmp):
                shutil.copyfileobj(src, out, 1024 * 1024)
        except OSError as e:
            raise StoreError(f"{failed}: {describe_os_error(e)}; the store is as it was") from e
        return tmp

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


def _is_model_name(name: str) -> bool:
    try:
        validate_name(name, "model name")
    except ValueError:
        return False
    return True
