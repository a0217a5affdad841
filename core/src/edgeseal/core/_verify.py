"""The bundle verifier: V1-V12 of docs/bundle-format.md, pure. Internal.

Bytes, a :class:`VerifyPolicy` (whose ``now`` is the reference time) and a key store in;
a :class:`VerifiedBundle`, an unwrapped content key or a typed error out. No files,
sockets, environment or clock: :mod:`edgeseal.core.reader` is the file shell around it
and re-exports these names, which is where callers import them from. The steps are
numbered as in docs/bundle-format.md ("Verification") and cited at the line that does
them. Nothing here decrypts the payload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from edgeseal.core import _hpke
from edgeseal.core._bundle import content_key_info, signed_message
from edgeseal.core.config import Limits
from edgeseal.core.encoding import format_time, parse_json_object
from edgeseal.core.errors import (
    ExpiredError,
    MalformedBundleError,
    NotARecipientError,
    RollbackError,
    SignatureError,
    TargetMismatchError,
    TrustError,
)
from edgeseal.core.keys import verify_raw_signature
from edgeseal.core.keystore import KeyStore
from edgeseal.core.layout import HEADER_LEN, Header, parse_header
from edgeseal.core.manifest import Manifest
from edgeseal.core.trust import (
    RevocationList,
    SignerCertificate,
    TrustAnchor,
    verify_signer_certificate,
)
from edgeseal.core.truststate import TrustState

__all__ = [
    "VerifiedBundle",
    "VerifyPolicy",
    "check_policy",
    "parse_version",
    "unwrap_content_key",
    "verify_prelude",
]


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ``ValueError`` on anything else."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        raise ValueError(f"not a version number: {text!r}")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class VerifyPolicy:
    """What a reader checks a bundle against.

    ``now=None`` means "serving a bundle that was checked when it was installed": no time
    checks (expiry is checked when installing, never while serving). ``None`` for
    ``floor``, ``architecture``, ``agent_version`` or ``runtimes`` skips that check.
    ``trust`` is the device's whole trust state (root chain, revocations per root); when
    it is ``None`` the reader starts from ``anchor`` alone. ``known_revocations`` adds a
    list to the revoked signers either way.
    """

    anchor: TrustAnchor
    now: datetime | None
    known_revocations: RevocationList | None = None
    trust: TrustState | None = None
    floor: int | None = None
    architecture: str | None = None
    agent_version: str | None = None
    runtimes: tuple[str, ...] | None = None
    clock_skew: timedelta = timedelta(minutes=5)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose prelude passed V1-V11."""

    header: Header
    manifest: Manifest
    manifest_bytes: bytes
    signer: SignerCertificate
    anchor: TrustAnchor
    revocations: RevocationList | None
    trust: dict[str, Any]
    #: The device's trust state as it would be after accepting this bundle (root chain
    #: followed, carried list taken): the store merges it in when it commits.
    trust_state: TrustState
    #: SHA-256 of the verified prelude (header, manifest, trust block, signature): a copy
    #: of this bundle is checked against it (``BundleFile.check_copy_of``), not verified
    #: again.
    prelude_sha256: str = ""


def _unverified_trust(unverified_block: bytes) -> tuple[list[object], object, object]:
    try:
        block = parse_json_object(unverified_block, "trust block")
    except ValueError as e:
        raise MalformedBundleError(str(e)) from e
    rotations = block.get("rotations", [])
    if not isinstance(rotations, list) or "signer" not in block:
        raise MalformedBundleError("trust block lacks a signer certificate or rotation list")
    return rotations, block["signer"], block.get("revocations")


