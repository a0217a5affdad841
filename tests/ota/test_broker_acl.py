"""The example broker's ACL, against a real Mosquitto with TLS on loopback.

Mosquitto acknowledges a denied QoS 1 publish (a v5 client sees reason 0x87, a v3.1.1
client a plain PUBACK), so every "denied" case here is proved by an observer that receives
nothing. Mosquitto 2.0's ACL file grants every SUBSCRIBE and checks read access at
delivery (2.1 refuses with SUBACK 0x80): the subscribe tests assert non-delivery always and
the refusal where the broker makes one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import QUIET, TOPICS, Identity, OtaPki, Probe, make_client
from edgeseal.core.encoding import utcnow
from edgeseal.core.keys import generate_private_key, load_private_key
from edgeseal.ota.broker import Mosquitto, acl_text, mosquitto_version
from edgeseal.ota.enroll import CONTROLLER, FleetCA, make_csr

pytestmark = pytest.mark.mqtt
Connect = Callable[..., Probe]
BOTH = pytest.mark.parametrize("protocol", ["5", "3.1.1"])


def _subscribe_refusal_expected() -> bool:
    version = mosquitto_version()
    return version is not None and version >= (2, 1)


def _observer(broker: Mosquitto, connect: Connect, protocol: str) -> Probe:
    """The controller, subscribed to everything under the prefix."""
    obs = connect(broker, CONTROLLER, protocol=protocol)
    assert obs.subscribe(f"{TOPICS.prefix}/#")[0] < 0x80
    return obs


@BOTH
def test_device_cannot_publish_to_another_devices_or_a_foreign_groups_topics(
    broker: Mosquitto, mqtt_client: Connect, protocol: str
) -> None:
    obs = _observer(broker, mqtt_client, protocol)
    dev_a = mqtt_client(broker, "dev-a", protocol=protocol)
    forbidden = [
        TOPICS.device("dev-b", "control"),
        TOPICS.device("dev-b", "data"),
        TOPICS.device("dev-b", "status"),
        TOPICS.group("lab"),  # a member reads its group's control topic, never writes it
        TOPICS.group("south"),
        TOPICS.device("dev-a", "control"),  # only the fleet writes a device's control
        f"{TOPICS.prefix}/other",
    ]
    for topic in forbidden:
        rc = dev_a.publish(topic, b"forged order", qos=1)
        if protocol == "5":
            assert rc == 0x87, topic  # Not authorized, but acknowledged all the same
    time.sleep(QUIET)
    assert [m.topic for m in obs.messages()] == []


@BOTH
def test_device_publishes_its_own_fetch_status_and_events(
    broker: Mosquitto, mqtt_client: Connect, protocol: str
) -> None:
    obs = _observer(broker, mqtt_client, protocol)
    dev_a = mqtt_client(broker, "dev-a", protocol=protocol)
    own = [TOPICS.device("dev-a", k) for k in ("fetch", "status", "events")]
    for topic in own:
        assert dev_a.publish(topic, b"{}", qos=1) == 0
    for topic in own:
        assert obs.wait_message(topic).payload == b"{}"


@BOTH
def test_device_reads_its_own_control_and_data_and_its_groups_control(
    broker: Mosquitto, mqtt_client: Connect, protocol: str
) -> None:
    dev_a = mqtt_client(broker, "dev-a", protocol=protocol)
    mine = [
        TOPICS.device("dev-a", "control"),
        TOPICS.device("dev-a", "data"),
        TOPICS.group("lab"),
        TOPICS.group("north"),
    ]
    for topic in mine:
        assert dev_a.subscribe(topic)[0] < 0x80
    ctl = mqtt_client(broker, CONTROLLER, protocol=protocol)
    for topic in mine:
        assert ctl.publish(topic, topic.encode(), qos=1) == 0
    for topic in mine:
        assert dev_a.wait_message(topic).payload == topic.encode()


@BOTH
def test_device_cannot_read_another_devices_topics_or_a_foreign_group(
    broker: Mosquitto, mqtt_client: Connect, protocol: str
) -> None:
    dev_b = mqtt_client(broker, "dev-b", protocol=protocol)
    filters = [
        TOPICS.device("dev-a", "control"),
        TOPICS.device("dev-a", "data"),
        TOPICS.device("dev-a", "status"),
        TOPICS.all_devices("control"),
        f"{TOPICS.prefix}/devices/dev-a/#",
        TOPICS.group("north"),  # dev-b is in lab only
        f"{TOPICS.prefix}/#",
    ]
    for f in filters:
        codes = dev_b.subscribe(f)
        if _subscribe_refusal_expected():
            assert codes[0] >= 0x80, f
    ctl = mqtt_client(broker, CONTROLLER, protocol=protocol)
    sent = [
        TOPICS.device("dev-a", "control"),
        TOPICS.device("dev-a", "data"),
        TOPICS.group("north"),
    ]
    for topic in sent:
        assert ctl.publish(topic, b"for dev-a only", qos=1) == 0
    dev_a = mqtt_client(broker, "dev-a", protocol=protocol)
    assert dev_a.publish(TOPICS.device("dev-a", "status"), b"{}", qos=1) == 0
    time.sleep(QUIET)
    assert [m.topic for m in dev_b.messages()] == []


def test_device_with_a_wildcard_subscription_receives_only_its_own_control(
    broker: Mosquitto, mqtt_client: Connect
) -> None:
    dev_a = mqtt_client(broker, "dev-a")
    dev_a.subscribe(TOPICS.all_devices("control"))
    ctl = mqtt_client(broker, CONTROLLER)
    ctl.publish(TOPICS.device("dev-b", "control"), b"b", qos=1)
    ctl.publish(TOPICS.device("dev-a", "control"), b"a", qos=1)
    dev_a.wait_message(TOPICS.device("dev-a", "control"))
    time.sleep(QUIET)
    assert [m.payload for m in dev_a.messages()] == [b"a"]


def test_client_id_is_not_the_identity(broker: Mosquitto, mqtt_client: Connect) -> None:
    """dev-a connecting with client id "dev-b" is still dev-a to the ACL."""
    obs = _observer(broker, mqtt_client, "5")
    dev_a = mqtt_client(broker, "dev-a", client_id="dev-b")
    dev_a.publish(TOPICS.device("dev-b", "status"), b"forged", qos=1)
    dev_a.subscribe(TOPICS.device("dev-b", "control"))
    obs.publish(TOPICS.device("dev-b", "control"), b"for dev-b", qos=1)
    time.sleep(QUIET)
    assert [m.topic for m in obs.messages()] == [TOPICS.device("dev-b", "control")]
    assert dev_a.messages() == []


@BOTH
def test_tls_without_a_client_certificate_is_refused(
    broker: Mosquitto, ota_pki: OtaPki, protocol: str
) -> None:
    probe = make_client(broker, ota_pki.ca_file, None, protocol=protocol)
    try:
        assert not probe.wait_connected(timeout=2.0)
    finally:
        probe.close()


def _foreign_identity(tmp: Path, name: str) -> Identity:
    """A device certificate for ``name`` from a CA the broker does not trust."""
    other = FleetCA.init(tmp / "other-ca")
    key, cert = tmp / "foreign.key", tmp / "foreign.pem"
    cert.write_bytes(other.issue_device(make_csr(name, key)))
    return Identity(name, cert, key)


@BOTH
def test_a_certificate_from_another_ca_is_refused(
    broker: Mosquitto, ota_pki: OtaPki, tmp_path: Path, protocol: str
) -> None:
    probe = make_client(
        broker, ota_pki.ca_file, _foreign_identity(tmp_path, "dev-a"), protocol=protocol
    )
    try:
        assert not probe.wait_connected(timeout=2.0)
    finally:
        probe.close()


def _forge(ota_pki: OtaPki, tmp: Path, cn: str) -> Identity:
    """A certificate signed with the fleet CA's key but past its CN checks (E3)."""
    ca_key = load_private_key(FleetCA.key_path_in(ota_pki.ca.path), passphrase=None)
    key = generate_private_key()
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ota_pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / "forged.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "forged.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Identity(cn, tmp / "forged.pem", tmp / "forged.key")


