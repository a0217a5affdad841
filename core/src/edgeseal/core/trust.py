"""The chain of trust: pinned root, root rotation, signer certificates, revocations.

Pure: these functions take documents, keys and a reference time and return verified
objects or raise. No file, socket or key store is touched here. Stable API.

- A device pins one or more root public keys (a :class:`TrustAnchor`).
- A root rotation statement names the next root key; it is signed by the current root
  and by the new key, and its version grows by one.
- A signer certificate binds a signer key to roles (``pack``, ``deploy``), model-name
  patterns and a validity window; it is signed by the root.
- A revocation list, signed by the root, names revoked signer keys; a newer version
  replaces an older one, an older one never replaces a newer one. A device keeps the
  newest list of each root of its chain (:mod:`edgeseal.core.truststate`).
- A root pinned without its version (provisioned after rotations) finds its place in a
  chain from the statement that introduced it (:func:`follow_rotations`).
"""

from __future__ import annotations

import fnmatch
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.encoding import b64d, format_time, parse_json_object, parse_time
from edgeseal.core.envelope import sign_envelope, verify_envelope
from edgeseal.core.errors import ExpiredError, SignatureError, TrustError
from edgeseal.core.keys import Signer, key_id, load_public_key, public_key_pem

__all__ = [
    "REVOCATIONS_TYPE",
    "ROLES",
    "ROTATION_TYPE",
    "SIGNER_TYPE",
    "RevocationList",
    "SignerCertificate",
    "TrustAnchor",
    "apply_rotations",
    "follow_rotations",
    "make_revocations",
    "make_rotation",
    "make_signer_certificate",
    "newest_revocations",
    "rotation_root",
    "verify_revocations",
    "verify_signer_certificate",
]

ROTATION_TYPE = "application/vnd.edgeseal.root-rotation+json"
SIGNER_TYPE = "application/vnd.edgeseal.signer-certificate+json"
REVOCATIONS_TYPE = "application/vnd.edgeseal.revocations+json"
ROLES = frozenset({"pack", "deploy"})
MAX_ROTATIONS = 64
MAX_PATTERNS = 64


