"""Enrollment: the fleet CA issues MQTT identities only for well-formed, signed requests."""

from __future__ import annotations

import json
import stat
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from typer.testing import CliRunner, Result

from edgeseal.core import cli
from edgeseal.core.errors import EdgesealError, KeyFileError
from edgeseal.ota.enroll import (
    CONTROLLER,
    EnrollmentError,
    FleetCA,
    key_storage,
    make_csr,
)
from edgeseal.ota.registry import GroupRegistry
from helpers import NOW


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.init(tmp_path_factory.mktemp("enroll") / "fleet-ca", now=NOW)


def _csr_with_cn(cn: str) -> bytes:
    """A correctly signed request for a CN that make_csr would refuse to write."""
    key = ec.generate_private_key(ec.SECP256R1())
    with warnings.catch_warnings():  # cryptography warns about a CN over 64 characters
        warnings.simplefilter("ignore", UserWarning)
        attr = x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)
        name = x509.Name([attr]) if cn else x509.Name([])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _verify(ca: FleetCA, cert_pem: bytes) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificate(cert_pem)
    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .time(NOW + timedelta(days=1))
        .build_client_verifier()
    )
    verifier.verify(leaf, [])
    return leaf


def test_a_device_csr_round_trips_into_a_client_certificate(ca: FleetCA, tmp_path: Path) -> None:
    key_path = tmp_path / "ota" / "tls.key"
    cert_pem = ca.issue_device(make_csr("dev-a", key_path), now=NOW, expected_id="dev-a")
    leaf = _verify(ca, cert_pem)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert leaf.public_key() == key.public_key()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_storage(cert_pem) == "software"
    assert ca.issued()[-1]["cn"] == "dev-a"


@pytest.mark.parametrize("cn", ["a/b", "+", "#", "dev-a/#", "dev\x00a", "", "x" * 65, " dev"])
def test_a_cn_that_is_not_one_safe_topic_level_is_refused(ca: FleetCA, cn: str) -> None:
    with pytest.raises(EnrollmentError):
        ca.issue_device(_csr_with_cn(cn), now=NOW)


@pytest.mark.parametrize("cn", ["a/b", "+", "#", ""])
def test_make_csr_refuses_an_unsafe_device_id(cn: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_csr(cn, tmp_path / "tls.key")
    assert not (tmp_path / "tls.key").exists()


def test_a_request_with_two_cns_is_refused(ca: FleetCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-a"),
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-b"),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    with pytest.raises(EnrollmentError, match="exactly one CN"):
        ca.issue_device(csr.public_bytes(serialization.Encoding.PEM), now=NOW)


def test_a_request_with_a_bad_signature_is_refused(ca: FleetCA, tmp_path: Path) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr("dev-a", tmp_path / "k")).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-1] ^= 0x01  # the last byte of the signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(EnrollmentError, match="signature"):
        ca.issue_device(tampered, now=NOW)


def test_a_request_for_another_device_than_expected_is_refused(ca: FleetCA, tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="not for 'dev-b'"):
        ca.issue_device(make_csr("dev-a", tmp_path / "k"), now=NOW, expected_id="dev-b")