def verify_prelude(
    unverified_prefix: bytes, *, file_len: int, policy: VerifyPolicy
) -> VerifiedBundle:
    """Check everything before the sealed payload. Pure."""
    # V1: fixed header, every length within limits, the file exactly as long as declared.
    header = parse_header(unverified_prefix[:HEADER_LEN], file_len=file_len, limits=policy.limits)
    if len(unverified_prefix) < header.payload_offset:
        raise MalformedBundleError("truncated before the payload")
    unverified_manifest = unverified_prefix[header.manifest_offset : header.trust_offset]
    unverified_trust = unverified_prefix[header.trust_offset : header.signature_offset]
    unverified_sig = unverified_prefix[header.signature_offset : header.payload_offset]
    # V2: the trust block parses (its contents are not trusted yet).
    rotations, unverified_cert, unverified_revocations = _unverified_trust(unverified_trust)
    # V3: follow root rotations from the device's root (pinned, or as far as it followed
    # the chain; a pinned root found inside the chain takes its place there); later steps
    # use the resulting root.
    state = (policy.trust or TrustState.pinned_to(policy.anchor)).follow(rotations)
    anchor = state.anchor
    # V4: a carried revocation list must be signed by that root; it is merged with the
    # lists the device knows (newest per root); every signer any of them names is revoked.
    if unverified_revocations is not None:
        state = state.with_revocations(unverified_revocations)
    revocations = state.effective_revocations(policy.known_revocations)
    # V5: the signer certificate is signed by the root, valid now, not revoked, may pack.
    signer = verify_signer_certificate(
        unverified_cert, anchor, now=policy.now, revocations=revocations
    )
    if not signer.allows_role("pack"):
        raise TrustError(f"signer {signer.name!r} lacks the 'pack' role")
    # V6: the bundle signature covers header, manifest and trust block.
    message = signed_message(unverified_prefix[:HEADER_LEN], unverified_manifest, unverified_trust)
    if not verify_raw_signature(signer.public_key, unverified_sig, message):
        raise SignatureError(f"bundle signature does not verify with signer {signer.name!r}")
    manifest_bytes = unverified_manifest
    # V7: the manifest is well-formed, names this signer, and the model is in its scope.
    # (V11, the section layout, is checked while parsing: see Manifest.from_bytes.)
    manifest = Manifest.from_bytes(
        manifest_bytes, payload_len=header.payload_len, limits=policy.limits
    )
    if manifest.signer != signer.key_id:
        raise SignatureError("manifest names a different signer than the certificate")
    if not signer.allows_model(manifest.model_name):
        raise TrustError(
            f"signer {signer.name!r} may not sign model {manifest.model_name!r} "
            f"(allowed: {', '.join(signer.model_patterns)})"
        )
    check_policy(manifest, policy)
    trust = {
        "rotations": rotations,
        "signer": unverified_cert,
        "revocations": unverified_revocations,
    }
    prelude_sha256 = hashlib.sha256(unverified_prefix[: header.payload_offset]).hexdigest()
    return VerifiedBundle(
        header, manifest, manifest_bytes, signer, anchor, revocations, trust, state, prelude_sha256
    )


def check_policy(manifest: Manifest, policy: VerifyPolicy) -> None:
    """V8-V10 of a verified manifest against ``policy``. Pure. :func:`verify_prelude`
    runs it; an open of a copy of a verified bundle runs it again with its own policy."""
    # V8: at install time the bundle is not expired and not from the future.
    if policy.now is not None:
        if policy.now >= manifest.expires:
            raise ExpiredError(
                f"bundle expired at {format_time(manifest.expires)} "
                f"(trusted time is {format_time(policy.now)})"
            )
        # (now + skew, not created - skew: a signed "created" of year 1 must not overflow)
        if manifest.created > policy.now + policy.clock_skew:
            raise ExpiredError(
                f"bundle was created at {format_time(manifest.created)}, after the trusted "
                f"time {format_time(policy.now)}"
            )
    # V9: the bundle targets this device's architecture, runtime and agent version.
    target = manifest.target
    if policy.architecture is not None and policy.architecture not in target.architectures:
        raise TargetMismatchError(
            f"bundle targets {', '.join(target.architectures)}, this device is "
            f"{policy.architecture}"
        )
    if policy.runtimes is not None and target.runtime not in policy.runtimes:
        raise TargetMismatchError(f"bundle needs runtime {target.runtime!r}, not available here")
    if policy.agent_version is not None:
        try:
            needed = parse_version(target.min_agent_version)
        except ValueError as e:
            raise MalformedBundleError(f"manifest target: {e}") from e
        if parse_version(policy.agent_version) < needed:
            raise TargetMismatchError(
                f"bundle needs agent {target.min_agent_version} or newer, this is "
                f"{policy.agent_version}"
            )
    # V10: never below the version floor.
    if policy.floor is not None and manifest.version < policy.floor:
        raise RollbackError(
            f"{manifest.model_name} version {manifest.version} is below this device's floor "
            f"{policy.floor}"
        )


def unwrap_content_key(manifest: Manifest, key_store: KeyStore) -> bytearray:
    """V12: find this device's wrapped key and unwrap it through the key store's ECDH."""
    # V12: a recipient entry for this key; HPKE with the ECDH done by the key store.
    recipient = manifest.recipient_for(key_store.key_id)
    if recipient is None:
        raise NotARecipientError(
            f"bundle {manifest.model_name} v{manifest.version} is not wrapped for key "
            f"{key_store.key_id[:16]}"
        )
    key = _hpke.open_with_ecdh(
        recipient.sealed_key,
        ecdh=key_store.ecdh,
        recipient_point=_hpke.point_bytes(key_store.public_key),
        info=content_key_info(manifest.bundle_id),
    )
    return bytearray(key)
