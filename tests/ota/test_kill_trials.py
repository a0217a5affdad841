"""Kill -9 during an update, at every state and at random moments, many times: after a
restart the device always serves a valid model, and the journal agrees with the slots.

Each trial starts from a device serving v1 and offers v2 (retained, so a device killed
before it saw the offer sees it again). A forkserver, with the agent's imports preloaded,
starts each device process in milliseconds; the kill is a real SIGKILL of that process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.core.reader import BundleFile, VerifyPolicy
from ota_world import FleetSide, Workstation, copy_home, device_child, device_config

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

#: Kills at random moments (the per-state kills are in test_device_update.py).
RANDOM_TRIALS = int(os.environ.get("EDGESEAL_KILL_TRIALS", "200"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = Workstation.make(tmp_path_factory.mktemp("kill-ws"), ["dev-a"])
    ws.make_models()
    ws.pack("v1", 1, "m1")
    ws.pack("v2", 2, "m2")
    return ws


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ota_world", "onnxruntime", "edgeseal.ota.channel"])
    return ctx


def _journal_agrees_with_slots(home: Path, anchor) -> str:
    """The journal's active and fallback slots are whole, verified bundles of the versions
    it names; nothing is staged at rest."""
    journal = json.loads((home / "models" / "clf" / "journal.json").read_bytes())
    for role in ("active", "fallback"):
        slot = journal[role]
        if slot is None:
            continue
        info = journal["slots"][slot]
        with BundleFile.open(home / "models" / "clf" / f"slot-{slot}.esb") as bf:
            m = bf.verify(VerifyPolicy(anchor=anchor, now=None)).manifest
        assert (m.version, m.bundle_id) == (info["version"], info["bundle_id"]), role
    return journal["channel"].get("state", "idle")


def _run(ctx, *args) -> int:
    p = ctx.Process(target=device_child, args=args)
    p.start()
    p.join(90)
    assert p.exitcode is not None, "device process hung"
    return p.exitcode


def test_kill_9_at_random_moments_never_leaves_a_device_broken(
    ws, broker, ota_pki, forkserver, tmp_path
):
    ctl = ota_pki["edgeseal-controller"]
    fleet = FleetSide(ws, broker, ota_pki.ca_file, ctl.cert, ctl.key)
    ident = ota_pki["dev-a"]
    template = copy_home(ws, "dev-a", tmp_path / "template")
    text = device_config(template, broker, ota_pki.ca_file, ident.cert, ident.key, "dev-a")
    agent = Agent(DeviceHome(template), load_config(text=text))
    agent.install(ws.bundles["v1"])
    agent.close()
    anchor = ws.ring.anchor()
    rng = random.Random(20261129)
    killed_in: Counter[str] = Counter()
    out = tmp_path / "result.json"
    try:
        # A clean update first: how long one takes, so kills land across all of it.
        home = tmp_path / "clean"
        shutil.copytree(template, home)
        fleet.offer("v2", retain=True)
        assert _run(forkserver, str(home), text, 0.0, 2, str(out)) == 0
        clean = json.loads(out.read_text())
        assert clean["serving"] == 2
        # Kills land from just before the update begins to just after it ends.
        first, last = max(clean["t_update"] - 0.05, 0.01), clean["t_done"] + 0.05
        span = last - first
        t_trials = time.monotonic()
        for trial in range(RANDOM_TRIALS):
            home = tmp_path / f"trial-{trial}"
            shutil.copytree(template, home)
            fleet.offer("v2", retain=True)  # a new sequence number, the same bundle
            kill_after = rng.uniform(first, last)
            assert _run(forkserver, str(home), text, kill_after, 2, str(out)) == -signal.SIGKILL
            killed_in[_journal_agrees_with_slots(home, anchor)] += 1
            out.unlink(missing_ok=True)
            assert _run(forkserver, str(home), text, 0.0, 2, str(out)) == 0
            result = json.loads(out.read_text())
            assert result["serving"] == 2 and result["state"] == "committed", result
            assert result["golden"] == [], result
            assert _journal_agrees_with_slots(home, anchor) == "committed"
            assert not any((home / "ota" / "incoming").iterdir())
            shutil.rmtree(home)
    finally:
        fleet.send(b"", ("device", "dev-a"), retain=True)
        fleet.close()
    took = time.monotonic() - t_trials
    print(
        f"\nkill trials: {RANDOM_TRIALS} in {took:.0f} s, clean update {span:.2f} s, "
        f"killed in state: {dict(killed_in)}"
    )
    assert len(killed_in) >= 3, killed_in  # the kills spread over the update's states
