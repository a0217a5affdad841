"""The device side of OTA against a real Mosquitto (TLS, ACLs): offers, resumable chunked
delivery, staging, the health check, commit or fall-back, orders, refusals, crashes."""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from edgeseal.agent.device import DeviceHome
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.core.encoding import b64d, b64e, canonical_json, utcnow
from edgeseal.ota.updater import Faults
from ota_world import (
    InProcessDevice,
    copy_home,
    start_daemon,
    wait_for,
)

pytestmark = pytest.mark.mqtt


def _serving(dev: InProcessDevice) -> int | None:
    sm = dev.agent.serving.get("clf")
    return sm.identity["version"] if sm else None


def _install(fleet_side, key: str, dev: InProcessDevice, state: str = "committed", **kw):
    fleet_side.offer(key, **kw)
    version = int(key[1])
    wait_for(
        lambda: (
            fleet_side.state("dev-a") == state
            and fleet_side.model_status("dev-a").get("offered") == version
        ),
        what=f"{key} to reach {state}",
    )


def _snapshot(dev: InProcessDevice) -> tuple[object, ...]:
    store = dev.agent.store
    j = store.journal("clf")
    return (j.active, j.fallback, j.slots, store.floors.get("clf"), _serving(dev))


def test_an_offer_is_downloaded_staged_checked_and_committed(fleet_side, device, ws):
    dev = device()
    _install(fleet_side, "v1", dev)
    _install(fleet_side, "v2", dev)
    assert _serving(dev) == 2
    st = fleet_side.model_status("dev-a")
    assert (st["active"], st["fallback"], st["floor"]) == (2, 1, 1)
    steps = [e["to"] for e in fleet_side.events_of("dev-a") if e.get("event") == "transition"][-5:]
    assert steps == ["downloading", "verifying", "staged", "testing", "committed"]
    status = fleet_side.status["dev-a"]
    assert status["counters"]["bytes_received"] >= fleet_side.offers["v2"].size
    assert status["key_store"] == "software" and "audit_head" in status
    result = dev.agent.infer("clf", {"input": ws.x})
    assert result.model["version"] == 2


def test_mqtt_3_1_1_devices_update_too(fleet_side, device):
    dev = device(protocol="3.1.1")
    _install(fleet_side, "v1", dev)
    assert _serving(dev) == 1


def test_a_model_failing_its_golden_check_is_not_committed(fleet_side, device):
    dev = device()
    _install(fleet_side, "v2", dev)
    fleet_side.offer("v3-bad")
    wait_for(lambda: fleet_side.state("dev-a") == "fallen-back", what="health failure")
    st = fleet_side.model_status("dev-a")
    assert "golden" in st["reason"] and st["active"] == 2
    assert _serving(dev) == 2 and dev.agent.store.journal("clf").staged is None
    assert not list((dev.agent.home.path / "ota" / "incoming").iterdir())


def test_a_failed_health_check_leaves_serving_unchanged(fleet_side, device):
    dev = device(faults=Faults(fail_health=True))
    _install(fleet_side, "v1", dev, state="fallen-back")
    assert _serving(dev) is None  # nothing was committed: there was nothing before either
    assert dev.agent.store.journal("clf").active is None


def test_a_quarantine_order_after_commit_falls_back(fleet_side, device):
    dev = device()
    _install(fleet_side, "v1", dev)
    _install(fleet_side, "v2", dev)
    fleet_side.order("quarantine", "v2", reason="bad answers in the field")
    wait_for(lambda: _serving(dev) == 1, what="fall-back to v1")
    wait_for(lambda: fleet_side.state("dev-a") == "fallen-back", what="fallen-back status")
    j = dev.agent.store.journal("clf")
    assert j.slots[j.active].version == 1 and j.fallback is None


def test_a_fall_back_order_returns_to_the_fallback_slot_and_a_late_one_is_ignored(
    fleet_side, device
):
    dev = device()
    _install(fleet_side, "v1", dev)
    _install(fleet_side, "v2", dev)
    late = fleet_side.order("fall-back", "v1")  # about v1, which is not active: stale
    fleet_side.order("fall-back", "v2", reason="operator")
    wait_for(lambda: _serving(dev) == 1, what="fall-back")
    fleet_side.send(late, ("device", "dev-a"))
    _install(fleet_side, "v3", dev)
    assert _serving(dev) == 3