@dataclass(frozen=True)
class TrustAnchor:
    """The root key(s) a device trusts now, and the root version they belong to."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]
    version: int = 1

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a trust anchor needs at least one root key")

    @classmethod
    def from_public_keys(
        cls, keys: Iterable[ec.EllipticCurvePublicKey], *, version: int = 1
    ) -> TrustAnchor:
        return cls({key_id(k): k for k in keys}, version)

    @classmethod
    def from_pem_files(cls, blobs: Iterable[bytes], *, version: int = 1) -> TrustAnchor:
        return cls.from_public_keys(
            (load_public_key(b, "root public key") for b in blobs), version=version
        )


@dataclass(frozen=True)
class SignerCertificate:
    """A verified signer certificate."""

    key_id: str
    public_key: ec.EllipticCurvePublicKey
    name: str
    roles: frozenset[str]
    model_patterns: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    issuer: str
    serial: str

    def allows_role(self, role: str) -> bool:
        return role in self.roles

    def allows_model(self, model_name: str) -> bool:
        return any(fnmatch.fnmatchcase(model_name, p) for p in self.model_patterns)


@dataclass(frozen=True)
class RevocationList:
    """A verified revocation list: revoked signer key ids with their reasons."""

    version: int
    issued: datetime
    issuer: str
    revoked: Mapping[str, str] = field(default_factory=dict)
    envelope: Mapping[str, Any] | None = None

    def is_revoked(self, signer_key_id: str) -> bool:
        return signer_key_id in self.revoked


def _require(payload: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SignatureError(f"{what}: field {name!r} is missing or not a {kind.__name__}")
    return value


# --- root rotation -------------------------------------------------------------------


def make_rotation(old_root: Signer, new_root: Signer, *, version: int) -> dict[str, Any]:
    """A statement, signed by both keys, that ``new_root`` is root ``version`` on."""
    payload = {
        "_type": "root-rotation",
        "version": version,
        "previous": old_root.key_id,
        "keyid": new_root.key_id,
        "public_key": public_key_pem(new_root.public_key),
    }
    return sign_envelope(ROTATION_TYPE, payload, [old_root, new_root])


def apply_rotations(anchor: TrustAnchor, unverified_rotations: Sequence[object]) -> TrustAnchor:
    """Follow rotation statements from ``anchor`` (see :func:`follow_rotations`)."""
    return follow_rotations(anchor, unverified_rotations)[0]


def follow_rotations(
    anchor: TrustAnchor, unverified_rotations: Sequence[object]
) -> tuple[TrustAnchor, list[dict[str, Any]]]:
    """Follow rotation statements from ``anchor``; return the root reached and the
    statements used (oldest first), so a caller can keep exactly what it followed.

    First, *locate*: a root pinned without knowing its place in the chain (a device
    provisioned with an already rotated ``root.pub`` pins it as version 1) learns its
    version from the statement that introduced it, which that root itself signed.
    Then *follow*: statements at or below the current version are skipped (already
    applied); each later one must be the next version, signed by the current root and by
    the new key. Statements need not be in order.
    """
    if len(unverified_rotations) > MAX_ROTATIONS:
        raise TrustError(f"more than {MAX_ROTATIONS} root rotations")
    peeked = sorted(
        ((_peek_rotation(u), i) for i, u in enumerate(unverified_rotations)),
        key=lambda p: (p[0][0], p[1]),
    )
    current = anchor
    used: list[dict[str, Any]] = []
    for (version, new_pem), i in peeked:
        if version <= current.version:
            continue
        new_key = _rotation_key(new_pem)
        new_id = key_id(new_key)
        if new_id not in current.keys:
            continue
        unverified = unverified_rotations[i]
        # Locate: the statement that introduced a pinned root, signed by that root.
        verify_envelope(unverified, ROTATION_TYPE, {new_id: new_key}, require=[new_id])
        assert isinstance(unverified, dict)
        current = TrustAnchor(current.keys, version)
        used.append(unverified)
    for (version, new_pem), i in peeked:
        if version <= current.version:
            continue
        unverified = unverified_rotations[i]
        if version != current.version + 1:
            raise TrustError(
                f"root rotation to version {version} skips version {current.version + 1}"
            )
        new_key = _rotation_key(new_pem)
        new_id = key_id(new_key)
        payload = verify_envelope(
            unverified,
            ROTATION_TYPE,
            {**current.keys, new_id: new_key},
            require=[new_id],
        )
        if payload.get("previous") not in current.keys or payload.get("keyid") != new_id:
            raise TrustError("root rotation does not chain from the trusted root")
        # The statement must carry a signature by a current root key besides the new one.
        verify_envelope(unverified, ROTATION_TYPE, current.keys)
        assert isinstance(unverified, dict)
        current = TrustAnchor({new_id: new_key}, version)
        used.append(unverified)
    return current, used


def rotation_root(statement: object) -> tuple[int, ec.EllipticCurvePublicKey]:
    """The version and key a rotation statement introduces (read, not verified: for
    statements :func:`follow_rotations` returned)."""
    version, pem = _peek_rotation(statement)
    return version, _rotation_key(pem)


def _rotation_key(pem: str) -> ec.EllipticCurvePublicKey:
    try:
        return load_public_key(pem, "rotated root key")
    except ValueError as e:
        raise TrustError(str(e)) from e


def _peek_rotation(unverified: object) -> tuple[int, str]:
    """Read version and key from an unverified rotation so it can be verified."""
    if not isinstance(unverified, dict):
        raise TrustError("root rotation must be a JSON object")
    try:
        unverified_payload = parse_json_object(
            b64d(unverified.get("payload"), "rotation payload"), "rotation payload"
        )
    except ValueError as e:
        raise TrustError(str(e)) from e
    version = unverified_payload.get("version")
    pem = unverified_payload.get("public_key")
    if not isinstance(version, int) or isinstance(version, bool) or not isinstance(pem, str):
        raise TrustError("root rotation lacks a version or a public key")
    return version, pem


# --- signer certificates -------------------------------------------------------------


def make_signer_certificate(
    root: Signer,
    signer_public_key: ec.EllipticCurvePublicKey,
    *,
    name: str,
    roles: Iterable[str],
    model_patterns: Iterable[str],
    not_before: datetime,
    not_after: datetime,
) -> dict[str, Any]:
    roles = sorted(set(roles))
    patterns = list(model_patterns)
    if not roles or not set(roles) <= ROLES:
        raise ValueError(f"roles must be a non-empty subset of {sorted(ROLES)}")
    if not patterns or len(patterns) > MAX_PATTERNS:
        raise ValueError("a signer needs between 1 and 64 model-name patterns")
    if not_after <= not_before:
        raise ValueError("a certificate's not_after must come after its not_before")
    payload = {
        "_type": "signer-certificate",
        "keyid": key_id(signer_public_key),
        "public_key": public_key_pem(signer_public_key),
        "name": name,
        "roles": roles,
        "model_patterns": patterns,
        "not_before": format_time(not_before),
        "not_after": format_time(not_after),
        "issuer": root.key_id,
        "serial": secrets.token_hex(16),
    }
    return sign_envelope(SIGNER_TYPE, payload, [root])


def verify_signer_certificate(
    unverified_certificate: object,
    anchor: TrustAnchor,
    *,
    now: datetime | None,
    revocations: RevocationList | None,
) -> SignerCertificate:
    """Verify a certificate against the current root, its validity at ``now`` (skipped
    when ``None``: serving what was checked at install) and revocations."""
    payload = verify_envelope(unverified_certificate, SIGNER_TYPE, anchor.keys)
    what = "signer certificate"
    try:
        public_key = load_public_key(_require(payload, "public_key", str, what), what)
        not_before = parse_time(payload.get("not_before"), f"{what} not_before")
        not_after = parse_time(payload.get("not_after"), f"{what} not_after")
    except ValueError as e:
        raise SignatureError(f"{what} is malformed: {e}") from e
    kid = key_id(public_key)
    if payload.get("keyid") != kid:
        raise SignatureError(f"{what} key id does not match its public key")
    roles = _require(payload, "roles", list, what)
    patterns = _require(payload, "model_patterns", list, what)
    if not all(isinstance(r, str) for r in roles) or not all(isinstance(p, str) for p in patterns):
        raise SignatureError(f"{what} roles and patterns must be strings")
    cert = SignerCertificate(
        key_id=kid,
        public_key=public_key,
        name=str(payload.get("name", "")),
        roles=frozenset(roles),
        model_patterns=tuple(patterns),
        not_before=not_before,
        not_after=not_after,
        issuer=_require(payload, "issuer", str, what),
        serial=str(payload.get("serial", "")),
    )
    if now is not None and not cert.not_before <= now <= cert.not_after:
        raise ExpiredError(
            f"signer certificate {cert.name!r} is valid from {format_time(cert.not_before)} "
            f"to {format_time(cert.not_after)}, not at {format_time(now)}"
        )
    if revocations is not None and revocations.is_revoked(kid):
        raise TrustError(
            f"signer {cert.name!r} ({kid[:16]}) is revoked: {revocations.revoked[kid]}"
        )
    return cert


# --- revocations ---------------------------------------------------------------------


def make_revocations(
    root: Signer, *, version: int, revoked: Mapping[str, str], issued: datetime
) -> dict[str, Any]:
    payload = {
        "_type": "revocations",
        "version": version,
        "issued": format_time(issued),
        "issuer": root.key_id,
        "revoked": [{"keyid": k, "reason": r} for k, r in sorted(revoked.items())],
    }
    return sign_envelope(REVOCATIONS_TYPE, payload, [root])


def verify_revocations(unverified_list: object, anchor: TrustAnchor) -> RevocationList:
    payload = verify_envelope(unverified_list, REVOCATIONS_TYPE, anchor.keys)
    what = "revocation list"
    entries = _require(payload, "revoked", list, what)
    revoked: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise SignatureError(f"{what} has a malformed entry")
        revoked[entry["keyid"]] = str(entry.get("reason", ""))
    try:
        issued = parse_time(payload.get("issued"), f"{what} issued")
    except ValueError as e:
        raise SignatureError(str(e)) from e
    assert isinstance(unverified_list, dict)
    return RevocationList(
        version=_require(payload, "version", int, what),
        issued=issued,
        issuer=_require(payload, "issuer", str, what),
        revoked=revoked,
        envelope=unverified_list,
    )


def newest_revocations(*lists: RevocationList | None) -> RevocationList | None:
    """The highest-version list among those given (an older list never wins)."""
    present = [r for r in lists if r is not None]
    return max(present, key=lambda r: r.version) if present else None
