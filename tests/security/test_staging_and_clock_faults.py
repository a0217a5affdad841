"""Faults at staging and in the device's clock (issue 9, "Faults, with nothing lost").

The device (dev-a, in this process, over a real Mosquitto, real crypto and ONNX Runtime)
serves clf v2 with v1 in its fallback slot, floor 1, installed as ``agent install``
would; the fleet offers v3. Each fault strikes at a named moment of the update through
the updater's own fault hook: ``Faults(kill_at=STATE)`` and ``Faults(kill_after_chunks=N)``
call ``kill`` right after STATE is written to the journal (or the N-th chunk to disk).
Here the hook fills the disk, damages the staged file or moves the clock, and the update
goes on; or it kills the device as the fleet simulator does (its worker unwinds, its
connection drops without a word) and the test starts it again on the same home.

What every fault must leave: the update ends in a typed error in the status (and in an
event the fleet hears), v2 answers the same input with the same output, and the device
home is as it was byte for byte, except the update channel's own records (its state in
the journal, the sequence book, trusted time): ``Device.assert_unchanged`` of
tests/security/conftest.py, over snapshots that leave those three out. A fault that
strikes after staging has cost the fallback slot, which staging overwrote, and nothing
more (``Device.assert_serving_unchanged``).

A full disk is a tmpfs of the test's own holding the whole device home, as
tests/ota/test_hostile_downloads.py fakes one for the download; a filler file beside the
home leaves exactly the pages a case needs.

The last section needs no update channel: ``agent install`` on a device of its own
(``fresh`` of tests/security/conftest.py) meets a failed rename of the staged copy, or
finds the temporary files of copies cut short, and must leave the home byte for byte.
"""

# The OTA world's fixtures, imported from tests/ota/conftest.py, are parameters by the same
# names:
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.agent.store import ModelStore, StoreError
from edgeseal.core import encoding
from edgeseal.core.config import load_config
from edgeseal.core.encoding import b64d, parse_time
from edgeseal.core.files import temp_path_for
from edgeseal.core.reader import BundleFile, VerifyPolicy
from edgeseal.ota import updater as updater_module
from edgeseal.ota.channel import MqttChannel
from edgeseal.ota.simulate import DeviceKilled
from edgeseal.ota.updater import Faults
from edgeseal.packager.pack import PackOptions, pack_model
from helpers import NOW, mount_tmpfs
from ota.conftest import broker, dev_config, fleet_side, ota_pki, ws  # noqa: F401 (fixtures)
from ota_world import FleetSide, InProcessDevice, Workstation, copy_home, wait_for
from security.conftest import MODEL, Device, Parts, Snapshot

pytestmark = pytest.mark.mqtt

PAGE = 4096
#: What the update channel itself writes while it works: never compared.
CHANNEL_RECORDS = ("ota/seqs.json", "trusted-time", f"models/{MODEL}/journal.json")


# --- the device under test ---------------------------------------------------------------


class Watched(Device):
    """:class:`security.conftest.Device`'s snapshot and assertions, over an OTA device
    running in this process (its own agent, the OTA world's 16-feature classifier)."""

    def __init__(self, dev: InProcessDevice, x: np.ndarray, *, channel_too: bool = False) -> None:
        # Not Device.__init__: that would open a second agent on the same home.
        self.home = dev.agent.home
        self.agent = dev.agent
        self.x = x
        self.channel_too = channel_too

    def infer(self, name: str = MODEL) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        r = self.agent.infer(name, {"input": self.x})
        return dict(r.model), {k: np.array(v) for k, v in r.outputs.items()}

    def snapshot(self) -> Snapshot:
        snap = super().snapshot()
        if self.channel_too:
            return snap
        for name in CHANNEL_RECORDS:
            snap.files.pop(name, None)
        for journal in snap.journals.values():
            journal.pop("channel", None)
        return snap


def _model(dev: InProcessDevice) -> dict[str, Any]:
    return dict(dev.channel.status()["models"].get(MODEL, {}))


def _serving(dev: InProcessDevice) -> int | None:
    sm = dev.agent.serving.get(MODEL)
    return sm.identity["version"] if sm else None