def test_a_fall_back_order_during_the_download_stops_the_update_for_good(fleet_side, device):
    """A halted rollout orders back a device still downloading: the download and its
    partial file go, v1 keeps serving, and chunks that arrive later install nothing."""
    dev = device()
    _install(fleet_side, "v1", dev)
    fleet_side.offer("v2", serve=False)
    wait_for(lambda: fleet_side.state("dev-a") == "downloading", what="the download to start")
    incoming = dev.agent.home.path / "ota" / "incoming"
    assert list(incoming.iterdir())
    fleet_side.order("fall-back", "v2", reason="rollout r-1 halted")
    wait_for(lambda: fleet_side.state("dev-a") == "fallen-back", what="the update to stop")
    st = fleet_side.model_status("dev-a")
    assert st["active"] == 1 and "rollout r-1 halted" in st["reason"], st
    assert not list(incoming.iterdir()) and dev.channel.updater.download is None
    fleet_side.serve("v2")
    time.sleep(2)  # time for chunks a live download would take
    assert _serving(dev) == 1 and fleet_side.state("dev-a") == "fallen-back"
    _install(fleet_side, "v3", dev)
    assert _serving(dev) == 3


def test_finalize_raises_the_floor_and_releases_the_fallback(fleet_side, device):
    dev = device()
    _install(fleet_side, "v1", dev)
    _install(fleet_side, "v2", dev)
    assert dev.agent.store.floors.get("clf") == 1
    fleet_side.order("finalize", "v2")
    wait_for(lambda: dev.agent.store.floors.get("clf") == 2, what="floor at 2")
    assert dev.agent.store.journal("clf").fallback is None


def test_probation_passed_finalizes_by_itself(fleet_side, device):
    dev = device(probation_seconds=1)
    _install(fleet_side, "v1", dev)
    _install(fleet_side, "v2", dev)
    wait_for(lambda: dev.agent.store.floors.get("clf") == 2, what="probation to end")


def test_duplicated_messages_install_once(fleet_side, device):
    dev = device()
    wire = fleet_side.offer("v1")
    for _ in range(3):
        fleet_side.send(wire, ("device", "dev-a"))
    wait_for(lambda: fleet_side.state("dev-a") == "committed", what="commit")
    wait_for(lambda: dev.agent.status()["models"], what="serving")
    transitions = [e for e in fleet_side.events_of("dev-a") if e.get("to") == "committed"]
    assert len(transitions) == 1


def test_a_retained_group_offer_reaches_a_device_that_connects_later(fleet_side, device):
    fleet_side.offer("v1", to=("group", "lab"), retain=True)
    try:
        dev = device()
        wait_for(lambda: _serving(dev) == 1, what="group offer install")
    finally:
        fleet_side.send(b"", ("group", "lab"), retain=True)  # clear the retained offer


@pytest.mark.parametrize("case", ["replay", "forged", "expired", "downgrade", "other-device"])
def test_bad_offers_are_refused_reported_and_change_nothing(fleet_side, device, case):
    dev = device()
    _install(fleet_side, "v2", dev)
    before = _snapshot(dev)
    refusals = len([e for e in fleet_side.events_of("dev-a") if e.get("event") == "refused"])
    if case == "replay":
        fleet_side.offer("v3", seq=1)
    elif case == "forged":
        wire = json.loads(fleet_side.offer("v1", to=("device", "nobody")))
        payload = json.loads(b64d(wire["envelope"]["payload"], "payload"))
        payload["to"] = {"device": "dev-a"}
        payload["version"] = 3
        wire["envelope"]["payload"] = b64e(canonical_json(payload))
        fleet_side.send(canonical_json(wire), ("device", "dev-a"))
    elif case == "expired":
        fleet_side.offer("v3", now=utcnow() - timedelta(days=8))
    elif case == "downgrade":
        fleet_side.offer("v1")
    else:
        fleet_side.offer("v3", to=("device", "dev-b"))
        fleet_side.send(fleet_side.offer("v3", to=("device", "dev-b")), ("device", "dev-a"))
    wait_for(
        lambda: (
            len([e for e in fleet_side.events_of("dev-a") if e.get("event") == "refused"])
            > refusals
        ),
        what="a refusal report",
    )
    assert _snapshot(dev) == before
    # The status with the count follows the event (the device reports after it publishes)
    wait_for(
        lambda: fleet_side.status["dev-a"]["counters"]["messages_refused"] >= 1,
        what="the refusal counted in the device's status",
    )


