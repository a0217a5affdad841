"""The key-store interface the bundle reader unwraps content keys with. Stable API.

The only private-key operation a device needs is ECDH on P-256: the HPKE receiver path
calls :meth:`KeyStore.ecdh` and does the rest (HKDF, AEAD) on the host, so a private key
held by a TPM 2.0, a PKCS#11 token or a secure element never leaves it. Implementations
live in ``edgeseal.hardware``; :class:`InMemoryKey` is the plain software one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core._hpke import software_ecdh
from edgeseal.core.keys import key_id

__all__ = ["InMemoryKey", "KeyStore"]


@runtime_checkable
class KeyStore(Protocol):
    """A device key that can do P-256 ECDH."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    @property
    def kind(self) -> str:
        """``software``, ``tpm`` or ``pkcs11``."""
        ...

    @property
    def hardware_backed(self) -> bool: ...

    def ecdh(self, peer_point: bytes) -> bytes:
        """The ECDH shared secret (x coordinate, 32 bytes) with a 65-byte uncompressed point.

        Raises :class:`edgeseal.core.errors.KeyStoreError` when the store fails.
        """
        ...


@dataclass(frozen=True)
class InMemoryKey:
    """A software key held in this process: not hardware-backed."""

    private_key: ec.EllipticCurvePrivateKey
    kind: str = "software"
    hardware_backed: bool = False

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def ecdh(self, peer_point: bytes) -> bytes:
        return software_ecdh(self.private_key)(peer_point)
