"""The workstation's keys: the offline root, signers, revocations, the device registry.

A keyring is a directory (``--keys-dir``, ``$EDGESEAL_KEYS``, default
``~/.local/share/edgeseal/keys``)::

    root.key  root.pub  root.json     the current root (root.json: version, key id)
    root-N.key  root-N.pub            former roots (N: the version they were)
    rotations.json                    root rotation statements, oldest first
    signers/NAME.key  NAME.cert.json  signer keys and their root-signed certificates
    revocations.json                  the newest revocation list, signed by the current
                                      root (rotate-root issues it again under the new one)
    devices.json                      the device registry: id -> public key, target

Private keys are written 0600 and refused when group- or world-readable.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.encoding import b64d, canonical_json, format_time, parse_json_object, utcnow
from edgeseal.core.errors import EdgesealError, KeyFileError, SignatureError, UnknownNameError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import (
    Signer,
    SoftwareSigner,
    generate_private_key,
    key_id,
    load_public_key,
    public_key_pem,
    write_private_key,
    write_public_key,
)
from edgeseal.core.manifest import validate_name
from edgeseal.core.tokens import signer_backend
from edgeseal.core.trust import (
    TrustAnchor,
    make_revocations,
    make_rotation,
    make_signer_certificate,
    verify_revocations,
)

__all__ = [
    "DevicePublicKey",
    "DeviceRecord",
    "Keyring",
    "default_keys_dir",
    "parse_device_public_key",
]


def default_keys_dir() -> Path:
    env = os.environ.get("EDGESEAL_KEYS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "edgeseal/keys"


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    public_key: ec.EllipticCurvePublicKey
    key_id: str
    target: str | None
    key_store: str
    added: str

    def to_obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key_id": self.key_id,
            "public_key": public_key_pem(self.public_key),
            "target": self.target,
            "key_store": self.key_store,
            "added": self.added,
        }


@dataclass(frozen=True)
class DevicePublicKey:
    """What a device's public key file says: the key, and from the JSON ``edgeseal agent
    provision`` prints, the device id, key store kind and CPU architecture it names."""

    key: ec.EllipticCurvePublicKey
    device_id: str | None = None
    key_store: str = "unknown"
    architecture: str | None = None


def parse_device_public_key(data: bytes) -> DevicePublicKey:
    """A device public key from a PEM file or the JSON ``edgeseal agent provision`` prints."""
    if data.lstrip().startswith(b"{"):
        obj = parse_json_object(data, "device JSON")
        pem = obj.get("public_key")
        if not isinstance(pem, str):
            raise ValueError("device JSON has no public_key")
        key = load_public_key(pem, "device public key")
        if obj.get("key_id") not in (None, key_id(key)):
            raise ValueError("device JSON key_id does not match its public key")
        dev, arch = obj.get("device_id"), obj.get("architecture")
        return DevicePublicKey(
            key,
            dev if isinstance(dev, str) else None,
            str(obj.get("key_store", "unknown")),
            arch if isinstance(arch, str) else None,
        )
    return DevicePublicKey(load_public_key(data, "device public key"))


class Keyring:
    """The files under a keys directory, and the operations on them."""

    def __init__(self, path: Path, *, passphrase: bytes | None = None) -> None:
        self.path = Path(path)
        self.passphrase = passphrase

    # -- root ----------------------------------------------------------------------
    @property
    def root_key_path(self) -> Path:
        return self.path / "root.key"

    @property
    def root_pub_path(self) -> Path:
        return self.path / "root.pub"

    def _root_meta(self) -> dict[str, Any]:
        try:
            return parse_json_object(self._read(self.path / "root.json"), "root.json")
        except ValueError as e:
            raise KeyFileError(str(e)) from e

    def _read(self, p: Path) -> bytes:
        try:
            return p.read_bytes()
        except FileNotFoundError as e:
            hint = " (run: edgeseal keys init-root)" if p.parent == self.path else ""
            raise KeyFileError(f"{p} does not exist{hint}") from e

    @property
    def root_token_path(self) -> Path:
        return self.path / "root.token.json"

    def _new_key(
        self,
        key_path: Path,
        token_path: Path,
        token: Mapping[str, Any] | None,
        key_label: str,
        passphrase: bytes | None,
    ) -> Signer:
        """A new signing key: in a file, or on a token (recorded by reference)."""
        if token is not None:
            # A token may hold the keys of several keyrings: make the label unique.
            ref = {**token, "key_label": f"{key_label}-{secrets.token_hex(4)}"}
            signer = signer_backend(str(ref["kind"])).create(ref)
            atomic_write(token_path, canonical_json(ref), mode=0o600)
            return signer
        key = generate_private_key()
        write_private_key(key_path, key, passphrase=passphrase)
        return SoftwareSigner(key)

    @staticmethod
    def _load_key(key_path: Path, token_path: Path, passphrase: bytes | None) -> Signer:
        if token_path.exists():
            ref = json.loads(token_path.read_bytes())
            return signer_backend(str(ref["kind"])).load(ref)
        return SoftwareSigner.from_file(key_path, passphrase=passphrase)

    def init_root(self, *, force: bool = False, token: Mapping[str, Any] | None = None) -> str:
        """Create the root key, in a file or (``token``) on a PKCS#11 token."""
        if (self.root_key_path.exists() or self.root_token_path.exists()) and not force:
            raise KeyFileError(f"a root key already exists in {self.path}; use keys rotate-root")
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        root = self._new_key(
            self.root_key_path, self.root_token_path, token, "edgeseal-root-1", self.passphrase
        )
        write_public_key(self.root_pub_path, root.public_key)
        kid = root.key_id
        atomic_write(self.path / "root.json", canonical_json({"version": 1, "keyid": kid}))
        atomic_write(self.path / "rotations.json", b"[]")
        return kid

    def root_signer(self) -> Signer:
        return self._load_key(self.root_key_path, self.root_token_path, self.passphrase)

    def anchor(self) -> TrustAnchor:
        meta = self._root_meta()
        return TrustAnchor.from_pem_files(
            [self._read(self.root_pub_path)], version=int(meta["version"])
        )

    def rotations(self) -> list[dict[str, Any]]:
        p = self.path / "rotations.json"
        if not p.exists():
            return []
        data = json.loads(p.read_bytes())
        if not isinstance(data, list):
            raise KeyFileError(f"{p} must hold a list")
        return data

    def rotate_root(self) -> tuple[str, int]:
        """Make a new root, signed over by the old one; the old key is kept as root-N.key."""
        old = self.root_signer()
        version = int(self._root_meta()["version"]) + 1
        revoked = self._verified_revocations()
        write_public_key(self.path / f"root-{version - 1}.pub", old.public_key)
        token = None
        if self.root_token_path.exists():  # the new root goes where the old one is
            token = json.loads(self.root_token_path.read_bytes())
            self.root_token_path.rename(self.path / f"root-{version - 1}.token.json")
        else:
            self.root_key_path.rename(self.path / f"root-{version - 1}.key")
        new = self._new_key(
            self.root_key_path,
            self.root_token_path,
            token,
            f"edgeseal-root-{version}",
            self.passphrase,
        )
        statement = make_rotation(old, new, version=version)
        write_public_key(self.root_pub_path, new.public_key)
        atomic_write(self.path / "rotations.json", canonical_json([*self.rotations(), statement]))
        atomic_write(
            self.path / "root.json", canonical_json({"version": version, "keyid": new.key_id})
        )
        # Certificates signed by the old root are void under the new one; the revocation
        # list is issued again by the new root (devices check a list against the root
        # they trust now), so nothing revoked comes back.
        if revoked is not None:
            self._write_revocations(new, revoked[1], version=revoked[0] + 1)
        return new.key_id, version

    # -- signers -------------------------------------------------------------------
    def signer_paths(self, name: str) -> tuple[Path, Path]:
        validate_name(name, "signer name")
        return self.path / "signers" / f"{name}.key", self.path / "signers" / f"{name}.cert.json"

    def _signer_token_path(self, name: str) -> Path:
        return self.path / "signers" / f"{validate_name(name, 'signer name')}.token.json"

    def new_signer(
        self,
        name: str,
        *,
        roles: Iterable[str],
        model_patterns: Iterable[str],
        days: int,
        signer_passphrase: bytes | None = None,
        now: datetime | None = None,
        token: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A signer key (in a file, or on a PKCS#11 token) and its root-signed certificate."""
        key_path, cert_path = self.signer_paths(name)
        if cert_path.exists():
            raise KeyFileError(f"signer {name!r} already exists in {self.path}")
        root = self.root_signer()
        key_path.parent.mkdir(parents=True, exist_ok=True)
        signer = self._new_key(
            key_path,
            self._signer_token_path(name),
            token,
            f"edgeseal-signer-{name}",
            signer_passphrase,
        )
        start = now or utcnow()
        cert = make_signer_certificate(
            root,
            signer.public_key,
            name=name,
            roles=roles,
            model_patterns=model_patterns,
            not_before=start - timedelta(minutes=5),
            not_after=start + timedelta(days=days),
        )
        atomic_write(cert_path, canonical_json(cert))
        return cert

    def load_signer(
        self, name: str, *, signer_passphrase: bytes | None = None
    ) -> tuple[Signer, dict[str, Any]]:
        key_path, cert_path = self.signer_paths(name)
        if not cert_path.exists() and self.root_pub_path.exists():
            known = ", ".join(self.signer_names()) or "none yet: edgeseal keys new-signer"
            raise UnknownNameError(f"no signer {name!r} in {self.path} (known: {known})")
        cert = json.loads(self._read(cert_path))
        signer = self._load_key(key_path, self._signer_token_path(name), signer_passphrase)
        return signer, cert

    def signer_names(self) -> list[str]:
        d = self.path / "signers"
        return (
            sorted(p.name[: -len(".cert.json")] for p in d.glob("*.cert.json"))
            if d.exists()
            else []
        )

    def certificate_payload(self, name: str) -> dict[str, Any]:
        _, cert_path = self.signer_paths(name)
        cert = json.loads(self._read(cert_path))
        return parse_json_object(b64d(cert["payload"], "certificate"), "certificate")

    # -- revocations ---------------------------------------------------------------
    def revocations(self) -> dict[str, Any] | None:
        p = self.path / "revocations.json"
        return json.loads(p.read_bytes()) if p.exists() else None

    def revoke(self, signer: str, *, reason: str, now: datetime | None = None) -> int:
        """Add a signer (name or key id) to the root-signed revocation list."""
        kid = signer
        if not re.fullmatch(r"[0-9a-f]{64}", signer):
            kid = str(self.certificate_payload(signer)["keyid"])
        existing = self._verified_revocations()
        version, revoked = (existing[0] + 1, dict(existing[1])) if existing else (1, {})
        revoked[kid] = reason
        self._write_revocations(self.root_signer(), revoked, version=version, now=now)
        return version

    def _write_revocations(
        self,
        root: Signer,
        revoked: Mapping[str, str],
        *,
        version: int,
        now: datetime | None = None,
    ) -> None:
        doc = make_revocations(root, version=version, revoked=revoked, issued=now or utcnow())
        atomic_write(self.path / "revocations.json", canonical_json(doc))

    def _verified_revocations(self) -> tuple[int, dict[str, str]] | None:
        """(version, revoked) of the keyring's list, verified under the current root or a
        former one (a keyring rotated by an older edgeseal kept the old root's list)."""
        current = self.revocations()
        if current is None:
            return None
        for anchor in self._current_and_former_roots():
            try:
                rl = verify_revocations(current, anchor)
            except SignatureError:
                continue
            return rl.version, dict(rl.revoked)
        raise KeyFileError(
            f"{self.path / 'revocations.json'} is not signed by this keyring's root or a former one"
        )

    def _current_and_former_roots(self) -> Iterator[TrustAnchor]:
        """The current root, then former ones (root-N.pub, or the key file of a former
        root rotated by an older edgeseal, which kept no root-N.pub), opened lazily."""
        yield self.anchor()
        for p in sorted(self.path.glob("root-*.pub")):
            yield TrustAnchor.from_pem_files([p.read_bytes()])
        for p in sorted(self.path.glob("root-*.key")):
            try:
                signer = self._load_key(p, self.path / f"{p.stem}.token.json", self.passphrase)
            except (EdgesealError, ValueError, OSError):  # cannot open it here: skip it
                continue
            yield TrustAnchor.from_public_keys([signer.public_key])

    # -- devices -------------------------------------------------------------------
    def _devices_obj(self) -> dict[str, Any]:
        p = self.path / "devices.json"
        if not p.exists():
            return {}
        data = json.loads(p.read_bytes())
        return dict(data.get("devices", {}))

    def devices(self) -> list[DeviceRecord]:
        out = []
        for dev_id, d in sorted(self._devices_obj().items()):
            out.append(
                DeviceRecord(
                    dev_id,
                    load_public_key(d["public_key"]),
                    d["key_id"],
                    d.get("target"),
                    d.get("key_store", "unknown"),
                    d["added"],
                )
            )
        return out

    def device(self, dev_id: str) -> DeviceRecord:
        for d in self.devices():
            if d.id == dev_id:
                return d
        raise UnknownNameError(
            f"device {dev_id!r} is not in the registry (edgeseal keys add-device)"
        )

    def add_device(
        self,
        dev_id: str,
        key: ec.EllipticCurvePublicKey,
        *,
        target: str | None,
        key_store: str = "unknown",
    ) -> DeviceRecord:
        validate_name(dev_id, "device id")
        devices = self._devices_obj()
        rec = DeviceRecord(dev_id, key, key_id(key), target, key_store, format_time(utcnow()))
        devices[dev_id] = rec.to_obj()
        atomic_write(self.path / "devices.json", canonical_json({"devices": devices}))
        return rec

    def remove_device(self, dev_id: str) -> None:
        devices = self._devices_obj()
        if dev_id not in devices:
            raise KeyFileError(f"device {dev_id!r} is not in the registry")
        del devices[dev_id]
        atomic_write(self.path / "devices.json", canonical_json({"devices": devices}))
