"""OpenSSF model signing (OMS) signatures over the split form a device holds. Pure.
Provisional API.

The packager seals two OMS signatures in ``extras["oms"]``, both by the bundle's signer:

* ``bundle``: over the original ``.onnx`` file, made by the ``model-signing`` library,
  for the workstation (the stock ``model_signing verify key`` accepts it with the file);
* ``split``: over the sections the device runs from, made here: an in-toto statement
  (predicate ``https://model_signing/signature/v1.0``, serialization ``files``, SHA-256)
  whose resources are ``graph`` and ``weights`` with the SHA-256 of each section's
  plaintext, in a DSSE envelope inside a Sigstore bundle, exactly the shape
  ``model-signing`` 1.x writes. The stock tool accepts it too, given a folder holding
  the two sections as files named ``graph`` and ``weights``.

The device cannot check ``bundle`` from memory: the split does not re-serialise to the
original file's bytes. It checks ``split`` (:func:`verify_split_signature`) against its
in-memory buffers before the runtime session is built.

Bytes, keys and digests in; a verified statement out, or :class:`OmsError`. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgeseal.core.errors import BundleError

__all__ = [
    "SPLIT_RESOURCES",
    "OmsError",
    "SplitStatement",
    "split_signature",
    "verify_split_signature",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: The resources of a split-form statement, in the order model-signing lists them.
SPLIT_RESOURCES = ("graph", "weights")
#: The longest DSSE payload accepted (a statement of two digests is under 1 KB).
MAX_PAYLOAD_BYTES = 64 * 1024
_SERIALIZATION = {
    "method": "files",
    "hash_type": "sha256",
    "allow_symlinks": False,
    "ignore_paths": [],
}


class OmsError(BundleError):
    """The sealed OMS signature is missing, malformed, not by the bundle's signer, or
    does not match the model in memory."""

    hint = "the model is refused; re-pack it (with OMS on) or reinstall the bundle"


@dataclass(frozen=True)
class SplitStatement:
    """A verified split-form statement: the model name and each resource's SHA-256."""

    name: str
    digests: dict[str, str]


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature is over."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def _root_digest(digests: Mapping[str, str]) -> str:
    """The subject's digest: SHA-256 over the resources' digests, in their order."""
    h = hashlib.sha256()
    for digest in digests.values():
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


def split_statement(name: str, digests: Mapping[str, str]) -> bytes:
    """The in-toto statement (JSON bytes) of the split form's section digests."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {
                "name": name,
                "digest": {"sha256": _root_digest({r: digests[r] for r in SPLIT_RESOURCES})},
            }
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [
                {"name": r, "algorithm": "sha256", "digest": digests[r]} for r in SPLIT_RESOURCES
            ],
            "serialization": _SERIALIZATION,
        },
    }
    return json.dumps(statement, indent=2).encode()


def split_signature(
    name: str,
    digests: Mapping[str, str],
    *,
    public_key: ec.EllipticCurvePublicKey,
    sign_raw: Any,
) -> dict[str, Any]:
    """The Sigstore bundle (JSON object) signing ``digests`` of the ``graph`` and
    ``weights`` sections. ``sign_raw(data) -> r||s`` is the signer's ECDSA P-256/SHA-256
    (a software key or a token: only the signature leaves it)."""
    payload = split_statement(name, digests)
    raw = sign_raw(_pae(PAYLOAD_TYPE, payload))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": _key_hint(public_key)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(der).decode(), "keyid": ""}],
        },
    }


def verify_split_signature(
    unverified_bundle: object,
    public_key: ec.EllipticCurvePublicKey,
    actual_digests: Mapping[str, str],
) -> SplitStatement:
    """Check an OMS signature against plaintext in memory: signed by ``public_key`` (the
    bundle signer's), a v1.0 model-signing statement whose subject digest matches its
    resources, and whose resources are exactly ``actual_digests`` (resource name to the
    SHA-256 hex of the plaintext in memory: ``graph`` and ``weights`` for an ONNX
    bundle's split form; ``"."`` for a single file sealed whole, a TFLite model's
    ``graph``). Raises :class:`OmsError` naming what was wrong."""
    unverified_payload, der = _envelope(unverified_bundle, public_key)
    try:
        public_key.verify(der, _pae(PAYLOAD_TYPE, unverified_payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise OmsError("the OMS signature does not verify with the bundle signer's key") from None
    name, digests = _statement(unverified_payload, actual_digests)  # verified from here on
    for r, digest in digests.items():
        if digest != actual_digests[r]:
            what = "the model" if r == "." else f"the {r} section"
            raise OmsError(
                f"{what} in memory does not match its OMS digest (changed after "
                "decryption, or sealed from another model)"
            )
    return SplitStatement(name, digests)


def _envelope(
    unverified_bundle: object, public_key: ec.EllipticCurvePublicKey
) -> tuple[bytes, bytes]:
    """(payload, DER signature) of a Sigstore bundle's DSSE envelope, bounded."""
    try:
        if not isinstance(unverified_bundle, dict):
            raise ValueError("not a JSON object")
        if unverified_bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
            raise ValueError("not a Sigstore bundle v0.3")
        hint = unverified_bundle["verificationMaterial"]["publicKey"].get("hint")
        env = unverified_bundle["dsseEnvelope"]
        if env["payloadType"] != PAYLOAD_TYPE:
            raise ValueError(f"payload type {env['payloadType']!r}")
        if not isinstance(env["payload"], str) or len(env["payload"]) > MAX_PAYLOAD_BYTES * 2:
            raise ValueError("payload missing or too long")
        unverified_payload = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        if not isinstance(sigs, list) or len(sigs) != 1:
            raise ValueError("expected exactly one signature")
        der = base64.b64decode(sigs[0]["sig"], validate=True)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as e:
        raise OmsError(f"the OMS signature is malformed: {e}") from e
    if hint and hint != _key_hint(public_key):
        raise OmsError("the OMS signature names another key than the bundle's signer")
    return unverified_payload, der


def _statement(payload: bytes, expected: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """(subject name, resource digests) of a verified model-signing v1.0 statement."""
    try:
        statement = json.loads(payload)
        if statement["_type"] != STATEMENT_TYPE or statement["predicateType"] != PREDICATE_TYPE:
            raise ValueError("not a model-signing v1.0 in-toto statement")
        (subject,) = statement["subject"]
        serial = statement["predicate"]["serialization"]
        if serial.get("method") != "files" or serial.get("hash_type") != "sha256":
            raise ValueError("serialization is not files/sha256")
        digests: dict[str, str] = {}
        for r in statement["predicate"]["resources"]:
            if r["algorithm"] != "sha256" or r["name"] in digests:
                raise ValueError("resources must be distinct sha256 digests")
            digests[str(r["name"])] = str(r["digest"])
        if set(digests) != set(expected):
            raise ValueError(f"resources {sorted(digests)}, expected {sorted(expected)}")
        if subject["digest"]["sha256"] != _root_digest(digests):
            raise ValueError("the subject digest does not match the resources")
        return str(subject["name"]), digests
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise OmsError(f"the OMS statement is not a split-form statement: {e}") from e
