"""P-256 keys: key ids, key files, signers and signature checks. Stable API.

Every key in edgeseal is ECDSA/ECDH on NIST P-256 with SHA-256, so that every key can
live in a TPM 2.0, a PKCS#11 token, OP-TEE or a secure element. A key id is the SHA-256
of the public key's DER SubjectPublicKeyInfo, in hex.

Private keys at rest are PKCS#8 PEM, encrypted (PBES2: PBKDF2-HMAC-SHA256, 600,000
rounds, AES-256-CBC) when a passphrase is given, written 0600; a private key file that
its group or others can read is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import pkcs12

from edgeseal.core.errors import KeyFileError
from edgeseal.core.files import atomic_write

__all__ = [
    "PBKDF2_ROUNDS",
    "Signer",
    "SoftwareSigner",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_pem",
    "raw_signature_from_der",
    "verify_raw_signature",
    "write_private_key",
    "write_public_key",
]

PBKDF2_ROUNDS = 600_000
RAW_SIGNATURE_LEN = 64


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The SHA-256 of the DER SubjectPublicKeyInfo, in lowercase hex."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(data: bytes | str, what: str = "public key") -> ec.EllipticCurvePublicKey:
    """Load a P-256 public key from PEM or DER; ``ValueError`` naming ``what`` otherwise."""
    raw = data.encode("ascii", "replace") if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
        else:
            key = serialization.load_der_public_key(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not a PEM or DER public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{what} must be an EC P-256 key")
    return key


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"refusing to use it. Fix it with: chmod 600 {path}"
        )


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, passphrase: bytes | None
) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600, atomically; encrypted when given a passphrase."""
    if passphrase:
        encryption: serialization.KeySerializationEncryption = (
            serialization.PrivateFormat.PKCS8.encryption_builder()
            .kdf_rounds(PBKDF2_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .build(passphrase)
        )
    else:
        encryption = serialization.NoEncryption()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    atomic_write(path, pem, mode=0o600)


def write_public_key(path: Path, key: ec.EllipticCurvePublicKey) -> None:
    atomic_write(path, public_key_pem(key).encode("ascii"), mode=0o644)


def load_private_key(path: Path, *, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 private key file, refusing group/world-readable files."""
    try:
        _check_private_mode(path)
        pem = path.read_bytes()
    except FileNotFoundError as e:
        raise KeyFileError(f"private key {path} does not exist") from e
    except OSError as e:
        raise KeyFileError(f"cannot read private key {path}: {e.strerror}") from e
    encrypted = b"ENCRYPTED" in pem.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        raise KeyFileError(
            f"private key {path} is encrypted: give its passphrase "
            "(--passphrase-file or EDGESEAL_PASSPHRASE)"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise KeyFileError(f"wrong passphrase for private key {path}") from e
        raise KeyFileError(f"{path} is not a PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"private key {path} must be an EC P-256 key")
    return key


def raw_signature_from_der(der: bytes) -> bytes:
    """Convert a DER ECDSA signature to the fixed 64-byte r||s form bundles carry."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify_raw_signature(public_key: ec.EllipticCurvePublicKey, raw: bytes, data: bytes) -> bool:
    """Check a 64-byte r||s ECDSA-P256-SHA256 signature; ``False`` on any mismatch."""
    if len(raw) != RAW_SIGNATURE_LEN:
        return False
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@runtime_checkable
class Signer(Protocol):
    """Something that signs with a P-256 key: a key file, a PKCS#11 token, a TPM."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA-P256-SHA256 over ``data``, returned as 64 bytes r||s."""
        ...


@dataclass(frozen=True)
class SoftwareSigner:
    """A signer whose private key is in this process (from a key file)."""

    private_key: ec.EllipticCurvePrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return raw_signature_from_der(self.private_key.sign(data, ec.ECDSA(hashes.SHA256())))

    @classmethod
    def from_file(cls, path: Path, *, passphrase: bytes | None) -> SoftwareSigner:
        return cls(load_private_key(path, passphrase=passphrase))


def passphrase_from(file: Path | None, *, env: str = "EDGESEAL_PASSPHRASE") -> bytes | None:
    """A passphrase from a file (first line) or the environment; ``None`` when neither is set."""
    if file is not None:
        try:
            return file.read_bytes().splitlines()[0] if file.stat().st_size else b""
        except OSError as e:
            raise KeyFileError(f"cannot read passphrase file {file}: {e.strerror}") from e
    value = os.environ.get(env)
    return value.encode("utf-8") if value else None
