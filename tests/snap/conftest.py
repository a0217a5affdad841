"""The snap check's parts: the snap tree assembled from snap/, Debian's ``snap`` tool
(snapd's .deb unpacked, no daemon), and a fake ``snapctl`` for the hooks.

In CI (EDGESEAL_REQUIRE_ALL_LANES=1) a missing tool fails the lane instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "snap" / "local"))

import assemble  # noqa: E402  (snap/local is not a package)

CACHE = Path(os.environ.get("EDGESEAL_CACHE", Path.home() / ".cache" / "edgeseal")) / "snapd"


def missing(what: str) -> None:
    if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
        pytest.fail(f"{what}, but CI requires the snap check")
    pytest.skip(what)


@pytest.fixture(scope="session")
def snap_tool() -> Path:
    """``snap`` from Debian's snapd package: apt-get download + dpkg-deb -x, cached."""
    for tool in ("apt-get", "dpkg-deb", "mksquashfs", "unsquashfs"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (scripts/bootstrap installs squashfs-tools)")
    binary = CACHE / "root" / "usr" / "bin" / "snap"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        CACHE.chmod(0o755)  # apt's _apt user downloads into it
        proc = subprocess.run(
            ["apt-get", "download", "-qq", "snapd"],
            cwd=CACHE,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        debs = sorted(CACHE.glob("snapd_*.deb"))
        if proc.returncode != 0 or not debs:
            pytest.fail(f"apt-get download snapd failed: {proc.stderr}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE / "root")], check=True)
    return binary


def check_skeleton(snap_tool: Path, prime: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(snap_tool), "pack", "--check-skeleton", str(prime)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@dataclass
class HookEnv:
    """A snap tree, its SNAP_COMMON and SNAP_DATA, and a fake snapctl on PATH."""

    prime: Path
    common: Path
    data: Path
    state: Path
    log: Path
    env: dict[str, str]

    def settings(self, **values: object) -> None:
        """Replace every setting (what ``snap set`` would have stored)."""
        doc: dict[str, object] = {}
        for dotted, value in values.items():
            table, key = dotted.split("__", 1)
            doc.setdefault(table, {})[key.replace("_", "-")] = value  # type: ignore[index]
        self.state.write_text(json.dumps(doc))

    def run(self, hook: str, *, active: bool = False) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, FAKE_SNAPCTL_ACTIVE="1" if active else "0")
        return subprocess.run(
            [str(self.prime / "meta" / "hooks" / hook)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    @property
    def config(self) -> Path:
        return self.data / "config.toml"


@pytest.fixture
def hooks(tmp_path: Path) -> Iterator[HookEnv]:
    """The amd64 skeleton with this interpreter as the snap's Python (it has edgeseal)."""
    prime = assemble.assemble(tmp_path / "prime", "amd64")
    (prime / "lib" / "edgeseal" / "python").write_text("python3\n")
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    snapctl = bindir / "snapctl"
    shutil.copyfile(REPO / "tests" / "snap" / "fake_snapctl.py", snapctl)
    snapctl.chmod(0o755)
    # The launcher runs $EDGESEAL_PYTHON_DIR/$(cat lib/edgeseal/python) (default
    # /usr/bin, the base's); here that is this test's interpreter, which has edgeseal.
    usr_bin = tmp_path / "usr-bin"
    usr_bin.mkdir()
    (usr_bin / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (usr_bin / "python3").chmod(0o755)
    common, data = tmp_path / "common", tmp_path / "data"
    common.mkdir()
    data.mkdir()
    env = {
        "PATH": f"{bindir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "SNAP": str(prime),
        "SNAP_COMMON": str(common),
        "SNAP_DATA": str(data),
        "SNAP_NAME": "edgeseal",
        "SNAP_INSTANCE_NAME": "edgeseal",
        "EDGESEAL_PYTHON_DIR": str(usr_bin),
        "FAKE_SNAPCTL_STATE": str(tmp_path / "snapctl.json"),
        "FAKE_SNAPCTL_LOG": str(tmp_path / "snapctl.log"),
    }
    yield HookEnv(prime, common, data, tmp_path / "snapctl.json", tmp_path / "snapctl.log", env)
