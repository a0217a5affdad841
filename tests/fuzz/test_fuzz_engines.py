"""Each fuzz target runs for a bounded time (EDGESEAL_FUZZ_SECONDS, default 30 s each;
the lane takes about 4 minutes). atheris drives them where it is installed (x86_64);
elsewhere the pure-Python mutational engine in run.py does. A finding fails the test and
names the input to keep under tests/fuzz/regressions/<target>/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

RUN = Path(__file__).with_name("run.py")
SECONDS = float(os.environ.get("EDGESEAL_FUZZ_SECONDS", "30"))


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_for_a_bounded_time(target, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RUN), target, "--seconds", str(SECONDS), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=SECONDS + 240,
    )
    assert proc.returncode == 0, (
        f"fuzz finding in {target}:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"fuzz {target}: {summary}")
    assert summary.get("executions", 0) > 0
