"""The README's tour is scripts/tour, run here, so no line of it can drift (issue 20).

Timeline of ``test_the_tour_runs_as_written``: scripts/tour makes a temp folder with its
own HOME, XDG folders and EDGESEAL_* variables, trains a small classifier, then runs the
tour's lines: a passphrase-protected root and signer, a provisioned device, a pack with
the accuracy gate, inspect, verify, one inference, the daemon serving it, the audit log,
a fleet CA, enrollment, a real Mosquitto on 127.0.0.1:8883, 8 simulated devices and a
rollout in waves that commits on all of them; then it stops everything and removes the
folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOUR = REPO / "scripts" / "tour"
README = REPO / "README.md"


def _readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- tour:begin[^>]*-->\n```bash\n(.*?)```\n<!-- tour:end -->", text, re.S)
    assert m, "README.md lost its <!-- tour:begin --> ```bash ... ``` <!-- tour:end --> block"
    return m.group(1)


def test_the_readme_tour_is_the_script_body() -> None:
    printed = subprocess.run(
        [str(TOUR), "--print-readme"], capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip(), "scripts/tour has no lines between # tour:begin and # tour:end"
    assert _readme_block() == printed, (
        "the README's tour and scripts/tour differ: edit the script, then paste "
        "`scripts/tour --print-readme` between the README's tour markers"
    )


@pytest.mark.slow
@pytest.mark.mqtt
def test_the_tour_runs_as_written() -> None:
    if shutil.which("mosquitto") is None:
        if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
            pytest.fail("mosquitto is not installed but CI requires this lane")
        pytest.skip("mosquitto is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESEAL_")}
    # The system temp folder, not tmp_path: root's Mosquitto runs as user mosquitto, which
    # cannot enter pytest's 0700 folders.
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("edgeseal-tour.*"))
    proc = subprocess.run(
        [str(TOUR)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # What the tour promises, in the order it promises it.
    for promise in (
        r"gate passed",  # pack's accuracy gate
        r"golden vectors reproduced",  # the device's own inference
        r"answered by vision-det v3",  # the same through the daemon
        r"audit log intact",
        r"8 of 8 devices committed v4, 0 failed",  # the rollout
        r"tour complete",
    ):
        assert re.search(promise, out), f"the tour did not print {promise!r}:\n{out[-6000:]}"
    assert set(temp.glob("edgeseal-tour.*")) <= before, "scripts/tour left its folder behind"
