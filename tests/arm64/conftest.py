"""The arm64 lane: a Debian arm64 sysroot (cross/sysroot, cached under ~/.cache/edgeseal)
and commands run in it as aarch64 under qemu (cross/run).

Needs root, qemu-user-static and debootstrap (scripts/bootstrap installs them) and
network access to Debian and PyPI the first time. In CI (EDGESEAL_REQUIRE_ALL_LANES=1)
anything missing fails the lane instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CROSS = REPO / "cross"
#: The checkout's sources as the emulated Python sees them (bound at /src).
GUEST_PYTHONPATH = ":".join(
    [f"/src/{m}/src" for m in ("core", "hardware", "agent", "ota")] + ["/opt/site"]
)


def missing(what: str) -> None:
    if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
        pytest.fail(f"{what}, but CI requires the arm64 lane")
    pytest.skip(what)


def host_env() -> dict[str, str]:
    """The cross/ scripts use this interpreter's pip and pip-audit."""
    env = dict(os.environ)
    env["EDGESEAL_HOST_PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def arm64_sysroot() -> Path:
    if os.geteuid() != 0:
        missing("the arm64 lane needs root (the sysroot keeps owners; namespaces)")
    for tool in ("qemu-aarch64-static", "debootstrap", "dpkg-deb", "unshare"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (scripts/bootstrap installs it)")
    proc = subprocess.run(
        [str(CROSS / "sysroot")],
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"cross/sysroot failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def run_arm64(
    sysroot: Path,
    *cmd: str,
    binds: dict[Path, str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``cmd`` as aarch64 in the sysroot; ``binds`` maps host dirs to guest paths."""
    args = [str(CROSS / "run"), "--sysroot", str(sysroot)]
    for host, guest in binds.items():
        args += ["--bind", f"{host}:{guest}"]
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    proc = subprocess.run(
        [*args, "--", *cmd],
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    return proc