def _ended(dev: InProcessDevice, state: str, version: int = 3, timeout: float = 30) -> str:
    """Wait until the offer of ``version`` rests in ``state``; its reason."""
    wait_for(
        lambda: _model(dev).get("offered") == version and _model(dev).get("state") == state,
        timeout=timeout,
        what=f"v{version} {state}",
        detail=lambda: _model(dev),
    )
    return str(_model(dev).get("reason", ""))


def _reported(fleet_side: FleetSide, state: str, match: str) -> None:
    """The fleet heard it: a transition event to ``state`` whose reason says ``match``."""
    wait_for(
        lambda: any(
            e.get("event") == "transition" and e.get("to") == state and match in e.get("reason", "")
            for e in fleet_side.events_of("dev-a")
        ),
        timeout=10,
        what=f"a {state} event saying {match!r}",
        detail=lambda: fleet_side.events_of("dev-a")[-3:],
    )


def _journal_agrees_with_slots(dev: InProcessDevice, anchor: Any) -> None:
    """The slots the journal names hold whole, verified bundles of the versions it names,
    and the store folder holds nothing else (no temporary file, no stray slot)."""
    store = dev.agent.store
    j = store.journal(MODEL)
    named = set()
    for slot in (j.active, j.fallback, j.staged):
        if slot is None:
            continue
        named.add(f"slot-{slot}.esb")
        with BundleFile.open(store.slot_path(MODEL, slot)) as bf:
            m = bf.verify(VerifyPolicy(anchor=anchor, now=None)).manifest
        assert (m.version, m.bundle_id) == (j.slots[slot].version, j.slots[slot].bundle_id)
    on_disk = {p.name for p in (store.root / MODEL).iterdir()}
    failed = {f"slot-{s}.esb" for s, info in j.slots.items() if info.state.startswith("failed")}
    assert on_disk - named - failed == {"journal.json"}, sorted(on_disk)


def _no_partial_download(dev: InProcessDevice) -> None:
    assert not any((dev.agent.home.path / "ota" / "incoming").iterdir())


