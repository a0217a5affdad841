"""The software key store: a P-256 key in a 0600 file. Not hardware-backed, and says so.

Used where a device has neither a TPM 2.0 nor a PKCS#11 token. The key file is PKCS#8,
encrypted with a passphrase when one is given; anyone who can read the file (and knows
the passphrase) can unwrap every bundle sealed for this device, which is why
``hardware_backed`` is ``False`` and every status names it "software (not
hardware-backed)".

A *machine-bound* key file is encrypted under a secret derived from this machine's
identity (``/etc/machine-id`` and, on boards that have one, the device-tree serial
number): a copied file is useless on another machine, but anyone who is root here can
derive the same secret. It is a speed bump against casual copying, not a hardware key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeseal.core.errors import KeyFileError
from edgeseal.core.keys import generate_private_key, load_private_key, write_private_key
from edgeseal.core.keystore import InMemoryKey

__all__ = ["LABEL", "SoftwareKeyStore", "machine_secret"]

MACHINE_ID_FILES = ("etc/machine-id", "var/lib/dbus/machine-id")
SERIAL_FILES = ("proc/device-tree/serial-number",)


def machine_secret(root: Path = Path("/")) -> bytes:
    """A passphrase derived from this machine's identity (see the module docstring)."""
    ident = b""
    for name in MACHINE_ID_FILES:
        p = root / name
        if p.exists():
            ident = p.read_bytes().strip()
            break
    if not ident:
        raise KeyFileError("no /etc/machine-id: a machine-bound key needs a machine identity")
    serial = next((root / n for n in SERIAL_FILES if (root / n).exists()), None)
    if serial is not None:
        ident += b"\x00" + serial.read_bytes().strip(b"\x00\n ")
    hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=b"edgeseal machine-bound key v1")
    return hkdf.derive(ident).hex().encode()


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
