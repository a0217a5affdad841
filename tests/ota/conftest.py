"""OTA fixtures: a fleet CA, TLS identities, a real Mosquitto on loopback, MQTT probes.

Identities (certificates from one fleet CA): devices ``dev-a`` and ``dev-b`` and the
controller; groups ``lab`` = [dev-a, dev-b] and ``north`` = [dev-a]. Mosquitto comes from
Debian; in CI (EDGESEAL_REQUIRE_ALL_LANES=1) a missing broker fails instead of skipping.

- ``ota_pki`` (session): the CA, the identities and a broker directory (conf, ACL, certs);
- ``broker`` (module): a running Mosquitto with TLS and the ACL, shared by a module's tests;
- ``start_broker(**overrides)`` / ``fresh_broker`` (function): a broker of the test's own,
  with persistence, for tests that restart or reload it;
- ``mqtt_client(broker, "dev-a", protocol="5")``: a connected :class:`Probe`, closed after.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeseal.ota.broker import BrokerSetup, Mosquitto, mosquitto_version
from edgeseal.ota.enroll import CONTROLLER, FleetCA, make_csr
from edgeseal.ota.topics import Topics
from edgeseal.ota.updater import Faults
from ota_world import FleetSide, InProcessDevice, Workstation, copy_home, device_config

DEVICES = ("dev-a", "dev-b")
GROUPS: dict[str, tuple[str, ...]] = {"lab": ("dev-a", "dev-b"), "north": ("dev-a",)}
TOPICS = Topics()
#: How long a test waits to be sure a message is *not* delivered.
QUIET = 0.4
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


@dataclass(frozen=True)
class Identity:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class OtaPki:
    root: Path
    ca: FleetCA
    setup: BrokerSetup
    identities: dict[str, Identity]

    @property
    def ca_file(self) -> Path:
        return self.setup.ca_file

    def __getitem__(self, name: str) -> Identity:
        return self.identities[name]


def _missing(what: str) -> None:
    if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
        pytest.fail(f"{what} is not installed but CI requires this lane")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="session")
def ota_pki(tmp_path_factory: pytest.TempPathFactory) -> OtaPki:
    root = tmp_path_factory.mktemp("ota-pki")
    ca = FleetCA.init(root / "fleet-ca")
    setup = BrokerSetup.write(root / "broker", ca, groups=GROUPS, topics=TOPICS)
    ids = {CONTROLLER: Identity(CONTROLLER, setup.controller_cert, setup.controller_key)}
    for dev in DEVICES:
        key = root / dev / "tls.key"
        key.parent.mkdir()
        cert = root / dev / "tls.pem"
        cert.write_bytes(ca.issue_device(make_csr(dev, key), expected_id=dev))
        ids[dev] = Identity(dev, cert, key)
    return OtaPki(root, ca, setup, ids)


def _require_mosquitto() -> None:
    if mosquitto_version() is None:
        _missing("mosquitto")


@pytest.fixture(scope="module")
def broker(ota_pki: OtaPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    _require_mosquitto()
    work = tmp_path_factory.mktemp("broker")
    settings = replace(ota_pki.setup.settings, persistence_dir=None)
    with Mosquitto(settings, work) as b:
        yield b


@pytest.fixture
def start_broker(ota_pki: OtaPki, tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """``start_broker(**settings overrides)``: a running broker of this test's own, with
    persistence in tmp_path; stopped after the test."""
    _require_mosquitto()
    started: list[Mosquitto] = []

    def start(**overrides: object) -> Mosquitto:
        work = tmp_path / f"broker-{len(started)}"
        work.mkdir()
        opts: dict[str, object] = {"persistence_dir": work / "data", **overrides}
        b = Mosquitto(replace(ota_pki.setup.settings, **opts), work)  # type: ignore[arg-type]
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def fresh_broker(start_broker: Callable[..., Mosquitto]) -> Mosquitto:
    return start_broker()


class Probe:
    """A paho client that records what it receives, with blocking subscribe and publish."""

    def __init__(self, client: mqtt.Client, name: str) -> None:
        self.client = client
        self.name = name
        self._lock = threading.Condition()
        self._messages: list[mqtt.MQTTMessage] = []
        self._subacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self.connected = False
        self.connect_rc: int | None = None
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._lock:
            self.connect_rc = rc.value
            self.connected = not rc.is_failure
            self._lock.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._lock:
            if self.connect_rc is None:
                self.connect_rc = -1  # dropped before a CONNACK: refused (e.g. TLS alert)
            self.connected = False
            self._lock.notify_all()

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._on_disconnect(client, userdata, mqtt.DisconnectFlags(False), ReasonCode(2), None)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append(msg)
            self._lock.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        rcs: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        with self._lock:
            self._subacks[mid] = [rc.value for rc in rcs]
            self._lock.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._lock:
            self._pubacks[mid] = rc.value
            self._lock.notify_all()

    def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(done, timeout)

    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self._wait(lambda: self.connect_rc is not None, timeout) and self.connected

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and return the SUBACK's reason codes (>= 0x80: refused)."""
        rc, mid = self.client.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        assert self._wait(lambda: mid in self._subacks, timeout), f"no SUBACK for {topic}"
        return self._subacks[mid]

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> int:
        """Publish and wait for the PUBACK; its reason code (v3.1.1 always reports 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert self._wait(lambda: info.mid in self._pubacks, timeout), f"no PUBACK for {topic}"
        return self._pubacks[info.mid]

    def messages(self, topic: str | None = None) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_message(self, topic: str, timeout: float = 5.0) -> mqtt.MQTTMessage:
        assert self._wait(lambda: bool(self.messages(topic)), timeout), f"nothing on {topic}"
        return self.messages(topic)[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_client(
    broker: Mosquitto,
    ca_file: Path,
    identity: Identity | None,
    *,
    protocol: str = "5",
    client_id: str | None = None,
    persistent: bool = False,
) -> Probe:
    """A probe that has started connecting (TLS; a client certificate unless ``identity`` is
    None). Call ``wait_connected()``. ``persistent``: keep the session (and the messages
    queued for it) across disconnects, for the given ``client_id``."""
    name = identity.name if identity else "anonymous"
    v5 = protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{name}-{time.monotonic_ns()}",
        protocol=PROTOCOLS[protocol],
        clean_session=None if v5 else not persistent,
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    client.tls_set_context(ctx)
    client.reconnect_delay_set(60, 60)  # a refused probe must not retry during the test
    probe = Probe(client, name)
    props: Properties | None = None
    if v5 and persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    try:
        client.connect(
            broker.host,
            broker.port,
            keepalive=30,
            clean_start=not persistent if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
    except (OSError, ssl.SSLError):
        probe.connect_rc = -1
        return probe
    client.loop_start()
    return probe


@pytest.fixture
def mqtt_client(ota_pki: OtaPki) -> Iterator[Callable[..., Probe]]:
    """``mqtt_client(broker, "dev-a", protocol="5", client_id=None, persistent=False)``:
    a connected probe, closed after the test."""
    probes: list[Probe] = []

    def connect(
        broker: Mosquitto,
        name: str,
        *,
        protocol: str = "5",
        client_id: str | None = None,
        persistent: bool = False,
    ) -> Probe:
        probe = make_client(
            broker,
            ota_pki.ca_file,
            ota_pki[name],
            protocol=protocol,
            client_id=client_id,
            persistent=persistent,
        )
        probes.append(probe)
        assert probe.wait_connected(), f"{name} could not connect (rc {probe.connect_rc})"
        return probe

    yield connect
    for p in probes:
        p.close()


# --- devices driven end to end (tests/ota_world.py) -------------------------------------


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    """A workstation with bundles v1, v2, v3 and v3-bad (fails its golden vectors) for dev-a."""
    ws = Workstation.make(tmp_path_factory.mktemp("ota-ws"), ["dev-a"])
    ws.make_models()
    ws.pack("v1", 1, "m1")
    ws.pack("v2", 2, "m2")
    ws.pack("v3-bad", 3, "m1", bad_golden=True)
    ws.pack("v3", 3, "m1")
    return ws


@pytest.fixture
def fleet_side(ws, broker, ota_pki):
    ctl = ota_pki["edgeseal-controller"]
    side = FleetSide(ws, broker, ota_pki.ca_file, ctl.cert, ctl.key)
    yield side
    side.close()


@pytest.fixture
def dev_config(ws, broker, ota_pki, tmp_path):
    def make(home: Path, **ota):
        ident = ota_pki["dev-a"]
        text = device_config(home, broker, ota_pki.ca_file, ident.cert, ident.key, "dev-a", **ota)
        path = home.parent / f"{home.name}.toml"
        path.write_text(text)
        return text, path

    return make


@pytest.fixture
def device(ws, dev_config, tmp_path):
    started = []

    def start(faults: Faults | None = None, home: Path | None = None, **ota):
        home = home or copy_home(ws, "dev-a", tmp_path / "home")
        text, _ = dev_config(home, **ota)
        d = InProcessDevice.start(home, text, faults)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