@pytest.fixture(scope="module")
def homes(ws: Workstation, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Device homes to copy: "v2" serves v2 with v1 as its fallback (floor 1); "v1"
    serves v1 alone (slot b never written)."""
    root = tmp_path_factory.mktemp("staging-homes")
    out = {}
    for name, versions in (("v1", ["v1"]), ("v2", ["v1", "v2"])):
        home = copy_home(ws, "dev-a", root / name)
        agent = Agent(DeviceHome(home), load_config(text=""))
        try:
            for v in versions:
                agent.install(ws.bundles[v])
        finally:
            agent.close()
        out[name] = home
    return out


# --- the fault hook ---------------------------------------------------------------------


class Boot:
    """Starts devices on a home, with a fault: ``faults`` names the moment and ``fault``
    what happens then, once: ``"kill"`` (the device dies; :meth:`wait_killed`), or a
    callable, after which the update goes on."""

    def __init__(self, dev_config: Callable[..., tuple[str, Path]]) -> None:
        self.dev_config = dev_config
        self.running: list[InProcessDevice] = []

    def __call__(
        self,
        home: Path,
        *,
        faults: Faults | None = None,
        fault: Callable[[str], None] | Literal["kill"] | None = None,
        clock_skew: int | None = None,
        **ota: Any,
    ) -> InProcessDevice:
        text, _ = self.dev_config(home, **ota)
        if clock_skew is not None:
            text = text.replace("[device]\n", f"[device]\nclock_skew = {clock_skew}\n")
        cfg = load_config(text=text)
        agent = Agent(DeviceHome(home), cfg)
        agent.load_all()
        fired = threading.Event()
        channel: MqttChannel

        def hook(why: str) -> None:
            if fired.is_set():
                return
            fired.set()
            if fault != "kill":
                assert callable(fault)
                fault(why)
                return
            channel._stopping.set()  # as the fleet simulator kills a device
            assert channel.conn is not None
            channel.conn.abandon()
            raise DeviceKilled(why)

        channel = MqttChannel(cfg, faults=faults, kill=hook)
        channel.start(agent)
        assert channel.conn is not None and channel.conn.wait_connected(20), "device offline"
        dev = InProcessDevice(agent, channel)
        self.running.append(dev)
        return dev

    def wait_killed(self, dev: InProcessDevice) -> None:
        """After a kill: what the dead process leaves (open files closed, memory freed)."""
        ch = dev.channel
        assert ch._thread is not None
        ch._thread.join(30)
        assert not ch._thread.is_alive(), "the device was not killed"
        u = ch.updater
        if u is not None and u.download is not None:
            os.close(u.download.fd)
            u.download = None
        dev.agent.close()
        self.running.remove(dev)

    def stop_all(self) -> None:
        for dev in self.running:
            with contextlib.suppress(Exception):
                dev.stop()


@pytest.fixture
def boot(
    dev_config: Callable[..., tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Boot]:
    default_hook = threading.excepthook

    def quiet_kills(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, DeviceKilled):
            return
        default_hook(args)

    monkeypatch.setattr(threading, "excepthook", quiet_kills)
    b = Boot(dev_config)
    yield b
    b.stop_all()


# --- a full disk ------------------------------------------------------------------------


class Disk:
    """A tmpfs of the test's own; the device home lives on it, a filler file beside."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    def free_pages(self) -> int:
        st = os.statvfs(self.mount)
        return st.f_bavail * st.f_frsize // PAGE

    def leave(self, pages: int) -> None:
        """Fill the disk up to ``pages`` free pages."""
        self.filler.unlink(missing_ok=True)
        fill = self.free_pages() - pages
        assert fill > 0, "the tmpfs is too small for this case"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, fill * PAGE)
        finally:
            os.close(fd)
        assert self.free_pages() == pages

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 4 MiB tmpfs (mounting needs root or CAP_SYS_ADMIN: skipped without, failed in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mount_tmpfs(mount, "4m")
    yield Disk(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _pages(path: Path) -> int:
    return math.ceil(path.stat().st_size / PAGE)


def copy_home_from(template: Path, home: Path) -> Path:
    shutil.copytree(template, home)
    return home


def _on_disk(disk: Disk, homes: dict[str, Path], which: str) -> Path:
    return copy_home_from(homes[which], disk.mount / "home")


# --- 1. a full disk while staging ------------------------------------------------------


def test_no_space_for_the_slot_copy_fails_the_update_and_a_reoffer_commits_later(
    ws,
    homes,
    disk,
    boot,
    fleet_side,
):
    """Timeline: v3 downloads whole (its .part preallocated); entering ``verifying``, the
    disk is filled to one page fewer than the bundle takes. The copy into the free slot
    (v1's, the fallback) runs out of space: the update fails with a typed "no space"
    error, v1 stays in its slot and stays the fallback, v2 serves on, nothing is left
    half-written. Space comes back, the fleet offers v3 again: it commits."""
    home = _on_disk(disk, homes, "v2")
    short = _pages(ws.bundles["v3"]) - 1
    dev = boot(home, faults=Faults(kill_at="verifying"), fault=lambda why: disk.leave(short))
    watched = Watched(dev, ws.x)
    before = watched.snapshot()
    fleet_side.offer("v3")
    reason = _ended(dev, "failed")
    assert "StoreError" in reason and "no space" in reason, reason
    _reported(fleet_side, "failed", "no space")
    watched.assert_unchanged(before)
    _no_partial_download(dev)
    _journal_agrees_with_slots(dev, ws.ring.anchor())

    disk.release()
    fleet_side.offer("v3")
    _ended(dev, "committed")
    assert _serving(dev) == 3
    j = dev.agent.store.journal(MODEL)
    assert (j.slots[j.active].version, j.slots[j.fallback].version) == (3, 2)
    _journal_agrees_with_slots(dev, ws.ring.anchor())


@pytest.mark.parametrize("serving", ["v1", "v2"], ids=["into-an-empty-slot", "over-the-fallback"])
def test_no_space_for_the_journal_after_the_slot_copy_leaves_the_store_as_it_was(
    ws,
    homes,
    disk,
    boot,
    fleet_side,
    serving,
):
    """Timeline: the next version downloads whole; entering ``verifying``, the disk is
    filled to exactly the pages the bundle takes (one more than the case above). The copy
    into the free slot fits and the disk is full: the store's journal cannot be written.
    The update fails with a typed "no space" error and the store is as it was: no slot
    file the journal does not name (into an empty slot), the fallback still whole and
    still the fallback (over the fallback)."""
    home = _on_disk(disk, homes, serving)
    offered = "v2" if serving == "v1" else "v3"
    pages = _pages(ws.bundles[offered])
    dev = boot(home, faults=Faults(kill_at="verifying"), fault=lambda why: disk.leave(pages))
    watched = Watched(dev, ws.x)
    before = watched.snapshot()
    fleet_side.offer(offered)
    reason = _ended(dev, "failed", version=int(offered[1]))
    assert "StoreError" in reason and "no space" in reason, reason
    watched.assert_unchanged(before)
    _no_partial_download(dev)
    _journal_agrees_with_slots(dev, ws.ring.anchor())


def test_a_disk_full_when_the_download_completes_fails_the_update_and_reports_it(
    ws,
    homes,
    disk,
    boot,
    fleet_side,
):
    """Timeline: v3 is offered; entering ``downloading``, the disk is filled to exactly
    the pages of the bundle, so its preallocation takes the last page. The chunks land;
    the journal cannot take the next state. The update must not hang in ``downloading``
    with a whole .part on a full disk: it fails, says why, and gives the space back."""
    home = _on_disk(disk, homes, "v2")
    pages = _pages(ws.bundles["v3"])
    dev = boot(home, faults=Faults(kill_at="downloading"), fault=lambda why: disk.leave(pages))
    watched = Watched(dev, ws.x)
    before = watched.snapshot()
    fleet_side.offer("v3")
    reason = _ended(dev, "failed")
    assert reason == "verify: the journal cannot be written: no space left on the device"
    _reported(fleet_side, "failed", "no space")
    watched.assert_unchanged(before)
    _no_partial_download(dev)
    _journal_agrees_with_slots(dev, ws.ring.anchor())


# --- 2. a staged bundle damaged before it is tested -------------------------------------


def _flip(at: Callable[[Any, int], int]) -> Callable[[Path], None]:
    def flip(path: Path) -> None:
        data = path.read_bytes()
        offset = at(Parts.of(data).header, len(data))
        with path.open("r+b") as f:  # in place, as a bad sector or a stray write would
            f.seek(offset)
            f.write(bytes([data[offset] ^ 0x10]))
            os.fsync(f.fileno())

    return flip


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)
        os.fsync(f.fileno())


#: How the staged file is damaged, and the error that must say so.
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped-manifest-byte": (_flip(lambda h, n: h.manifest_offset + 40), "SignatureError"),
    "flipped-payload-byte": (
        _flip(lambda h, n: h.payload_offset + (n - h.payload_offset) // 2),
        "DigestMismatchError",
    ),
    "truncated": (_truncate, "MalformedBundleError"),
}


def _staged_path(home: Path) -> Path:
    j = json.loads((home / "models" / MODEL / "journal.json").read_bytes())
    assert j["staged"] is not None, "nothing staged"
    return home / "models" / MODEL / f"slot-{j['staged']}.esb"


def _refused_after_staging(
    dev: InProcessDevice,
    watched: Watched,
    before: Snapshot,
    fleet_side: FleetSide,
    error: str,
    anchor: Any,
) -> None:
    """Detected when the staged copy is opened; the update ends ``fallen-back`` (docs/ota.md:
    a failed health check); v2 never stopped serving; the damaged slot, which staging took
    from the fallback, is marked failed and named by nothing."""
    reason = _ended(dev, "fallen-back")
    assert reason.startswith("health: ") and error in reason, reason
    _reported(fleet_side, "fallen-back", error)
    watched.assert_serving_unchanged(before)
    _no_partial_download(dev)
    _journal_agrees_with_slots(dev, anchor)
    j = dev.agent.store.journal(MODEL)
    damaged = next(s for s in j.slots if s != j.active)
    assert j.slots[damaged].state.startswith(f"failed: {error}"), j.slots[damaged]
    assert _serving(dev) == 2


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_staged_bundle_damaged_before_its_test_is_refused_and_never_served(
    ws,
    homes,
    boot,
    fleet_side,
    tmp_path,
    damage,
):
    """Timeline: v3 is verified and copied into the free slot; the moment the device
    records ``staged``, the copy on disk is damaged (a flipped byte in the signed manifest
    or in the sealed payload, or the file cut short). Opening it for the health check
    refuses it with the error that names the damage, and it never serves."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    spoil, error = DAMAGE[damage]
    dev = boot(home, faults=Faults(kill_at="staged"), fault=lambda why: spoil(_staged_path(home)))
    watched = Watched(dev, ws.x)
    before = watched.snapshot()
    fleet_side.offer("v3")
    _refused_after_staging(dev, watched, before, fleet_side, error, ws.ring.anchor())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("state", "damage"), [("staged", "flipped-payload-byte"), ("testing", "truncated")]
)
def test_a_staged_bundle_damaged_while_the_device_is_down_is_refused_after_the_restart(
    ws,
    homes,
    boot,
    fleet_side,
    tmp_path,
    state,
    damage,
):
    """Timeline: the device is killed the moment it records ``state`` (v3 staged, not yet
    tested); while it is down the staged file is damaged; it starts again and resumes the
    update from the journal: the test it runs again refuses the file."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    spoil, error = DAMAGE[damage]
    dev = boot(home, faults=Faults(kill_at=state), fault="kill")
    before = Watched(dev, ws.x).snapshot()
    fleet_side.offer("v3")
    boot.wait_killed(dev)
    spoil(_staged_path(home))
    dev = boot(home)
    watched = Watched(dev, ws.x)
    _refused_after_staging(dev, watched, before, fleet_side, error, ws.ring.anchor())


# --- 3. the device's clock jumps --------------------------------------------------------


class _WallTime(types.ModuleType):
    """The updater's ``time`` module with ``time()`` moved by the clock's offset."""

    def __init__(self, clock: Clock) -> None:
        super().__init__("time")
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self._clock.offset.total_seconds()


class Clock:
    """The device's wall clock, moved by ``offset``, as its trust checks (trusted time:
    the later of this clock and the latest signed time seen) and its updater read it.
    Monotonic clocks do not move; the fleet's clock does not move."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = timedelta(0)

        def now() -> datetime:
            return encoding.utcnow() + self.offset

        monkeypatch.setattr("edgeseal.agent.device.utcnow", now)
        monkeypatch.setattr(updater_module, "utcnow", now)
        monkeypatch.setattr(updater_module, "time", _WallTime(self))


def _trusted_time(home: Path) -> datetime:
    return parse_time((home / "trusted-time").read_text().strip(), "trusted-time")


def _issued(wire: bytes) -> datetime:
    payload = json.loads(b64d(json.loads(wire)["envelope"]["payload"], "offer payload"))
    return parse_time(payload["issued"], "issued")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture(scope="module")
def short_lived(ws: Workstation) -> str:
    """v3 (m1) expiring ten days after the real now: a clock jump past its expiry stays
    inside its signer certificate's validity, so the bundle's own expiry (V8) is what
    refuses it."""
    signer, cert = ws.ring.load_signer("release")
    out = ws.root / "v3-short.esb"
    pack_model(
        ws.root / "models" / "m1.onnx",
        out,
        name=MODEL,
        version=3,
        signer=signer,
        certificate=cert,
        devices=ws.ring.devices(),
        now=NOW,
        validity=encoding.utcnow() - NOW + timedelta(days=10),
        options=PackOptions(calibration=ws.root / "models" / "calib.npz"),
    )
    ws.bundles["v3-short"] = out
    return "v3-short"


def test_offers_are_judged_by_the_configured_skew_when_the_clock_jumps_back(
    ws,
    homes,
    boot,
    fleet_side,
    clock,
    tmp_path,
):
    """Timeline: the device allows 60 s of clock skew (``device.clock_skew``; the default
    is 300) and the latest signed time it has seen is weeks old. Its clock falls 2 minutes
    behind: an offer issued now is from its future, beyond the skew: refused as such,
    reported, and nothing changes, the channel's records included. The clock comes back
    to 30 s behind, within the skew: the next offer is taken and commits."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    # Weeks old whenever this runs (the bundles are packed at the session's NOW, which may
    # be only minutes ago when the test runs early).
    (home / "trusted-time").write_text(encoding.format_time(NOW - timedelta(days=21)))
    assert _trusted_time(home) < encoding.utcnow() - timedelta(minutes=5)
    dev = boot(home, clock_skew=60)
    updater = dev.channel.updater
    assert updater is not None
    watched = Watched(dev, ws.x, channel_too=True)
    before = watched.snapshot()
    refused = updater.counters.messages_refused
    clock.offset = timedelta(minutes=-2)
    fleet_side.offer("v3")
    wait_for(
        lambda: any(e.get("event") == "refused" for e in fleet_side.events_of("dev-a")),
        timeout=10,
        what="the refusal",
    )
    event = next(e for e in fleet_side.events_of("dev-a") if e.get("event") == "refused")
    assert event["reason"].startswith("OtaMessageError: OTA message issued in the future")
    assert updater.counters.messages_refused == refused + 1
    watched.assert_unchanged(before)

    clock.offset = timedelta(seconds=-30)
    wire = fleet_side.offer("v3")
    _ended(dev, "committed")
    assert _serving(dev) == 3
    assert _trusted_time(home) == _issued(wire)  # signed time, not the device's clock


@pytest.mark.parametrize("jump", ["forward-past-the-bundles-expiry", "back-a-day"])
def test_a_clock_jump_mid_download_is_judged_by_trusted_time(
    ws,
    homes,
    boot,
    fleet_side,
    clock,
    short_lived,
    tmp_path,
    jump,
):
    """Timeline: a v3 that expires in ten days is offered and accepted; after two of its
    chunks the device's clock jumps. Forward 20 days: when the download is whole, the
    bundle is verified at the device's trusted time, which is past its expiry: refused
    (ExpiredError, the bundle's own expiry), nothing changes, and trusted time is not
    dragged forward by the clock; with the clock set right, the same bundle offered again
    commits. Back a day: trusted time holds at the offer's issue time (never moves back),
    and the update commits."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    offset = timedelta(days=20) if jump.startswith("forward") else timedelta(days=-1)

    def move(why: str) -> None:
        clock.offset = offset

    dev = boot(home, faults=Faults(kill_after_chunks=2), fault=move)
    watched = Watched(dev, ws.x)
    before = watched.snapshot()
    wire = fleet_side.offer(short_lived)
    if jump == "back-a-day":
        _ended(dev, "committed")
        assert _serving(dev) == 3 and clock.offset == offset
        assert _trusted_time(home) == _issued(wire)
        return
    reason = _ended(dev, "failed")
    assert reason.startswith("verify: ExpiredError: bundle expired at"), reason
    _reported(fleet_side, "failed", "ExpiredError")
    watched.assert_unchanged(before)
    _no_partial_download(dev)
    assert _trusted_time(home) == _issued(wire), "trusted time followed the clock"

    clock.offset = timedelta(0)
    fleet_side.offer(short_lived)
    _ended(dev, "committed")
    assert _serving(dev) == 3


@pytest.mark.slow
def test_a_restart_with_the_clock_past_the_offers_expiry_fails_the_update_and_cleans_up(
    ws,
    homes,
    boot,
    fleet_side,
    clock,
    tmp_path,
):
    """Timeline: v3 is downloading; after two chunks the device is killed. While it is down
    its clock jumps 8 days ahead, past the offer's 7-day validity. On restart the stored
    offer is verified again at the device's time (with its configured skew): it no longer
    holds, the update fails with the expiry as its reason, the two chunks on disk are
    removed, nothing else changes. The clock is set right; a new offer commits."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    dev = boot(home, faults=Faults(kill_after_chunks=2), fault="kill")
    before = Watched(dev, ws.x).snapshot()
    fleet_side.offer("v3")
    boot.wait_killed(dev)
    assert any((home / "ota" / "incoming").iterdir()), "the kill came before the download"
    clock.offset = timedelta(days=8)
    dev = boot(home)
    reason = _ended(dev, "failed")
    assert reason.startswith("resume: the offer no longer holds: OTA message expired"), reason
    watched = Watched(dev, ws.x)
    watched.assert_unchanged(before)
    _no_partial_download(dev)

    clock.offset = timedelta(0)
    fleet_side.offer("v3")
    _ended(dev, "committed")
    assert _serving(dev) == 3


def test_probation_runs_on_the_devices_own_time_whatever_the_wall_clock_does(
    ws,
    homes,
    boot,
    fleet_side,
    clock,
    tmp_path,
):
    """Timeline: probation is 3 s. v3 commits (v2 its fallback, floor 2) and at that
    moment the wall clock jumps 30 days ahead: the ticks that follow do not end probation
    early (the fallback and the floor stay). Then the clock jumps 60 days back: probation
    still ends, 3 s after the commit by the device's monotonic clock, neither sooner nor
    never: the floor rises to 3 and the fallback is released."""
    home = copy_home_from(homes["v2"], tmp_path / "home")
    committed: list[float] = []

    def jump(why: str) -> None:
        committed.append(time.monotonic())
        clock.offset = timedelta(days=30)

    dev = boot(home, faults=Faults(kill_at="committed"), fault=jump, probation_seconds=3)
    fleet_side.offer("v3")
    _ended(dev, "committed")
    time.sleep(1.6)  # more than one tick (1 s) after the jump
    j = dev.agent.store.journal(MODEL)
    assert not j.channel.get("final"), "probation ended by a clock jump"
    assert (dev.agent.store.floors.get(MODEL), j.slots[j.fallback].version) == (2, 2)

    clock.offset = timedelta(days=-30)
    wait_for(
        lambda: dev.agent.store.journal(MODEL).channel.get("final"),
        timeout=10,
        what="probation to end",
        detail=lambda: dev.agent.store.journal(MODEL).channel,
    )
    assert time.monotonic() - committed[0] > 2.9  # (the hook ran a moment after the commit)
    j = dev.agent.store.journal(MODEL)
    assert (dev.agent.store.floors.get(MODEL), j.fallback) == (3, None)
    assert j.channel["reason"] == "probation passed"


# --- 4. a failed rename, and what a write cut short leaves ------------------------------


def test_a_failed_rename_of_the_staged_copy_leaves_the_device_as_it_was(fresh, monkeypatch):
    """Timeline: the device serves v2 (slot b), v1 its fallback (slot a). ``agent install``
    of v3 copies it whole, writes the journal naming slot a staged, and the rename over
    slot-a.esb fails (EIO). The previous journal is put back: the install fails with a
    StoreError saying the store is as it was, and the device home is, byte for byte; v1
    is still the fallback and v2 serves on."""
    bundle = fresh.bundle(3, seed=3)
    before = fresh.snapshot()
    slot_a = fresh.agent.store.slot_path(MODEL, "a")
    real_replace = os.replace
    onto: list[str] = []

    def replace(src, dst, **kw):
        onto.append(Path(dst).name)
        if Path(dst) == slot_a:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreError, match="Input/output error; the store is as it was"):
        fresh.agent.install(bundle)
    assert onto == ["journal.json", "slot-a.esb", "journal.json"]
    monkeypatch.undo()
    fresh.assert_unchanged(before)
    assert fresh.agent.store.journal(MODEL).fallback == "a"


