"""P-256 keys: key ids, key files, signers and signature checks. Stable API.

Every key in edgeseal is ECDSA/ECDH on NIST P-256 with SHA-256, so that every key can
live in a TPM 2.0, a PKCS#11 token, OP-TEE or a secure element. A key id is the SHA-256
of the public key's DER SubjectPublicKeyInfo, in hex.

Private keys at rest are PKCS#8 PEM, written 0600; a private key file that its group or
others can read is refused. With a passphrase, the PKCS#8 DER is sealed with AES-256-GCM
under a key from Argon2id (64 MiB, 3 passes, 4 lanes, random 16-byte salt) in an
``EDGESEAL ENCRYPTED PRIVATE KEY`` PEM block whose body is base64 canonical JSON
(kdf parameters, salt, nonce, ciphertext).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from edgeseal.core.encoding import b64d, b64e, canonical_json, parse_json_object
from edgeseal.core.errors import KeyFileError, PassphraseFileError
from edgeseal.core.files import atomic_write

__all__ = [
    "ENCRYPTED_PEM",
    "Signer",
    "SoftwareSigner",
    "generate_private_key",
    "key_id",
    "key_protection",
    "load_private_key",
    "load_public_key",
    "passphrase_from",
    "public_key_pem",
    "raw_signature_from_der",
    "verify_raw_signature",
    "write_private_key",
    "write_public_key",
]

ENCRYPTED_PEM = "EDGESEAL ENCRYPTED PRIVATE KEY"
ARGON2 = {"iterations": 3, "lanes": 4, "memory_cost": 65536}
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
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # C1 (docs/fuzzing.md)
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


def _argon2_key(passphrase: bytes, salt: bytes, params: dict[str, int]) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=params["iterations"],
        lanes=params["lanes"],
        memory_cost=params["memory_cost"],
    ).derive(passphrase)


def _encrypt_pkcs8(der: bytes, passphrase: bytes) -> bytes:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    ct = AESGCM(_argon2_key(passphrase, salt, ARGON2)).encrypt(nonce, der, ENCRYPTED_PEM.encode())
    body = base64.encodebytes(
        canonical_json(
            {
                "kdf": "argon2id",
                **ARGON2,
                "salt": b64e(salt),
                "cipher": "AES-256-GCM",
                "nonce": b64e(nonce),
                "ciphertext": b64e(ct),
            }
        )
    ).decode("ascii")
    return f"-----BEGIN {ENCRYPTED_PEM}-----\n{body}-----END {ENCRYPTED_PEM}-----\n".encode()


def _decrypt_pkcs8(pem: bytes, passphrase: bytes, path: Path) -> bytes:
    try:
        body = pem.split(b"-----")[2]
        doc = parse_json_object(base64.b64decode(body), "encrypted key")
        params = {k: int(doc[k]) for k in ARGON2}
        if doc.get("kdf") != "argon2id" or params["memory_cost"] > 4 * 1024 * 1024:
            raise ValueError("unsupported key derivation")
        key = _argon2_key(passphrase, b64d(doc["salt"], "salt"), params)
        return AESGCM(key).decrypt(
            b64d(doc["nonce"], "nonce"), b64d(doc["ciphertext"], "ct"), ENCRYPTED_PEM.encode()
        )
    except InvalidTag as e:
        raise KeyFileError(f"wrong passphrase for private key {path}") from e
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise KeyFileError(f"{path} is not a valid encrypted private key: {e}") from e


def write_private_key(
    path: Path, key: ec.EllipticCurvePrivateKey, *, passphrase: bytes | None
) -> None:
    """Write ``key`` mode 0600, atomically: PKCS#8 PEM, or Argon2id-sealed with a passphrase."""
    if passphrase:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        data = _encrypt_pkcs8(der, passphrase)
    else:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    atomic_write(path, data, mode=0o600)


def key_protection(path: Path) -> str:
    """How a private key file is kept: ``"passphrase"`` (sealed), ``"none"`` (plain PEM)
    or ``"missing"``."""
    try:
        head = path.read_bytes()[:64].lstrip()
    except FileNotFoundError:
        return "missing"
    return "passphrase" if head.startswith(f"-----BEGIN {ENCRYPTED_PEM}-----".encode()) else "none"


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
    encrypted = pem.lstrip().startswith(f"-----BEGIN {ENCRYPTED_PEM}-----".encode())
    if encrypted and not passphrase:
        raise KeyFileError(
            f"private key {path} is encrypted: give its passphrase "
            "(--passphrase-file or EDGESEAL_PASSPHRASE)"
        )
    try:
        if encrypted:
            assert passphrase is not None
            key = serialization.load_der_private_key(_decrypt_pkcs8(pem, passphrase, path), None)
        else:
            key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
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
    """A passphrase from a file (first line) or the environment; ``None`` when neither is set.
    An empty passphrase (an empty file or first line) is an error (ValueError), never
    "no passphrase": that is asked for explicitly (``--no-passphrase``)."""
    if file is not None:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as e:
            raise PassphraseFileError(
                f"cannot read passphrase file {file}: {e.strerror}", path=file
            ) from e
        if not lines or not lines[0].strip():
            raise ValueError(
                f"passphrase file {file} is empty: write the passphrase on its first line "
                "(an unencrypted key needs --no-passphrase)"
            )
        return lines[0]
    value = os.environ.get(env)
    return value.encode("utf-8") if value else None