def test_garbage_and_oversized_requests_are_refused(ca: FleetCA) -> None:
    with pytest.raises(EnrollmentError):
        ca.issue_device(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", now=NOW)
    with pytest.raises(EnrollmentError, match="larger"):
        ca.issue_device(b"A" * 20000, now=NOW)


def test_a_non_p256_request_is_refused(ca: FleetCA) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-a")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    with pytest.raises(EnrollmentError, match="P-256"):
        ca.issue_device(csr.public_bytes(serialization.Encoding.PEM), now=NOW)


def test_a_device_cannot_take_the_controllers_identity(ca: FleetCA, tmp_path: Path) -> None:
    with pytest.raises(EnrollmentError, match="controller"):
        ca.issue_device(make_csr(CONTROLLER, tmp_path / "k"), now=NOW)


def test_the_requests_own_extensions_and_subject_are_not_copied(ca: FleetCA) -> None:
    """A request asking to be a CA gets a plain client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-c"),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    leaf = _verify(ca, ca.issue_device(csr.public_bytes(serialization.Encoding.PEM), now=NOW))
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value != "evil"
    assert key_storage(leaf.public_bytes(serialization.Encoding.PEM)) == "unknown"


def test_server_and_controller_certificates(ca: FleetCA) -> None:
    server = ca.issue_server(["broker.example", "10.0.0.5"], now=NOW)
    leaf = x509.load_pem_x509_certificate(server.cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"broker.example", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {
        "10.0.0.5",
        "127.0.0.1",
    }
    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .time(NOW + timedelta(days=1))
        .build_server_verifier(x509.DNSName("broker.example"))
    )
    verifier.verify(leaf, [])
    controller = ca.issue_client(now=NOW)
    assert _verify(ca, controller.cert_pem).subject.rfc4514_string().startswith(f"CN={CONTROLLER}")


def test_the_ca_reloads_and_refuses_to_be_replaced(ca: FleetCA) -> None:
    again = FleetCA.load(ca.path)
    assert again.certificate == ca.certificate
    with pytest.raises(EnrollmentError, match="already exists"):
        FleetCA.init(ca.path)
    assert stat.S_IMODE(FleetCA.key_path_in(ca.path).stat().st_mode) == 0o600


def test_a_world_readable_ca_key_is_refused(tmp_path: Path) -> None:
    ca = FleetCA.init(tmp_path / "ca", now=NOW)
    FleetCA.key_path_in(ca.path).chmod(0o644)
    with pytest.raises(KeyFileError):
        FleetCA.load(ca.path)


def test_enrollment_errors_explain_themselves() -> None:
    err = EnrollmentError("the request's signature does not verify")
    assert isinstance(err, EdgesealError)
    assert "edgeseal ota csr" in err.diagnostics()


def test_group_registry_adds_removes_and_lists(tmp_path: Path) -> None:
    reg = GroupRegistry.in_keyring(tmp_path)
    assert reg.add("lab", ["dev-b", "dev-a"]) == ("dev-a", "dev-b")
    reg.add("north", ["dev-a"])
    assert reg.groups_of("dev-a") == ("lab", "north")
    assert reg.members("lab") == ("dev-a", "dev-b")
    assert reg.remove("lab", ["dev-b"]) == ("dev-a",)
    assert reg.groups_of("dev-b") == ()
    reg.remove("north")
    assert reg.groups() == {"lab": ("dev-a",)}
    assert (tmp_path / "fleet" / "groups.json").is_file()
    with pytest.raises(ValueError):
        reg.add("a/b", ["dev-a"])
    with pytest.raises(ValueError):
        reg.add("lab", ["+"])
    with pytest.raises(ValueError):
        reg.remove("nosuch")


def _cli(*args: str, env: dict[str, str], check: int = 0) -> Result:
    """Run ``edgeseal ARGS`` in this process (a subprocess per command costs seconds)."""
    if not any(g.name == "ota" for g in cli.app.registered_groups):
        cli._register_parts()
    result = CliRunner().invoke(cli.app, list(args), env=env)
    assert result.exit_code == check, f"exit {result.exit_code}\n{result.output}"
    return result


def test_the_ota_commands_enroll_a_registered_device_and_write_a_broker(tmp_path: Path) -> None:
    """ca-init, csr on the device, enroll (refused until registered), groups, broker-config."""
    env = {
        "EDGESEAL_KEYS": str(tmp_path / "keys"),
        "COLUMNS": "200",
        "EDGESEAL_CA_PASSPHRASE": "",
        "EDGESEAL_PASSPHRASE": "",
    }
    home = tmp_path / "dev"
    _cli("keys", "init-root", "--no-passphrase", env=env)
    _cli("agent", "provision", "--home", str(home), "--root", str(tmp_path / "keys/root.pub"),
         "--device-id", "cam-01", env=env)  # fmt: skip
    _cli("ota", "ca-init", env=env)
    made = json.loads(_cli("ota", "csr", "--home", str(home), "--json", env=env).stdout)
    assert made["device_id"] == "cam-01" and made["key_storage"] == "software"
    assert stat.S_IMODE((home / "ota/tls.key").stat().st_mode) == 0o600
    cert = tmp_path / "cam-01.pem"
    refused = _cli("ota", "enroll", made["csr"], "--out", str(cert), "--json", env=env, check=1)
    assert json.loads(refused.stdout)["error"] == "EnrollmentError" and not cert.exists()
    _cli("keys", "add-device", "cam-01", str(home / "device.pub.json"), env=env)
    _cli("ota", "enroll", made["csr"], "--out", str(cert), "--device-id", "cam-01", env=env)
    assert key_storage(cert.read_bytes()) == "software"
    _cli("ota", "group", "add", "lab", "cam-01", env=env)
    _cli("ota", "group", "add", "a/b", "cam-01", env=env, check=2)
    unknown = _cli("ota", "group", "add", "lab", "cam-01", "cam-02", "--json", env=env, check=2)
    assert "cam-02" in json.loads(unknown.stdout)["message"]
    listed = json.loads(
        _cli("ota", "group", "list", "--device", "cam-01", "--json", env=env).stdout
    )
    assert listed["groups"] == {"lab": ["cam-01"]}
    broker = tmp_path / "broker"
    _cli("ota", "broker-config", "--out", str(broker), "--host", "broker.local", env=env)
    assert "user cam-01\ntopic read edgeseal/v1/groups/lab/control" in (broker / "acl").read_text()
    conf = (broker / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "listener 8883 broker.local\n" in conf  # where devices reach it, not loopback
    _cli("ota", "group", "remove", "lab", env=env)
    _cli("ota", "broker-config", "--out", str(broker), "--acl-only", env=env)
    assert "groups/lab" not in (broker / "acl").read_text()
    assert json.loads(
        _cli("ota", "group", "list", "--device", "cam-02", "--json", env=env).stdout
    ) == {"ok": True, "groups": {}}  # the refused add added nobody


def test_broker_config_listens_on_loopback_without_hosts_and_everywhere_for_several(
    tmp_path: Path,
) -> None:
    env = {"EDGESEAL_KEYS": str(tmp_path / "keys"), "EDGESEAL_CA_PASSPHRASE": ""}
    _cli("ota", "ca-init", env=env)
    _cli("ota", "broker-config", "--out", str(tmp_path / "b1"), env=env)
    assert "listener 8883 127.0.0.1\n" in (tmp_path / "b1/mosquitto.conf").read_text()
    _cli("ota", "broker-config", "--out", str(tmp_path / "b2"), "--host", "a.lan",
         "--host", "10.0.0.5", env=env)  # fmt: skip
    assert "listener 8883 0.0.0.0\n" in (tmp_path / "b2/mosquitto.conf").read_text()
    _cli("ota", "broker-config", "--out", str(tmp_path / "b3"), "--host", "a.lan",
         "--bind", "10.0.0.5", env=env)  # fmt: skip
    assert "listener 8883 10.0.0.5\n" in (tmp_path / "b3/mosquitto.conf").read_text()


def test_simulate_adds_devices_to_the_keyring_only_with_register(tmp_path: Path) -> None:
    """ota simulate never fills a keyring with simulated devices and fleet-CA certificates
    unasked: without --register it refuses (exit 2) and the keyring and groups stay as
    they were; with it, the devices are registered and grouped, and say so."""
    env = {
        "EDGESEAL_KEYS": str(tmp_path / "keys"),
        "EDGESEAL_CA_PASSPHRASE": "",
        "EDGESEAL_PASSPHRASE": "",
    }
    _cli("keys", "init-root", "--no-passphrase", env=env)
    _cli("ota", "ca-init", env=env)
    sim = ("ota", "simulate", "--devices", "2", "--dir", str(tmp_path / "sim"), "--provision-only")
    refused = _cli(*sim, "--json", env=env, check=2)
    assert "--register" in json.loads(refused.stdout)["message"]
    listed = json.loads(_cli("keys", "list", "--json", env=env).stdout)
    assert listed["devices"] == [] and not (tmp_path / "sim").exists()
    made = json.loads(_cli(*sim, "--register", "--json", env=env).stdout)
    assert made["registered"] == ["sim-0000", "sim-0001"]
    listed = json.loads(_cli("keys", "list", "--json", env=env).stdout)
    assert sorted(d["id"] for d in listed["devices"]) == ["sim-0000", "sim-0001"]
    again = json.loads(_cli(*sim, "--json", env=env).stdout)  # registered: no flag needed
    assert again["registered"] == [] and again["devices"] == ["sim-0000", "sim-0001"]