def test_what_staging_cut_short_leaves_is_removed_at_open_and_before_the_next_staging(fresh):
    """Timeline: the device serves v2 (slot b), v1 its fallback (slot a). Copies of v3
    into slot a were cut short (a kill mid-copy, a power cut between journal and rename),
    leaving whole-bundle temporary files named as the store names them, and one of the
    journal's. The agent starts again: opening the store removes them, and the slots, the
    journal and every other file are as they were. Another copy cut short later is
    removed when v3 is staged next, and v3 commits."""
    store = fresh.agent.store
    folder = store.root / MODEL
    bundle = fresh.bundle(3, seed=3)
    (folder / "notes.tmp").write_bytes(b"not the store's")  # another name: kept
    before = fresh.snapshot()
    leftovers = [
        temp_path_for(store.slot_path(MODEL, "a")),
        temp_path_for(store.slot_path(MODEL, "a")),
        temp_path_for(folder / "journal.json"),
    ]
    for p in leftovers:
        shutil.copyfile(bundle, p)
    ModelStore(store.root, store.floors)
    assert [p.name for p in leftovers if p.exists()] == []
    fresh.assert_unchanged(before)

    late = temp_path_for(store.slot_path(MODEL, "a"))
    shutil.copyfile(bundle, late)
    fresh.agent.install(bundle)
    assert not late.exists()
    j = store.journal(MODEL)
    assert (j.active, j.slots[j.active].version, j.slots[j.fallback].version) == ("a", 3, 2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "journal.json",
        "notes.tmp",
        "slot-a.esb",
        "slot-b.esb",
    ]
