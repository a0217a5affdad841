"""The model store's staging when the file system fails it, and the leftovers of writes
cut short. The store copies whatever file it is given (verifying a bundle is the agent's
job), so plain bytes stand for bundles here; tests/security/test_staging_and_clock_faults.py
makes the same faults strike a real device."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeseal.agent import store as store_module
from edgeseal.agent.store import ModelStore, StoreError
from edgeseal.core.files import temp_path_for
from edgeseal.hardware.floors import FileFloors

MODEL = "clf"


def _bundle(tmp_path: Path, version: int) -> Path:
    p = tmp_path / f"v{version}.esb"
    p.write_bytes(f"bundle v{version} ".encode() * 1000)
    return p


def _bundle_id(version: int) -> str:
    return f"{version:032x}"


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """A store serving v2 (slot b) with v1 as its fallback (slot a)."""
    s = ModelStore(tmp_path / "models", FileFloors(tmp_path / "floors.json"))
    for v in (1, 2):
        s.stage(MODEL, _bundle(tmp_path, v), version=v, bundle_id=_bundle_id(v))
        s.commit(MODEL)
    j = s.journal(MODEL)
    assert (j.active, j.fallback) == ("b", "a")
    return s


def _files(store: ModelStore) -> dict[str, bytes]:
    d = store.root / MODEL
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _eio(path: object) -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), str(path))


def _renames_failing(
    monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path, int], bool]
) -> list[str]:
    """``os.replace`` fails (EIO) where ``fails(destination, earlier renames onto it)``;
    the names renamed onto, in order, failed ones included."""
    real = os.replace
    onto: list[str] = []

    def replace(src: str | Path, dst: str | Path, **kw: object) -> None:
        dst = Path(dst)
        before = onto.count(dst.name)
        onto.append(dst.name)
        if fails(dst, before):
            raise _eio(dst)
        real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    return onto


def test_a_failed_rename_of_the_staged_copy_puts_the_journal_back(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy whole, journal names slot a staged, the rename over slot-a.esb fails: the
    previous journal is written back, the copy removed, and the error says the store is
    as it was (it is, byte for byte)."""
    before = _files(store)
    slot_a = store.slot_path(MODEL, "a")
    onto = _renames_failing(monkeypatch, lambda dst, n: dst == slot_a)
    with pytest.raises(StoreError, match=r"in slot a: Input/output error; the store is as it was"):
        store.stage(MODEL, _bundle(tmp_path, 3), version=3, bundle_id=_bundle_id(3))
    assert onto == ["journal.json", "slot-a.esb", "journal.json"]
    assert _files(store) == before
    assert store.journal(MODEL).fallback == "a"


def test_a_journal_that_cannot_be_put_back_is_named_in_the_error(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename over the slot fails and so does putting the previous journal back: the
    error says what the journal now claims (slot a staged, no longer the fallback) and
    that the slot still holds v1; no temporary file is left."""
    slot_a = store.slot_path(MODEL, "a")
    v1 = slot_a.read_bytes()
    _renames_failing(
        monkeypatch, lambda dst, n: dst == slot_a or (dst.name == "journal.json" and n > 0)
    )
    with pytest.raises(StoreError) as raised:
        store.stage(MODEL, _bundle(tmp_path, 3), version=3, bundle_id=_bundle_id(3))
    assert str(raised.value) == (
        "cannot stage clf v3 in slot a: Input/output error; the previous journal cannot be "
        "put back (Input/output error): it names slot a as staged, no longer as the "
        "fallback, though the slot holds what it held before"
    )
    j = store.journal(MODEL)
    assert (j.active, j.fallback, j.staged, j.slots["a"].version) == ("b", None, "a", 3)
    assert slot_a.read_bytes() == v1
    assert sorted(_files(store)) == ["journal.json", "slot-a.esb", "slot-b.esb"]


def test_a_failed_directory_sync_after_the_rename_says_the_bundle_is_staged(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy has replaced slot a (v1, the fallback) when the directory cannot be
    synced: undoing is no longer possible, so the error says v3 is staged, v1 gone, and a
    power cut may yet lose v3; the journal agrees with the slot."""
    bundle = _bundle(tmp_path, 3)

    def fsync_dir(directory: Path) -> None:
        raise _eio(directory)

    monkeypatch.setattr(store_module, "fsync_dir", fsync_dir)
    with pytest.raises(StoreError) as raised:
        store.stage(MODEL, bundle, version=3, bundle_id=_bundle_id(3))
    assert str(raised.value) == (
        "clf v3 is staged in slot a, but the store's directory cannot be synced "
        "(Input/output error): what the slot held before is gone, and a power cut may yet "
        "lose the staged copy"
    )
    j = store.journal(MODEL)
    assert (j.active, j.fallback, j.staged, j.slots["a"].version) == ("b", None, "a", 3)
    assert store.slot_path(MODEL, "a").read_bytes() == bundle.read_bytes()
    assert sorted(_files(store)) == ["journal.json", "slot-a.esb", "slot-b.esb"]


def test_only_the_stores_own_leftovers_are_removed_when_it_opens(
    store: ModelStore, tmp_path: Path
) -> None:
    """Temporary files of the slots and the journal go, in every model's folder (one
    without a journal too: a first install cut short); files of other names, other
    folders and the slots and journal themselves stay."""
    before = _files(store)
    fresh = store.root / "new-model"
    fresh.mkdir()
    leftovers = [
        temp_path_for(store.slot_path(MODEL, "a")),
        temp_path_for(store.slot_path(MODEL, "b")),
        temp_path_for(store.root / MODEL / "journal.json"),
        temp_path_for(fresh / "slot-a.esb"),
    ]
    kept = [
        store.root / MODEL / "trt-cache" / temp_path_for(Path("slot-a.esb")).name,
        store.root / MODEL / ".slot-a.esb.backup.tmp",
        store.root / MODEL / ".slot-c.esb.1.0badc0de.tmp",
        store.root / temp_path_for(Path("slot-a.esb")).name,
        store.root / "Not A Model" / temp_path_for(Path("slot-a.esb")).name,
    ]
    for p in leftovers + kept:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a bundle")
    ModelStore(store.root, store.floors)
    assert [p for p in leftovers if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    for p in kept:
        p.unlink()
    assert _files(store) == before