@pytest.mark.parametrize("cn", ["+", "#", "dev-b/control/x"])
def test_a_wildcard_or_slash_identity_reaches_no_device_topic(
    broker: Mosquitto, ota_pki: OtaPki, mqtt_client: Connect, tmp_path: Path, cn: str
) -> None:
    """CVE-2017-7650 class: even a CN the CA would never issue widens nothing."""
    obs = _observer(broker, mqtt_client, "5")
    probe = make_client(broker, ota_pki.ca_file, _forge(ota_pki, tmp_path, cn))
    try:
        if not probe.wait_connected(timeout=2.0):
            return  # refused outright: as good
        probe.subscribe(TOPICS.all_devices("control"))
        probe.subscribe(TOPICS.device("dev-b", "control"))
        for kind in ("status", "events", "control"):
            probe.publish(TOPICS.device("dev-b", kind), b"forged", qos=1)
        obs.publish(TOPICS.device("dev-b", "control"), b"for dev-b", qos=1)
        time.sleep(QUIET)
        assert probe.messages() == []
        assert [m.payload for m in obs.messages()] == [b"for dev-b"]
    finally:
        probe.close()


def test_reload_applies_new_group_membership(
    start_broker: Callable[..., Mosquitto], mqtt_client: Connect, tmp_path: Path
) -> None:
    """Group "south" gains dev-b: after SIGHUP the broker delivers its offers to dev-b."""
    acl = tmp_path / "acl"
    acl.write_text(acl_text(TOPICS, {"lab": ["dev-a", "dev-b"]}))
    broker = start_broker(acl_file=acl)
    south = TOPICS.group("south")
    ctl = mqtt_client(broker, CONTROLLER)
    dev_b = mqtt_client(broker, "dev-b")
    dev_b.subscribe(south)
    ctl.publish(south, b"before", qos=1)
    time.sleep(QUIET)
    assert dev_b.messages() == []
    acl.write_text(acl_text(TOPICS, {"lab": ["dev-a", "dev-b"], "south": ["dev-b"]}))
    broker.reload()
    deadline = time.monotonic() + 5
    while not dev_b.messages() and time.monotonic() < deadline:
        ctl.publish(south, b"after", qos=1)
        time.sleep(0.1)
    assert dev_b.messages()
    assert {m.payload for m in dev_b.messages()} == {b"after"}


@BOTH
def test_restart_keeps_the_port_and_queued_messages(
    fresh_broker: Mosquitto, mqtt_client: Connect, protocol: str
) -> None:
    """A persistent session's queued QoS 1 message survives a broker restart."""
    broker = fresh_broker
    port = broker.port
    data = TOPICS.device("dev-a", "data")
    first = mqtt_client(broker, "dev-a", protocol=protocol, client_id="dev-a", persistent=True)
    assert first.subscribe(data, qos=1)[0] < 0x80
    first.close()
    mqtt_client(broker, CONTROLLER).publish(data, b"chunk 7", qos=1)
    broker.restart()
    assert broker.port == port
    again = mqtt_client(broker, "dev-a", protocol=protocol, client_id="dev-a", persistent=True)
    assert again.wait_message(data).payload == b"chunk 7"
