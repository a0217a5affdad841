"""A device's home directory: identity, key, pinned roots and trusted time.

    device.json     id, key id, key store kind (what provisioning prints)
    device.key      the software key store's key (0600), when the store is software
    roots/*.pub     pinned root public keys
    trusted-time    the latest time this device has seen in signed data
    trust/rotations.json     root rotations followed since provisioning (oldest first)
    trust/revocations.json   the newest root-signed revocation list seen

A device without a real-time clock may boot in 1970; expiry checks use the later of the
system clock and the latest trusted time, so time never moves backwards for them.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeseal.core.encoding import canonical_json, format_time, parse_time, utcnow
from edgeseal.core.errors import KeyFileError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import key_id, load_public_key, public_key_pem
from edgeseal.core.keystore import KeyStore
from edgeseal.core.manifest import validate_name
from edgeseal.core.reader import VerifiedBundle
from edgeseal.core.trust import (
    RevocationList,
    TrustAnchor,
    apply_rotations,
    verify_revocations,
)
from edgeseal.hardware.stores import StoreSpec

__all__ = ["DeviceHome", "machine_architecture"]


def machine_architecture() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@dataclass(frozen=True)
class DeviceHome:
    path: Path

    @property
    def info_path(self) -> Path:
        return self.path / "device.json"

    def init(
        self,
        *,
        root_public_keys: list[bytes],
        device_id: str | None = None,
        passphrase: bytes | None = None,
        store: StoreSpec | None = None,
    ) -> dict[str, Any]:
        """Provision: make the device key in its store, pin the root(s), write device.json."""
        if self.info_path.exists():
            raise KeyFileError(f"{self.path} is already provisioned")
        if not root_public_keys:
            raise ValueError("pin at least one root public key (--root root.pub)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        anchor = TrustAnchor.from_pem_files(root_public_keys)
        for kid, key in anchor.keys.items():
            atomic_write(self.path / "roots" / f"{kid[:16]}.pub", public_key_pem(key).encode())
        spec = store or StoreSpec()
        ks = spec.create(self.path, passphrase=passphrase)
        spec = spec.realized(ks)
        dev_id = validate_name(device_id or f"dev-{ks.key_id[:12]}", "device id")
        info = {
            "device_id": dev_id,
            "key_id": ks.key_id,
            "key_store": ks.kind,
            "hardware_backed": ks.hardware_backed,
            "label": ks.label,
            "store": spec.to_obj(),
            "public_key": public_key_pem(ks.public_key),
            "architecture": machine_architecture(),
        }
        atomic_write(self.info_path, canonical_json(info))
        return info

    def info(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.info_path.read_bytes())
        except FileNotFoundError as e:
            raise KeyFileError(
                f"{self.path} is not a provisioned device home (run: edgeseal agent provision)"
            ) from e
        return data

    def key_store(self, *, passphrase: bytes | None = None) -> KeyStore:
        info = self.info()
        spec = StoreSpec.from_obj(info.get("store", {"kind": "software"}))
        store = spec.load(self.path, passphrase=passphrase)
        if store.key_id != info["key_id"]:
            raise KeyFileError(
                f"the {spec.kind} key store holds another key than device.json names"
            )
        return store

    def pinned_anchor(self) -> TrustAnchor:
        """The root(s) pinned at provisioning."""
        keys = [
            load_public_key(p.read_bytes(), str(p))
            for p in sorted((self.path / "roots").glob("*.pub"))
        ]
        if not keys:
            raise KeyFileError(f"no pinned root in {self.path / 'roots'}")
        return TrustAnchor({key_id(k): k for k in keys})

    def _trust_file(self, name: str) -> Any:
        try:
            return json.loads((self.path / "trust" / name).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise KeyFileError(f"{self.path / 'trust' / name} is not JSON: {e}") from e

    def anchor(self) -> TrustAnchor:
        """The root this device trusts now: the pinned root, followed through the root
        rotations it has accepted (each re-verified here, so an edited file fails)."""
        rotations = self._trust_file("rotations.json") or []
        return apply_rotations(self.pinned_anchor(), rotations)

    def known_revocations(self, anchor: TrustAnchor | None = None) -> RevocationList | None:
        """The newest revocation list this device has seen (verified against the root)."""
        envelope = self._trust_file("revocations.json")
        if envelope is None:
            return None
        return verify_revocations(envelope, anchor or self.anchor())

    def remember_trust(self, bundle: VerifiedBundle) -> None:
        """After accepting a bundle: keep the root rotations it made us follow and its
        revocation list when newer, so an older bundle cannot take them back."""
        if bundle.anchor.version > self.anchor().version:
            atomic_write(
                self.path / "trust" / "rotations.json",
                canonical_json(list(bundle.trust.get("rotations", []))),
            )
        if bundle.revocations is not None:
            self.remember_revocations(bundle.revocations, bundle.anchor)

    def remember_revocations(self, carried: RevocationList, anchor: TrustAnchor) -> None:
        """Keep a verified revocation list (from a bundle or a signed OTA message) when it is
        newer than the one known; an older one never replaces it."""
        known = self.known_revocations(anchor)
        if carried.envelope is not None and (known is None or carried.version > known.version):
            atomic_write(
                self.path / "trust" / "revocations.json", canonical_json(dict(carried.envelope))
            )

    def trusted_now(self, system_now: datetime | None = None) -> datetime:
        """The later of the system clock and the latest trusted time seen."""
        now = system_now or utcnow()
        p = self.path / "trusted-time"
        if p.exists():
            try:
                seen = parse_time(p.read_text().strip(), "trusted-time")
            except ValueError:
                return now
            return max(now, seen)
        return now

    def advance_trusted_time(self, seen: datetime) -> None:
        """Record signed time seen; never moves backwards."""
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=timezone.utc)
        if seen > self.trusted_now(datetime.min.replace(tzinfo=timezone.utc)):
            atomic_write(self.path / "trusted-time", format_time(seen).encode())