def test_a_corrupted_chunk_is_dropped_and_fetched_again(fleet_side, device):
    dev = device(faults=Faults(corrupt_chunk=2))
    _install(fleet_side, "v1", dev)
    assert fleet_side.status["dev-a"]["counters"]["chunks_dropped"] >= 1


def test_a_download_resumes_after_the_connection_drops(fleet_side, device):
    dev = device(faults=Faults(drop_after_chunks=3))
    _install(fleet_side, "v1", dev)
    assert _serving(dev) == 1


def test_a_download_resumes_after_the_device_process_is_killed(
    fleet_side, dev_config, ws, tmp_path
):
    home = copy_home(ws, "dev-a", tmp_path / "home")
    _, config = dev_config(home, window=1)
    proc = start_daemon(home, config, faults="kill-after-chunks=3")
    try:
        wait_for(lambda: "dev-a" in fleet_side.status, what="the device online")
        fleet_side.offer("v2")
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        proc.kill()
    proc = start_daemon(home, config)
    try:
        wait_for(lambda: fleet_side.model_status("dev-a").get("active") == 2, what="resumed")
        counters = fleet_side.status["dev-a"]["counters"]
        total = len(fleet_side.offers["v2"].chunks)
        assert counters["chunks_received"] == total - 3  # the 3 on disk were kept
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    served: list[str]

    def do_GET(self) -> None:
        data = (self.root / self.path.lstrip("/")).read_bytes()
        start, end = self.headers["Range"].removeprefix("bytes=").split("-")
        piece = data[int(start) : int(end) + 1]
        self.served.append(self.headers["Range"])
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(piece)))
        self.end_headers()
        self.wfile.write(piece)

    def log_message(self, *args: object) -> None:
        pass


def test_an_offer_with_a_url_downloads_over_http_ranges(fleet_side, device, ws):
    handler = type("H", (_RangeHandler,), {"root": ws.root, "served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dev = device()
        url = f"http://127.0.0.1:{server.server_port}/v1.esb"
        _install(fleet_side, "v1", dev, url=url)
        assert _serving(dev) == 1 and handler.served
        assert fleet_side.server.chunks_sent == 0
    finally:
        server.shutdown()


# --- kill -9 at every state: a real `edgeseal agent run` process ------------------------

STATES = ["downloading", "verifying", "staged", "testing", "committed"]


@pytest.mark.slow
@pytest.mark.parametrize("state", STATES)
def test_kill_9_at_every_state_leaves_a_valid_model_and_a_true_journal(
    fleet_side, dev_config, ws, tmp_path, state
):
    home = copy_home(ws, "dev-a", tmp_path / "home")
    _, config = dev_config(home)
    # v1 installed first (directly, as `agent install` would), so there is always
    # something to serve.
    agent = Agent(DeviceHome(home), load_config(config))
    try:
        agent.install(ws.bundles["v1"])
    finally:
        agent.close()
    fleet_side.status.pop("dev-a", None)
    proc = start_daemon(home, config, faults=f"kill-at={state}")
    wait_for(lambda: "dev-a" in fleet_side.status, what="the device online")
    fleet_side.offer("v2")
    assert proc.wait(60) == -signal.SIGKILL
    proc = start_daemon(home, config)
    try:
        wait_for(
            lambda: (
                fleet_side.model_status("dev-a").get("active") == 2
                and fleet_side.state("dev-a") == "committed"
            ),
            what=f"recovery from a kill at {state}",
        )
        journal = json.loads((home / "models" / "clf" / "journal.json").read_bytes())
        active = journal["slots"][journal["active"]]
        assert active["version"] == 2 and active["state"] == "good"
        assert journal["staged"] is None
        assert not any((home / "ota" / "incoming").iterdir())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
