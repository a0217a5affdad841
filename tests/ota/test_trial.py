"""The offer's trial window: after the health check the candidate shadows the serving
model on live traffic, and is committed only if it saw enough requests with error and
OOD rates within the signed thresholds. Real broker, in-process device."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from edgeseal.agent.service import Agent, ShadowStats
from edgeseal.ota.decide import STATES, trial_verdict
from edgeseal.ota.messages import OtaMessageError, Trial
from ota_world import InProcessDevice, wait_for

TRIAL = {"seconds": 2, "max_error_rate": 0.05, "max_ood_rate": 0.2, "min_requests": 10}


def _serving(dev: InProcessDevice) -> int | None:
    sm = dev.agent.serving.get("clf")
    return sm.identity["version"] if sm else None


def _settled(fleet_side: Any, version: int) -> str | None:
    st = fleet_side.model_status("dev-a")
    if st.get("offered") == version and st.get("state") in ("committed", "fallen-back"):
        return str(st["state"])
    return None


@contextmanager
def _traffic(agent: Agent, x: np.ndarray, every: float = 0.01) -> Iterator[list[int]]:
    """Call the agent's model in a loop on a thread, as an application would."""
    stop = threading.Event()
    done = [0]

    def run() -> None:
        while not stop.is_set():
            agent.infer("clf", {"input": x})
            done[0] += 1
            time.sleep(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join(5)


def _trial_on_v2(fleet_side: Any, device: Any, traffic: np.ndarray | None) -> Any:
    dev = device()
    fleet_side.offer("v1")
    wait_for(lambda: _settled(fleet_side, 1) == "committed", what="v1 committed")
    fleet_side.offer("v2", trial=TRIAL)
    wait_for(lambda: fleet_side.state("dev-a") == "trial", timeout=30, what="the trial")
    if traffic is None:
        time.sleep(TRIAL["seconds"])
        wait_for(lambda: _settled(fleet_side, 2), timeout=10, what="the trial's verdict")
    else:
        with _traffic(dev.agent, traffic) as done:
            wait_for(lambda: _settled(fleet_side, 2), timeout=10, what="the trial's verdict")
        assert done[0] > TRIAL["min_requests"]
    return dev


def _trial_event(fleet_side: Any) -> dict[str, Any]:
    events = [e for e in fleet_side.events_of("dev-a") if e.get("event") == "trial"]
    assert len(events) == 1
    return events[0]


@pytest.mark.mqtt
def test_a_trial_on_in_distribution_traffic_commits(fleet_side, device, ws):
    dev = _trial_on_v2(fleet_side, device, ws.x)
    st = fleet_side.model_status("dev-a")
    assert st["state"] == "committed" and (st["active"], st["fallback"]) == (2, 1)
    assert _serving(dev) == 2
    trial = st["trial"]
    assert trial["passed"] is True and trial["window"]["seconds"] == 2
    stats = trial["stats"]
    assert stats["requests"] >= TRIAL["min_requests"] and stats["errors"] == 0
    assert stats["ood_rate"] <= TRIAL["max_ood_rate"]
    assert stats["rows"] == 4 * stats["requests"] and stats["compared_rows"] == stats["rows"]
    ev = _trial_event(fleet_side)
    assert ev["passed"] and ev["version"] == 2 and ev["stats"]["requests"] == stats["requests"]
    steps = [e["to"] for e in fleet_side.events_of("dev-a") if e.get("event") == "transition"]
    assert steps[-3:] == ["testing", "trial", "committed"]
    assert dev.agent.shadow_stats("clf") is None  # the shadow is gone
    assert dev.agent.infer("clf", {"input": ws.x}).model["version"] == 2


@pytest.mark.mqtt
def test_a_trial_on_out_of_distribution_traffic_falls_back(fleet_side, device, ws):
    # Three times the test inputs: inside the calibrated range (so the serving model
    # answers) but far from the calibration data, so nearly every row scores as OOD.
    dev = _trial_on_v2(fleet_side, device, (ws.x * 3).astype(np.float32))
    st = fleet_side.model_status("dev-a")
    assert st["state"] == "fallen-back" and st["reason"].startswith("trial: OOD rate")
    assert (st["active"], st["fallback"]) == (1, None)
    assert _serving(dev) == 1 and dev.agent.store.journal("clf").staged is None
    stats = st["trial"]["stats"]
    assert st["trial"]["passed"] is False and stats["ood_rate"] > TRIAL["max_ood_rate"]
    assert stats["errors"] == 0 and stats["requests"] >= TRIAL["min_requests"]
    assert not _trial_event(fleet_side)["passed"]
    assert dev.agent.infer("clf", {"input": ws.x}).model["version"] == 1


@pytest.mark.mqtt
def test_a_trial_with_too_little_traffic_falls_back(fleet_side, device, ws):
    dev = _trial_on_v2(fleet_side, device, None)
    st = fleet_side.model_status("dev-a")
    assert st["state"] == "fallen-back" and "too little traffic" in st["reason"]
    assert st["trial"]["stats"]["requests"] == 0
    assert _serving(dev) == 1 and dev.agent.store.journal("clf").staged is None


@pytest.mark.mqtt
def test_a_trial_cut_short_by_a_restart_runs_again(fleet_side, device, ws):
    dev = device()
    home = dev.agent.home.path
    fleet_side.offer("v1")
    wait_for(lambda: _settled(fleet_side, 1) == "committed", what="v1 committed")
    fleet_side.offer("v2", trial=TRIAL)
    wait_for(lambda: fleet_side.state("dev-a") == "trial", timeout=30, what="the trial")
    dev.stop()  # the trial's figures are lost with the process; the state is not
    assert dev.agent.store.journal("clf").channel["state"] == "trial"
    dev = device(home=home)
    wait_for(lambda: dev.channel.status()["models"]["clf"]["state"] == "trial", what="again")
    assert _serving(dev) == 1
    with _traffic(dev.agent, ws.x):
        wait_for(lambda: _settled(fleet_side, 2), timeout=10, what="the trial's verdict")
    assert fleet_side.state("dev-a") == "committed" and _serving(dev) == 2


@pytest.mark.mqtt
def test_a_first_install_with_a_trial_commits_after_its_health_check(fleet_side, device):
    dev = device()
    fleet_side.offer("v1", trial=TRIAL)
    wait_for(lambda: _settled(fleet_side, 1), what="v1 settled")
    assert fleet_side.state("dev-a") == "committed" and _serving(dev) == 1


# --- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {**TRIAL, "seconds": 0},
        {**TRIAL, "seconds": float("inf")},
        {**TRIAL, "max_error_rate": 1.5},
        {**TRIAL, "max_ood_rate": -0.1},
        {**TRIAL, "max_ood_rate": True},
        {**TRIAL, "min_requests": 2.5},
        {**TRIAL, "min_requests": -1},
        {**TRIAL, "extra": 1},
        {k: v for k, v in TRIAL.items() if k != "seconds"},
        [2, 0.1, 0.1, 1],
    ],
)
def test_a_malformed_trial_is_refused(bad):
    with pytest.raises(OtaMessageError):
        Trial.from_obj(bad)


def test_the_trial_verdict():
    trial = Trial.from_obj(TRIAL)
    assert "trial" in STATES
    ok = ShadowStats(seen=20, requests=20, rows=80, ood_rows=4).to_obj()
    assert trial_verdict(trial, ok) == ""
    assert "too little traffic" in trial_verdict(trial, ShadowStats(requests=3).to_obj())
    errs = ShadowStats(requests=20, errors=2, rows=72).to_obj()
    assert trial_verdict(trial, errs).startswith("trial: error rate 0.1000")
    ood = ShadowStats(requests=20, rows=80, ood_rows=40).to_obj()
    assert trial_verdict(trial, ood).startswith("trial: OOD rate 0.5000")
