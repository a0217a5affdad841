"""A device's home directory: identity, key, pinned roots and trusted time.

    device.json     id, key id, key store kind (what provisioning prints)
    device.key      the software key store's key (0600), when the store is software
    roots/*.pub     pinned root public keys
    trusted-time    the latest time this device has seen in signed data
    trust/rotations.json     root rotations followed since provisioning (oldest first)
    trust/revocations.json   per root, the newest revocation list it signed (a list)

Together with trusted time they are the device's trust state
(:class:`edgeseal.core.truststate.TrustState`), rebuilt and verified from these files;
what a bundle or an OTA message brings is merged in, never written over them.

A device without a real-time clock may boot in 1970; expiry checks use the later of the
system clock and the latest trusted time, so time never moves backwards for them.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeseal.core.encoding import canonical_json, format_time, parse_time, utcnow
from edgeseal.core.errors import KeyFileError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import key_id, load_public_key, public_key_pem
from edgeseal.core.keystore import KeyStore
from edgeseal.core.manifest import validate_name
from edgeseal.core.reader import VerifiedBundle
from edgeseal.core.trust import RevocationList, TrustAnchor
from edgeseal.core.truststate import TrustState, advanced_time
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

    def trust_state(self) -> TrustState:
        """Everything this device trusts, rebuilt from its files and verified again (an
        edited file fails): the pinned root followed through the rotations it took, the
        revocation list of each root, and trusted time."""
        revocations = self._trust_file("revocations.json") or []
        if isinstance(revocations, dict):  # one list (an object), as earlier agents kept it
            revocations = [revocations]
        if not isinstance(revocations, list):
            raise KeyFileError(f"{self.path / 'trust' / 'revocations.json'} must hold a list")
        return TrustState.restore(
            self.pinned_anchor(),
            rotations=self._trust_file("rotations.json") or [],
            revocations=revocations,
            trusted_time=self._stored_time(),
        )

    def anchor(self) -> TrustAnchor:
        """The root this device trusts now: the pinned root, followed through the root
        rotations it has accepted (each re-verified here, so an edited file fails)."""
        return self.trust_state().anchor

    def known_revocations(self, anchor: TrustAnchor | None = None) -> RevocationList | None:
        """Every signer revoked by the lists this device has seen (each verified against
        the root that signed it). ``anchor`` is ignored (kept for callers)."""
        return self.trust_state().effective_revocations()

    def remember_trust(self, bundle: VerifiedBundle) -> TrustState:
        """After accepting a bundle: merge the trust state it was verified into."""
        return self.remember(bundle.trust_state)

    def remember(self, candidate: TrustState) -> TrustState:
        """Merge a verified candidate state into what this device keeps (never less than
        it knew: see :meth:`TrustState.join`) and write what changed."""
        known = self.trust_state()
        merged = known.join(candidate)
        if [r.get("payload") for r in merged.rotations] != [
            r.get("payload") for r in known.rotations
        ]:
            atomic_write(
                self.path / "trust" / "rotations.json",
                canonical_json([dict(r) for r in merged.rotations]),
            )
        if _list_versions(merged) != _list_versions(known):
            atomic_write(
                self.path / "trust" / "revocations.json",
                canonical_json(merged.revocation_documents()),
            )
        if merged.trusted_time != known.trusted_time and merged.trusted_time is not None:
            atomic_write(self.path / "trusted-time", format_time(merged.trusted_time).encode())
        return merged

    def _stored_time(self) -> datetime | None:
        p = self.path / "trusted-time"
        try:
            return parse_time(p.read_text().strip(), "trusted-time")
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def trusted_now(self, system_now: datetime | None = None) -> datetime:
        """The later of the system clock and the latest trusted time seen."""
        now = system_now or utcnow()
        seen = self._stored_time()
        return now if seen is None else max(now, seen)

    def advance_trusted_time(
        self, seen: datetime, *, clock_skew: timedelta = timedelta(minutes=5)
    ) -> None:
        """Record signed time seen, never beyond this device's clock plus ``clock_skew``
        (:meth:`TrustState.advance_time`); never moves backwards."""
        stored = self._stored_time()
        taken = advanced_time(stored, seen, clock=utcnow(), skew=clock_skew)
        if taken is not None and taken != stored:
            atomic_write(self.path / "trusted-time", format_time(taken).encode())


def _list_versions(state: TrustState) -> dict[str, int]:
    return {k: rl.version for k, rl in state.revocations.items()}
