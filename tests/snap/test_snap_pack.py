"""The snap, checked without snapcraft: snapcraft.yaml says what the issue asks, the
assembled tree passes snapd's own ``snap pack --check-skeleton`` with no warning, and the
packed file is what ``snap pack`` makes (xz, no fragments, no xattrs, all root, 0755
commands and hooks)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from edgeseal.agent.daemon import watchdog_interval
from snap.conftest import assemble, check_skeleton

pytestmark = pytest.mark.snap


def _seconds(duration: str) -> float:
    """A snapd duration such as ``60s``, ``5m`` or ``1m30s``, in seconds."""
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_snapcraft_yaml_is_strict_arm64_amd64_with_a_notify_daemon_and_only_the_named_plugs():
    sc = assemble.load_snapcraft()
    assert sc["base"] in ("core22", "core24")
    assert sc["confinement"] == "strict"
    builds = sorted(a for e in sc["architectures"] for a in e["build-for"])
    assert builds == ["amd64", "arm64"]  # ONNX Runtime has no 32-bit ARM wheels
    daemon = sc["apps"]["agent"]
    assert daemon["command"].endswith("edgeseal-launch agent run")
    assert daemon["daemon"] == "notify"  # the agent sends READY=1 and WATCHDOG=1
    # snapd sets WatchdogSec (so $WATCHDOG_USEC) from watchdog-timeout; the agent pings
    # every half of it, late by up to half that again (it wakes every quarter): the
    # latest ping must still land inside the timeout.
    timeout = _seconds(daemon["watchdog-timeout"])
    ping_every = watchdog_interval({"WATCHDOG_USEC": str(int(timeout * 1e6))}, pid=1)
    assert ping_every is not None and 2 * ping_every <= timeout
    assert ping_every * 1.5 < timeout
    assert _seconds(daemon["start-timeout"]) >= timeout  # loading happens before READY=1
    assert daemon["restart-condition"] == "on-failure"
    assert daemon["stop-mode"] == "sigterm"
    wanted = {"network", "network-bind", "tpm", "tee", "hardware-observe", "opengl"}
    for name, app in sc["apps"].items():
        assert set(app["plugs"]) <= wanted | ({"daemon-notify"} if name == "agent" else set())
    assert set(daemon["plugs"]) == wanted | {"daemon-notify"}  # sd_notify, from a strict snap
    assert "plugs" not in sc  # nothing broader declared at the top level


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_snap_pack_check_skeleton_accepts_the_tree_without_a_warning(snap_tool, tmp_path, arch):
    prime = assemble.assemble(tmp_path / "prime", arch)
    meta = yaml.safe_load((prime / "meta" / "snap.yaml").read_text())
    assert meta["architectures"] == [arch]
    assert "parts" not in meta
    proc = check_skeleton(snap_tool, prime)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # snap pack only warns about unknown plugs or missing commands


def _break(prime: Path, how: str) -> None:
    meta_path = prime / "meta" / "snap.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    if how == "unknown plug":
        meta["apps"]["agent"]["plugs"].append("no-such-interface")
    elif how == "missing command":
        meta["apps"]["agent"]["command"] = "bin/not-there"
    elif how == "hook not executable":
        (prime / "meta" / "hooks" / "configure").chmod(0o644)
    elif how == "bad restart condition":
        meta["apps"]["agent"]["restart-condition"] = "sometimes"
    meta_path.write_text(yaml.safe_dump(meta))


@pytest.mark.parametrize(
    "how", ["unknown plug", "missing command", "hook not executable", "bad restart condition"]
)
def test_the_check_catches_a_broken_tree(snap_tool, tmp_path, how):
    """The harness itself: each mistake fails the check (an error, or a stderr warning)."""
    prime = assemble.assemble(tmp_path / "prime", "arm64")
    _break(prime, how)
    proc = check_skeleton(snap_tool, prime)
    assert proc.returncode != 0 or proc.stderr != ""


def _listing(snap: Path) -> list[str]:
    out = subprocess.run(
        ["unsquashfs", "-lls", str(snap)], capture_output=True, text=True, check=True
    ).stdout
    # permissions, owner, path (sizes and times vary)
    rows = [line.split() for line in out.splitlines() if line[:1] in "-dl"]
    return sorted(f"{r[0]} {r[1]} {r[-1] if r[0][0] != 'l' else r[-3]}" for r in rows)


def test_packed_snap_is_what_snapd_makes_root_owned_xz_with_executable_hooks(snap_tool, tmp_path):
    prime = assemble.assemble(tmp_path / "prime", "arm64")
    ours = assemble.pack(prime, tmp_path / "edgeseal_0.1.0_arm64.snap")
    out = tmp_path / "snapd-out"
    out.mkdir()
    proc = subprocess.run(
        [str(snap_tool), "pack", str(prime), str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    theirs = out / "edgeseal_0.1.0_arm64.snap"
    assert theirs.is_file()

    info = subprocess.run(
        ["unsquashfs", "-s", str(ours)], capture_output=True, text=True, check=True
    ).stdout
    assert "Compression xz" in info
    assert "Fragments are not stored" in info
    assert "Xattrs are not stored" in info
    assert ours.read_bytes()[:4] == b"hsqs"

    listing = _listing(ours)
    assert listing == _listing(theirs)
    assert all(" root/root " in f" {row} " for row in listing)
    modes = {row.split()[2]: row.split()[0] for row in listing}
    for path in ("meta/hooks/install", "meta/hooks/configure", "bin/edgeseal-launch"):
        assert modes[f"squashfs-root/{path}"] == "-rwxr-xr-x", path

    packed_meta = subprocess.run(
        ["unsquashfs", "-cat", str(ours), "meta/snap.yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert packed_meta == (prime / "meta" / "snap.yaml").read_text()
