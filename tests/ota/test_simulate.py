"""The fleet simulator: real devices in miniature, faults injected per device, and a
small-scale smoke of the fleet benchmark (group offer, worker processes)."""

from __future__ import annotations

import shutil
import uuid

import pytest

from edgeseal.ota.broker import BrokerSetup, Mosquitto
from edgeseal.ota.controller import Controller
from edgeseal.ota.mqtt import MqttConnection
from edgeseal.ota.rollout import Policy, parse_waves
from edgeseal.ota.rollout_store import open_store
from edgeseal.ota.simulate import FleetSpec, SimFleet, provision_fleet
from ota_world import Workstation, wait_for

pytestmark = pytest.mark.mqtt

FAULTS = {
    "sim-0000": "drop-after-chunks=2",
    "sim-0001": "corrupt-chunk=1",
    "sim-0002": "kill-at=testing",
    "sim-0003": "kill-after-chunks=2",
    "sim-0004": "fail-health",
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, ota_pki):
    root = tmp_path_factory.mktemp("sim-ws")
    ws = Workstation.make(root, [])
    ws.ids = provision_fleet(root / "pristine", 6, ring=ws.ring, ca=ota_pki.ca)
    ws.make_models()
    ws.pack("v1", 1, "m1")
    return ws


def _controller(ws, url, ca_file, cert, key, store):
    signer, certificate = ws.ring.load_signer("deployer")

    def connect(**kw):
        return MqttConnection(url, client_id=f"ctl-{uuid.uuid4().hex[:8]}", ca_file=str(ca_file),
                              cert_file=str(cert), key_file=str(key), clean=True, **kw)  # fmt: skip

    ctl = Controller(open_store(store), connect, signer=signer, certificate=certificate,
                     anchor=ws.ring.anchor())  # fmt: skip
    ctl.start()
    return ctl


def test_every_fault_is_survived_or_reported(ws, broker, ota_pki, tmp_path):
    """Per device: a dropped link and a corrupt chunk are fetched again; a kill while
    testing and a kill mid-download restart the device from its home, which resumes and
    commits; a failed health check is reported as fallen-back; a clean device commits."""
    root = tmp_path / "fleet"
    shutil.copytree(ws.root / "pristine", root)
    spec = FleetSpec(
        root=str(root), broker=broker.url, ca_file=str(ota_pki.ca_file),
        devices=tuple(ws.ids), faults=FAULTS, chunk_timeout=2.0, keepalive=5,
        restart_delay=0.2,
    )  # fmt: skip
    ctl_id = ota_pki["edgeseal-controller"]
    ctl = _controller(ws, broker.url, ota_pki.ca_file, ctl_id.cert, ctl_id.key,
                      tmp_path / "r.sqlite")  # fmt: skip
    with SimFleet(spec).start() as fleet:
        policy = Policy(parse_waves("100%"), max_failure_rate=0.2, wave_timeout=90)
        r = ctl.create(ws.bundles["v1"], group="sim", members=ws.ids, policy=policy,
                       signer_name="deployer", chunk_bytes=8192, group_offer=False)  # fmt: skip
        try:
            final = ctl.run(r.id, poll=0.1)
            phases = {d: p.phase for d, p in ctl.store.phases(r.id).items()}
            assert final.state == "done", (final.reason, phases)
            assert phases["sim-0004"] == "fallen-back"
            assert sum(p == "committed" for p in phases.values()) == 5
            assert fleet.devices["sim-0002"].lives == 2  # killed once, started again
            wait_for(lambda: fleet.devices["sim-0003"].lives == 2, what="the restart")
            for dev in ("sim-0000", "sim-0001"):
                counters = fleet.devices[dev].channel.updater.counters
                assert counters.chunks_received >= 1
            assert fleet.devices["sim-0001"].channel.updater.counters.chunks_dropped >= 1
        finally:
            for dev in ws.ids:
                ctl.conn.publish(ctl.topics.device(dev, "control"), b"", retain=True)
            ctl.stop()


@pytest.mark.slow
def test_scale_smoke_fifty_devices_take_a_group_offer_through_worker_processes(tmp_path, ota_pki):
    """The benchmark's path at 1/20 of its size: 50 devices in 2 worker processes, one
    group offer, every device commits."""
    ws = Workstation.make(tmp_path / "ws", [])
    ids = provision_fleet(tmp_path / "fleet", 50, ring=ws.ring, ca=ota_pki.ca, prefix="s")
    ws.make_models()
    ws.pack("v1", 1, "m1")
    setup = BrokerSetup.write(tmp_path / "broker", ota_pki.ca, groups={"smoke": ids})
    with Mosquitto(setup.settings, tmp_path / "run") as b:
        spec = FleetSpec(root=str(tmp_path / "fleet"), broker=b.url, ca_file=str(setup.ca_file),
                         devices=tuple(ids), groups=("smoke",), keep_serving=False)  # fmt: skip
        ctl = _controller(ws, b.url, setup.ca_file, setup.controller_cert, setup.controller_key,
                          tmp_path / "r.sqlite")  # fmt: skip
        with SimFleet(spec, processes=2).start(wait=120):
            r = ctl.create(ws.bundles["v1"], group="smoke", members=ids,
                           policy=Policy(waves=(1.0,), wave_timeout=120),
                           signer_name="deployer")  # fmt: skip
            assert r.group_offer
            try:
                final = ctl.run(r.id, poll=0.2)
            finally:
                ctl.stop()
        assert final.state == "done", final.reason
        assert ctl.server.chunks_sent >= 50
