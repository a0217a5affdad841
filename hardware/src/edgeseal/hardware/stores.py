"""Which key store a device uses, and how to create or reopen its key. Stable API.

A :class:`StoreSpec` is what ``device.json`` records (never a secret: the PKCS#11 PIN
comes from a file or ``EDGESEAL_PKCS11_PIN``, the TPM owner password from
``EDGESEAL_TPM_OWNER_AUTH``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeseal.core.keystore import KeyStore

__all__ = ["StoreSpec", "choose_store"]

KINDS = ("software", "tpm", "pkcs11")


@dataclass(frozen=True)
class StoreSpec:
    kind: str = "software"
    tcti: str = "device:/dev/tpmrm0"
    pcrs: tuple[int, ...] = ()
    module: str = ""
    token_label: str = ""
    key_label: str = "edgeseal-device"
    pin_file: str = ""
    #: software only: encrypt the key file under a secret derived from this machine.
    machine_bound: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"key store must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "pkcs11" and not (self.module and self.token_label):
            raise ValueError("a PKCS#11 key store needs --pkcs11-module and --token-label")

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"kind": self.kind}
        if self.kind == "software":
            obj.update(machine_bound=self.machine_bound)
        if self.kind == "tpm":
            obj.update(tcti=self.tcti, pcrs=list(self.pcrs))
        if self.kind == "pkcs11":
            obj.update(
                module=self.module,
                token_label=self.token_label,
                key_label=self.key_label,
                pin_file=self.pin_file,
            )
        return obj

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> StoreSpec:
        known = {
            "kind",
            "tcti",
            "pcrs",
            "module",
            "token_label",
            "key_label",
            "pin_file",
            "machine_bound",
        }
        values = {k: v for k, v in obj.items() if k in known}
        if "pcrs" in values:
            values["pcrs"] = tuple(values["pcrs"])
        return cls(**values)

    def _pin(self) -> str:
        from edgeseal.hardware.pkcs11 import read_pin

        return read_pin(self.pin_file)

    def create(self, home: Path, *, passphrase: bytes | None = None) -> Any:
        if self.kind == "tpm":
            from edgeseal.hardware.tpm import TpmKeyStore

            tpm = TpmKeyStore.create(
                self.tcti, pcrs=self.pcrs, owner_auth=os.environ.get("EDGESEAL_TPM_OWNER_AUTH")
            )
            tpm.save(home / "device.tpm.json")
            return tpm
        if self.kind == "pkcs11":
            from edgeseal.hardware.pkcs11 import Pkcs11KeyStore

            # A token may serve several device identities: make the default label unique.
            label = self.key_label
            if label == StoreSpec.key_label:
                label = f"{label}-{secrets.token_hex(4)}"
            return Pkcs11KeyStore.create(
                self.module, self.token_label, self._pin(), key_label=label
            )
        from edgeseal.hardware.software import SoftwareKeyStore

        return SoftwareKeyStore.create(home / "device.key", passphrase=self._secret(passphrase))

    def realized(self, store: Any) -> StoreSpec:
        """This spec as it was carried out (the PKCS#11 key label actually used)."""
        label = getattr(store, "key_label", None)
        return dataclasses.replace(self, key_label=label) if label else self

    def load(self, home: Path, *, passphrase: bytes | None = None) -> KeyStore:
        if self.kind == "tpm":
            from edgeseal.hardware.tpm import TpmKeyStore

            return TpmKeyStore.load(
                home / "device.tpm.json",
                tcti=self.tcti,
                owner_auth=os.environ.get("EDGESEAL_TPM_OWNER_AUTH"),
            )
        if self.kind == "pkcs11":
            from edgeseal.hardware.pkcs11 import Pkcs11KeyStore

            return Pkcs11KeyStore.load(
                self.module, self.token_label, self._pin(), key_label=self.key_label
            )
        from edgeseal.hardware.software import SoftwareKeyStore

        return SoftwareKeyStore.load(home / "device.key", passphrase=self._secret(passphrase))

    def _secret(self, passphrase: bytes | None) -> bytes | None:
        if not self.machine_bound:
            return passphrase
        from edgeseal.hardware.software import machine_secret

        return machine_secret() + (b":" + passphrase if passphrase else b"")


def choose_store(requested: str, *, tcti: str, pkcs11_module: str) -> str:
    """Resolve ``auto`` to the strongest store present: a TPM (its device node exists, or
    a non-device TCTI such as swtpm was given, and tpm2-pytss is installed), else a
    configured PKCS#11 module that exists, else software."""
    if requested != "auto":
        return requested
    tpm_present = Path(tcti.split(":", 1)[1]).exists() if tcti.startswith("device:") else bool(tcti)
    if tpm_present and importlib.util.find_spec("tpm2_pytss") is not None:
        return "tpm"
    if pkcs11_module and Path(pkcs11_module).exists():
        return "pkcs11"
    return "software"
