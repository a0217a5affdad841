"""The software key store: a P-256 key in a 0600 file. Not hardware-backed, and says so.

Used where a device has neither a TPM 2.0 nor a PKCS#11 token. The key file is PKCS#8,
encrypted with a passphrase when one is given; anyone who can read the file (and knows
the passphrase) can unwrap every bundle sealed for this device, which is why
``hardware_backed`` is ``False`` and every status names it "software (not
hardware-backed)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.errors import KeyFileError
from edgeseal.core.keys import generate_private_key, load_private_key, write_private_key
from edgeseal.core.keystore import InMemoryKey

__all__ = ["LABEL", "SoftwareKeyStore"]

LABEL = "software (not hardware-backed)"


@dataclass(frozen=True)
class SoftwareKeyStore(InMemoryKey):
    path: Path | None = None

    @property
    def label(self) -> str:
        return LABEL

    @classmethod
    def create(cls, path: Path, *, passphrase: bytes | None = None) -> SoftwareKeyStore:
        if path.exists():
            raise KeyFileError(f"a device key already exists at {path}")
        key: ec.EllipticCurvePrivateKey = generate_private_key()
        write_private_key(path, key, passphrase=passphrase)
        return cls(key, path=path)

    @classmethod
    def load(cls, path: Path, *, passphrase: bytes | None = None) -> SoftwareKeyStore:
        return cls(load_private_key(path, passphrase=passphrase), path=path)
