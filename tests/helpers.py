"""Helpers shared by tests: a fixed clock and running the edgeseal command."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

#: A fixed "now" for tests that pack and open: bundles are valid around it.
NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)


def run(*args: str, env: dict[str, str], check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseal.core", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc
