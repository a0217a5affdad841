"""Signed JSON documents as DSSE envelopes. Stable API.

Root statements, signer certificates and revocation lists travel as DSSE envelopes
(``{"payloadType", "payload", "signatures": [{"keyid", "sig"}]}``): the signature covers
DSSE's pre-authentication encoding of the type and the exact payload bytes, so nothing is
re-serialized to verify, and a document of one type cannot pass as another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.encoding import b64d, b64e, canonical_json, parse_json_object
from edgeseal.core.errors import SignatureError
from edgeseal.core.keys import Signer, verify_raw_signature

__all__ = ["pae", "sign_envelope", "verify_envelope"]

MAX_SIGNATURES = 8


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_envelope(
    payload_type: str, payload: Mapping[str, Any], signers: Sequence[Signer]
) -> dict[str, Any]:
    """Sign ``payload`` (canonical JSON) with every signer given."""
    if not signers:
        raise ValueError("an envelope needs at least one signer")
    body = canonical_json(dict(payload))
    message = pae(payload_type, body)
    return {
        "payloadType": payload_type,
        "payload": b64e(body),
        "signatures": [{"keyid": s.key_id, "sig": b64e(s.sign(message))} for s in signers],
    }


def _unverified_parts(
    unverified_envelope: object, payload_type: str
) -> tuple[bytes, dict[str, bytes]]:
    if not isinstance(unverified_envelope, dict):
        raise SignatureError(f"{payload_type} envelope must be a JSON object")
    if unverified_envelope.get("payloadType") != payload_type:
        raise SignatureError(
            f"expected a {payload_type} document, got {unverified_envelope.get('payloadType')!r}"
        )
    sigs = unverified_envelope.get("signatures")
    if not isinstance(sigs, list) or not 0 < len(sigs) <= MAX_SIGNATURES:
        raise SignatureError(f"{payload_type} envelope has no valid signature list")
    try:
        body = b64d(unverified_envelope.get("payload"), f"{payload_type} payload")
        by_key: dict[str, bytes] = {}
        for entry in sigs:
            if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
                raise ValueError("malformed signature entry")
            by_key[entry["keyid"]] = b64d(entry.get("sig"), "signature")
    except ValueError as e:
        raise SignatureError(f"{payload_type} envelope is malformed: {e}") from e
    return body, by_key


def verify_envelope(
    unverified_envelope: object,
    payload_type: str,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    *,
    require: Sequence[str] = (),
) -> dict[str, Any]:
    """Verify and return the payload.

    At least one signature must be by a key in ``keys``, and every key id in ``require``
    must have signed. Raises :class:`SignatureError` otherwise.
    """
    body, by_key = _unverified_parts(unverified_envelope, payload_type)
    message = pae(payload_type, body)
    good = {
        kid
        for kid, sig in by_key.items()
        if kid in keys and verify_raw_signature(keys[kid], sig, message)
    }
    if not good:
        raise SignatureError(f"{payload_type} is not signed by a trusted key")
    missing = [kid for kid in require if kid not in good]
    if missing:
        raise SignatureError(f"{payload_type} lacks a valid signature by {missing[0][:16]}")
    try:
        return parse_json_object(body, f"{payload_type} payload")
    except ValueError as e:
        raise SignatureError(str(e)) from e
