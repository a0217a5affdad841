"""The fleet CA and device enrollment: MQTT TLS identities. Stable API.

The fleet CA lives on the workstation in one folder (default ``<keyring>/fleet-ca/``)::

    ca.key        the CA's P-256 key (0600; refused when group- or world-readable)
    ca.pem        its self-signed certificate: what brokers and devices pin
    issued.json   every certificate issued: serial, CN, kind, expiry

Enrollment, in order:

1. The device makes a CSR (:func:`make_csr`): a new P-256 key and CN = its device id.
2. The workstation issues a certificate from it (:meth:`FleetCA.issue_device`), checking
   the CSR's signature and that the CN is one safe topic level (E1-E5 below).
3. The broker keys its ACL on the certificate's CN (``use_identity_as_username``), so the
   CN *is* the device's MQTT identity; see :mod:`edgeseal.ota.broker`.

The TLS key is a **software** key (a PEM file, 0600, in ``<home>/ota/tls.key``): Python's
``ssl`` module, which paho-mqtt uses, can only load keys from files, not from a TPM or a
PKCS#11 token. The CSR and certificate say so (subject ``OU=tls-key:software``) and the
device reports it in its status. The bundle-unwrapping key stays in the device's key
store; a stolen TLS key lets its thief speak MQTT as the device (read its offers, forge
its status), never open a bundle.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeseal.core.encoding import format_time, utcnow
from edgeseal.core.errors import EdgesealError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import generate_private_key, load_private_key, write_private_key
from edgeseal.ota.topics import check_level

__all__ = [
    "CONTROLLER",
    "MAX_CN_CHARS",
    "MAX_CSR_BYTES",
    "EnrollmentError",
    "FleetCA",
    "IssuedCredential",
    "default_ca_dir",
    "key_storage",
    "make_csr",
]

#: The controller's default certificate CN (its MQTT user name).
CONTROLLER = "edgeseal-controller"
#: X.509's upper bound for a CN (ub-common-name): a device id in a certificate is no longer.
MAX_CN_CHARS = 64
#: A CSR larger than this is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
#: The subject OU that says where the TLS key lives.
_STORAGE_PREFIX = "tls-key:"
_STORAGE_KINDS = ("software", "hardware")
_ORG = "edgeseal fleet"
_BACKDATE = timedelta(minutes=5)


class EnrollmentError(EdgesealError):
    """A certificate request was refused, or the fleet CA cannot be used."""

    #: For a refused request (the default); the CA's own problems say their own.
    hint = (
        "the device makes its request with `edgeseal ota csr --home HOME`; the workstation "
        "registers the device first (`edgeseal keys add-device`)"
    )


def default_ca_dir(keys_dir: Path) -> Path:
    return Path(keys_dir) / "fleet-ca"


def make_csr(device_id: str, key_path: Path) -> bytes:
    """Make a new software P-256 TLS key at ``key_path`` (0600) and a CSR (PEM) for it.

    The CN is ``device_id`` (one safe topic level, else ValueError). The subject carries
    ``OU=tls-key:software``: Python's ssl cannot use a TPM or PKCS#11 key for TLS.
    """
    check_level(device_id, "device id")
    if len(device_id) > MAX_CN_CHARS:
        raise ValueError(f"a device id in a certificate is at most {MAX_CN_CHARS} characters")
    key = generate_private_key()
    write_private_key(Path(key_path), key, passphrase=None)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _STORAGE_PREFIX + "software"),
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def key_storage(cert_pem: bytes) -> str:
    """Where the certificate's key lives, as its subject says: software, hardware or unknown."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode()
        if value.startswith(_STORAGE_PREFIX) and value[len(_STORAGE_PREFIX) :] in _STORAGE_KINDS:
            return value[len(_STORAGE_PREFIX) :]
    return "unknown"


@dataclass(frozen=True)
class IssuedCredential:
    """A key and certificate the CA made for a server or the controller (both PEM)."""

    key_pem: bytes
    cert_pem: bytes

    def write(self, key_path: Path, cert_path: Path) -> None:
        atomic_write(key_path, self.key_pem, mode=0o600)
        atomic_write(cert_path, self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _single_cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise EnrollmentError(f"the request must have exactly one CN, it has {len(cns)}")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _unverified_storage(name: x509.Name) -> str:
    for attr in name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = attr.value if isinstance(attr.value, str) else ""
        if value.startswith(_STORAGE_PREFIX) and value[len(_STORAGE_PREFIX) :] in _STORAGE_KINDS:
            return value[len(_STORAGE_PREFIX) :]
    return "unknown"


def _identity_san(kind: str, name: str) -> x509.SubjectAlternativeName:
    """``urn:edgeseal:<kind>:<name>``: brokers key on the CN, verifiers want a SAN."""
    return x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(f"urn:edgeseal:{kind}:{name}")]
    )


class FleetCA:
    """The certificate authority for MQTT TLS: device, broker and controller certificates."""

    def __init__(
        self, path: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
    ) -> None:
        self.path = Path(path)
        self._key = key
        self.certificate = certificate

    # -- files ------------------------------------------------------------------------
    @staticmethod
    def key_path_in(path: Path) -> Path:
        return Path(path) / "ca.key"

    @staticmethod
    def cert_path_in(path: Path) -> Path:
        return Path(path) / "ca.pem"

    @property
    def cert_path(self) -> Path:
        return self.cert_path_in(self.path)

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        days: int = 3650,
        now: datetime | None = None,
        passphrase: bytes | None = None,
        force: bool = False,
    ) -> FleetCA:
        """Create a new CA in ``path``; refuses to replace one unless ``force``."""
        path = Path(path)
        if cls.key_path_in(path).exists() and not force:
            raise EnrollmentError(
                f"a fleet CA already exists in {path}; every device certificate depends on it",
                hint="--force replaces it; every device then needs a new certificate",
            )
        if days < 1:
            raise ValueError("days must be at least 1")
        now = now or utcnow()
        key = generate_private_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"edgeseal fleet CA {secrets.token_hex(4)}"
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        write_private_key(cls.key_path_in(path), key, passphrase=passphrase)
        atomic_write(cls.cert_path_in(path), cert.public_bytes(serialization.Encoding.PEM))
        atomic_write(path / "issued.json", b'{"certificates": []}\n')
        return cls(path, key, cert)

    @classmethod
    def load(cls, path: Path, *, passphrase: bytes | None = None) -> FleetCA:
        path = Path(path)
        if not cls.key_path_in(path).exists():
            raise EnrollmentError(f"no fleet CA in {path} (run: edgeseal ota ca-init)", hint="")
        key = load_private_key(cls.key_path_in(path), passphrase=passphrase)
        try:
            cert = x509.load_pem_x509_certificate(cls.cert_path_in(path).read_bytes())
        except (OSError, ValueError) as e:
            raise EnrollmentError(
                f"cannot read the fleet CA certificate in {path}: {e}", hint=""
            ) from e
        if cert.public_key() != key.public_key():
            raise EnrollmentError(f"{path}: ca.key does not belong to ca.pem", hint="")
        return cls(path, key, cert)

    def issued(self) -> list[dict[str, Any]]:
        """Every certificate this CA issued, oldest first."""
        try:
            obj = json.loads((self.path / "issued.json").read_bytes())
        except FileNotFoundError:
            return []
        certs: list[dict[str, Any]] = obj.get("certificates", [])
        return certs

    def _record(self, cert: x509.Certificate, cn: str, kind: str) -> None:
        certs = self.issued()
        certs.append(
            {
                "serial": format(cert.serial_number, "x"),
                "cn": cn,
                "kind": kind,
                "not_after": format_time(cert.not_valid_after_utc),
            }
        )
        data = json.dumps({"certificates": certs}, indent=1, sort_keys=True) + "\n"
        atomic_write(self.path / "issued.json", data.encode())

    def _names_of(self, kind: str) -> set[str]:
        return {c["cn"] for c in self.issued() if c.get("kind") == kind}

    # -- issuing ----------------------------------------------------------------------
    def _build(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        eku: x509.ObjectIdentifier,
        days: int,
        now: datetime | None,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        if days < 1:
            raise ValueError("days must be at least 1")
        now = now or utcnow()
        not_after = min(now + timedelta(days=days), self.certificate.not_valid_after_utc)
        if not_after <= now:
            raise EnrollmentError(
                "the fleet CA certificate has expired",
                hint="make a new CA (edgeseal ota ca-init --force) and enroll every device again",
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_device(
        self,
        csr_pem: bytes,
        *,
        days: int = 365,
        now: datetime | None = None,
        expected_id: str | None = None,
        registered: Collection[str] | None = None,
    ) -> bytes:
        """Verify a device's CSR and issue its client certificate (PEM).

        E1 size and parse; E2 the CSR's signature verifies (ECDSA-SHA256, P-256 key);
        E3 exactly one CN, a safe topic level (no ``/``, ``+``, ``#``, NUL; CVE-2017-7650);
        E4 the CN equals ``expected_id`` when given, is in ``registered`` when given (the
        keyring's device ids), and is not the controller's name;
        E5 the certificate is built by the CA alone: CN, storage label, clientAuth, no CA.
        """
        # E1
        if len(csr_pem) > MAX_CSR_BYTES:
            raise EnrollmentError(f"the request is larger than {MAX_CSR_BYTES} bytes")
        try:
            unverified_csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise EnrollmentError("the request is not a PEM certificate signing request") from e
        # E2
        try:
            key = unverified_csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise EnrollmentError("the request's public key cannot be read") from e
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise EnrollmentError("the request's key must be an EC P-256 key")
        try:
            sha256 = isinstance(unverified_csr.signature_hash_algorithm, hashes.SHA256)
        except UnsupportedAlgorithm:
            sha256 = False
        if not sha256:
            raise EnrollmentError("the request must be signed with ECDSA-SHA256")
        try:
            key.verify(
                unverified_csr.signature,
                unverified_csr.tbs_certrequest_bytes,
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            raise EnrollmentError("the request's signature does not verify") from None
        csr = unverified_csr
        with warnings.catch_warnings():  # an over-long CN warns when read; E3 refuses it
            warnings.simplefilter("ignore", UserWarning)
            requested = csr.subject
        # E3
        cn = _single_cn(requested)
        try:
            check_level(cn, "device id")
        except ValueError as e:
            raise EnrollmentError(f"refused CN: {e}") from None
        if len(cn) > MAX_CN_CHARS:
            raise EnrollmentError(f"refused CN: longer than X.509's {MAX_CN_CHARS} characters")
        # E4
        if expected_id is not None and cn != expected_id:
            raise EnrollmentError(f"the request is for {cn!r}, not for {expected_id!r}")
        if registered is not None and cn not in registered:
            raise EnrollmentError(
                f"{cn!r} is not in the device registry (edgeseal keys add-device {cn} ...)"
            )
        if cn == CONTROLLER or cn in self._names_of("client"):
            raise EnrollmentError(f"{cn!r} is a controller identity, not a device id", hint="")
        # E5
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(
                    NameOID.ORGANIZATIONAL_UNIT_NAME,
                    _STORAGE_PREFIX + _unverified_storage(requested),
                ),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )
        cert = self._build(
            subject,
            key,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
            now=now,
            san=_identity_san("device", cn),
        )
        self._record(cert, cn, "device")
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_server(
        self, hosts: Sequence[str] = (), *, days: int = 825, now: datetime | None = None
    ) -> IssuedCredential:
        """A broker's key and certificate (serverAuth) for ``hosts`` plus localhost/127.0.0.1."""
        names: list[x509.GeneralName] = []
        seen: list[str] = []
        for raw in [*hosts, "localhost", "127.0.0.1", "::1"]:
            host = raw.strip()
            if not host or host in seen:
                continue
            seen.append(host)
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if any(c in host for c in "/+# \0"):
                    raise ValueError(f"{host!r} is not a host name or IP address") from None
                names.append(x509.DNSName(host))
        key = generate_private_key()
        first = seen[0]
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, first),
            ]
        )
        cert = self._build(
            subject,
            key.public_key(),
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            days=days,
            now=now,
            san=x509.SubjectAlternativeName(names),
        )
        self._record(cert, first, "server")
        return IssuedCredential(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))

    def issue_client(
        self, name: str = CONTROLLER, *, days: int = 825, now: datetime | None = None
    ) -> IssuedCredential:
        """A key and client certificate for the controller (full access under the prefix)."""
        check_level(name, "controller name")
        if name in self._names_of("device"):
            raise EnrollmentError(f"{name!r} is already a device's id", hint="")
        key = generate_private_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "controller"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        cert = self._build(
            subject,
            key.public_key(),
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
            now=now,
            san=_identity_san("controller", name),
        )
        self._record(cert, name, "client")
        return IssuedCredential(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))
