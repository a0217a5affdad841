"""Signed OTA control messages (offers and orders), and the transport chunk frame. Pure.

A control message is what the fleet sends a device or a group: an **offer** (install this
bundle) or an **order** (fall back, quarantine now, finalize). On the wire it is JSON::

    {"envelope": <DSSE envelope of the payload>, "certificate": <signer certificate>,
     "revocations": <revocation list, optional>,
     "rotations": [<root rotation statement>, ...] (optional)}

The rotation statements and the revocation list are the trust statements a device may
need to check the certificate (a device that has not followed a root rotation yet
follows it from the message); they are verified from the device's trust state like a
bundle's (V3, V4), and the candidate state is in :attr:`ControlMessage.trust`.

The envelope is signed by a signer whose certificate (from the root) has the ``deploy``
role and a model pattern that matches the message's model. The payload names its target
(one device or one group), carries the signer's sequence number, an issue time and an
expiry. Verification here is pure: bytes, the device's trust anchor, its known
revocations and a reference time in; a :class:`ControlMessage` or an
:class:`OtaMessageError` out. Whether the message is new, a duplicate or a replay is the
updater's decision (:mod:`edgeseal.ota.decide`), which keeps the sequence book.

An offer lists the SHA-256 of every transport chunk of the bundle file (``chunk_bytes``
each, the last one shorter), so a device checks every chunk before it writes it; the
bundle's own signature is checked again once the file is whole.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from edgeseal.core.encoding import (
    b64d,
    b64e,
    canonical_json,
    format_time,
    parse_json_object,
    parse_time,
)
from edgeseal.core.envelope import sign_envelope, verify_envelope
from edgeseal.core.errors import EdgesealError, ExpiredError, SignatureError, TrustError
from edgeseal.core.keys import Signer
from edgeseal.core.manifest import is_bundle_id, validate_name
from edgeseal.core.trust import (
    RevocationList,
    SignerCertificate,
    TrustAnchor,
    verify_revocations,
    verify_signer_certificate,
)
from edgeseal.core.truststate import TrustState
from edgeseal.ota.topics import check_level

__all__ = [
    "ACTIONS",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPE",
    "ChunkFrame",
    "ControlMessage",
    "OtaMessageError",
    "Trial",
    "chunk_digests",
    "decode_chunk",
    "encode_chunk",
    "make_message",
    "verify_message",
]

MESSAGE_TYPE = "application/vnd.edgeseal.ota-message+json"
#: install: an offer; fall-back / quarantine / finalize: orders about the active version.
ACTIONS = frozenset({"install", "fall-back", "quarantine", "finalize"})
#: A control message (with its certificate and revocations) is never larger than this.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: A transport chunk is at most this large (AWS IoT Core's own limit is 128 KiB a message).
MAX_CHUNK_BYTES = 8 * 1024 * 1024
MIN_CHUNK_BYTES = 1024
_CHUNK_MAGIC = b"ESC1"
_CHUNK_HEAD = struct.Struct(">4s16sI")  # magic, bundle id (16 raw bytes), chunk index


class OtaMessageError(EdgesealError):
    """An OTA message was refused: malformed, badly signed, expired, not for this device,
    or a replay. The message is dropped and the refusal reported; nothing changes."""

    hint = "the fleet's controller or signer may be misconfigured, or someone sent this"


#: Bounds of an offer's trial window.
MAX_TRIAL_SECONDS = 7 * 24 * 3600
MAX_TRIAL_REQUESTS = 10**9


@dataclass(frozen=True)
class Trial:
    """An offer's trial window: after the health check passes, run the candidate beside
    the serving model on live traffic for ``seconds``; commit only if it saw at least
    ``min_requests`` and its error and OOD rates stayed within the maxima."""

    seconds: float
    max_error_rate: float
    max_ood_rate: float
    min_requests: int

    def to_obj(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "max_error_rate": self.max_error_rate,
            "max_ood_rate": self.max_ood_rate,
            "min_requests": self.min_requests,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Trial:
        """Parse and bound-check the signed ``trial`` field (OtaMessageError if wrong)."""
        names = ("seconds", "max_error_rate", "max_ood_rate", "min_requests")
        if not isinstance(obj, dict) or set(obj) != set(names):
            raise OtaMessageError(f"offer trial must be an object with exactly {list(names)}")

        def number(name: str, lo: float, hi: float) -> float:
            v = obj[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise OtaMessageError(f"offer trial {name} must be a number in [{lo}, {hi}]")
            return float(v)

        n = obj["min_requests"]
        if type(n) is not int or not 0 <= n <= MAX_TRIAL_REQUESTS:
            raise OtaMessageError(f"offer trial min_requests must be 0..{MAX_TRIAL_REQUESTS}")
        seconds = number("seconds", 0, MAX_TRIAL_SECONDS)
        if seconds <= 0:
            raise OtaMessageError("offer trial seconds must be above 0")
        return cls(seconds, number("max_error_rate", 0, 1), number("max_ood_rate", 0, 1), n)


@dataclass(frozen=True)
class ControlMessage:
    """A verified control message."""

    action: str
    seq: int
    issued: datetime
    expires: datetime
    #: ("device", id) or ("group", name)
    to: tuple[str, str]
    model: str
    version: int
    bundle_id: str
    signer: SignerCertificate
    #: sha256 of the exact wire bytes: duplicates (QoS 1 redelivery, retained) match it.
    digest: str
    rollout: str = ""
    size: int = 0
    sha256: str = ""
    chunk_bytes: int = 0
    chunks: tuple[bytes, ...] = ()
    url: str = ""
    breaking: bool = False
    #: Offers: the trial window on live traffic before commit (None: commit after the
    #: health check).
    trial: Trial | None = None
    reason: str = ""
    revocations: RevocationList | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The device's trust state with this message's rotations and revocations taken:
    #: the device merges it in (it only ever adds).
    trust: TrustState | None = None

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        if index < self.chunk_count - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.chunk_count - 1)


def chunk_digests(data_or_file: Any, chunk_bytes: int) -> tuple[list[bytes], int, str]:
    """(digest per chunk, size, whole-file sha256) of a bytes object or a binary file."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes")
    read = data_or_file.read if hasattr(data_or_file, "read") else None
    whole = hashlib.sha256()
    digests: list[bytes] = []
    size = 0
    view = memoryview(data_or_file) if read is None else None
    while True:
        if read is not None:
            piece = read(chunk_bytes)
        else:
            assert view is not None
            piece = bytes(view[size : size + chunk_bytes])
        if not piece:
            break
        whole.update(piece)
        digests.append(hashlib.sha256(piece).digest())
        size += len(piece)
    return digests, size, whole.hexdigest()


def make_message(
    signer: Signer,
    certificate: Mapping[str, Any],
    *,
    action: str,
    seq: int,
    to: tuple[str, str],
    model: str,
    version: int,
    bundle_id: str,
    now: datetime,
    valid_for: timedelta = timedelta(days=7),
    revocations: Mapping[str, Any] | None = None,
    rotations: Sequence[Mapping[str, Any]] = (),
    **offer: Any,
) -> bytes:
    """Sign a control message. For ``install``, ``offer`` carries ``size``, ``sha256``,
    ``chunk_bytes`` and ``chunks`` (digests), and optionally ``url``, ``breaking``,
    ``trial`` (see :class:`Trial`), ``rollout``; orders may carry ``reason`` and ``rollout``."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {sorted(ACTIONS)}")
    payload: dict[str, Any] = {
        "_type": "ota-message",
        "action": action,
        "seq": seq,
        "issued": format_time(now),
        "expires": format_time(now + valid_for),
        "to": {to[0]: to[1]},
        "model": model,
        "version": version,
        "bundle_id": bundle_id,
    }
    for key, value in offer.items():
        payload[key] = b64e(b"".join(value)) if key == "chunks" else value
    wire: dict[str, Any] = {
        "envelope": sign_envelope(MESSAGE_TYPE, payload, [signer]),
        "certificate": dict(certificate),
    }
    if revocations is not None:
        wire["revocations"] = dict(revocations)
    if rotations:
        wire["rotations"] = [dict(r) for r in rotations]
    return canonical_json(wire)


def _field(payload: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = payload.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OtaMessageError(f"OTA message field {name!r} is missing or not a {kind.__name__}")
    return value


def _verified_payload(
    unverified: Mapping[str, Any],
    state: TrustState,
    known_revocations: RevocationList | None,
    now: datetime,
) -> tuple[SignerCertificate, RevocationList | None, dict[str, Any], TrustState]:
    carried = None
    unverified_rotations = unverified.get("rotations", [])
    if not isinstance(unverified_rotations, list):
        raise OtaMessageError("OTA message rotations must be a list")
    try:
        # V3 for messages: follow the rotations carried from the device's root.
        state = state.follow(unverified_rotations)
        # V4: a carried list must be signed by that root; every list known applies.
        if unverified.get("revocations") is not None:
            state = state.with_revocations(unverified["revocations"])
            carried = verify_revocations(unverified["revocations"], state.anchor)
        revocations = state.effective_revocations(known_revocations)
        cert = verify_signer_certificate(
            unverified.get("certificate"), state.anchor, now=now, revocations=revocations
        )
    except SignatureError as e:
        raise OtaMessageError(f"OTA message trust: {e}") from e
    if not cert.allows_role("deploy"):
        raise TrustError(f"signer {cert.name!r} has no deploy role: it may not send offers")
    try:
        payload = verify_envelope(
            unverified.get("envelope"), MESSAGE_TYPE, {cert.key_id: cert.public_key}
        )
    except SignatureError as e:
        raise OtaMessageError(f"OTA message signature: {e}") from e
    return cert, carried, payload, state


def verify_message(
    unverified_wire: bytes,
    *,
    anchor: TrustAnchor,
    known_revocations: RevocationList | None,
    now: datetime,
    clock_skew: timedelta = timedelta(minutes=5),
    max_bundle_bytes: int = 2**31,
    trust: TrustState | None = None,
) -> ControlMessage:
    """Verify a control message as received. Raises :class:`OtaMessageError` (or a
    :class:`TrustError` branch for certificate and revocation problems).

    ``trust`` is the device's trust state; without it the check starts from ``anchor``
    and ``known_revocations`` alone."""
    if len(unverified_wire) > MAX_MESSAGE_BYTES:
        raise OtaMessageError(f"OTA message of {len(unverified_wire)} bytes is over the limit")
    try:
        unverified = parse_json_object(unverified_wire, "OTA message")
    except ValueError as e:
        raise OtaMessageError(str(e)) from e
    state = trust if trust is not None else TrustState.pinned_to(anchor)
    cert, carried, payload, state = _verified_payload(unverified, state, known_revocations, now)
    if payload.get("_type") != "ota-message":
        raise OtaMessageError("not an OTA message payload")
    action = _field(payload, "action", str)
    if action not in ACTIONS:
        raise OtaMessageError(f"unknown OTA action {action!r}")
    try:
        issued = parse_time(payload.get("issued"), "issued")
        expires = parse_time(payload.get("expires"), "expires")
        model = validate_name(_field(payload, "model", str), "model name")
        to_obj = _field(payload, "to", dict)
        if len(to_obj) != 1 or next(iter(to_obj)) not in {"device", "group"}:
            raise ValueError("'to' must name exactly one device or one group")
        kind, target = next(iter(to_obj.items()))
        check_level(str(target), kind)
    except ValueError as e:
        raise OtaMessageError(f"OTA message: {e}") from e
    if not cert.allows_model(model):
        raise TrustError(f"signer {cert.name!r} may not deploy {model!r} (outside its patterns)")
    if issued > now + clock_skew:
        raise OtaMessageError(f"OTA message issued in the future ({format_time(issued)})")
    if now > expires:
        raise ExpiredError(f"OTA message expired at {format_time(expires)}")
    seq = _field(payload, "seq", int)
    version = _field(payload, "version", int)
    bundle_id = _field(payload, "bundle_id", str)
    if seq < 0 or not 0 <= version < 2**63 or not is_bundle_id(bundle_id):
        raise OtaMessageError("OTA message seq, version or bundle_id out of range")
    common: dict[str, Any] = {
        "action": action,
        "seq": seq,
        "issued": issued,
        "expires": expires,
        "to": (kind, str(target)),
        "model": model,
        "version": version,
        "bundle_id": bundle_id,
        "signer": cert,
        "digest": hashlib.sha256(unverified_wire).hexdigest(),
        "rollout": str(payload.get("rollout", "")),
        "reason": str(payload.get("reason", ""))[:500],
        "revocations": carried,
        "extra": payload,
        "trust": state,
    }
    if action != "install":
        return ControlMessage(**common)
    return ControlMessage(**common, **_offer_fields(payload, max_bundle_bytes))


def _offer_fields(payload: Mapping[str, Any], max_bundle_bytes: int) -> dict[str, Any]:
    size = _field(payload, "size", int)
    chunk_bytes = _field(payload, "chunk_bytes", int)
    if not 0 < size <= max_bundle_bytes:
        raise OtaMessageError(f"offered bundle of {size} bytes is over this device's limit")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise OtaMessageError(f"offered chunk size {chunk_bytes} is out of range")
    try:
        raw = b64d(payload.get("chunks"), "chunks")
    except ValueError as e:
        raise OtaMessageError(str(e)) from e
    count = -(-size // chunk_bytes)
    if len(raw) != 32 * count:
        raise OtaMessageError(f"offer lists {len(raw) // 32} chunk digests, needs {count}")
    url = str(payload.get("url", ""))
    if url and not url.startswith(("https://", "http://")):
        raise OtaMessageError("offer url must be http(s)")
    return {
        "size": size,
        "sha256": _field(payload, "sha256", str),
        "chunk_bytes": chunk_bytes,
        "chunks": tuple(raw[i : i + 32] for i in range(0, len(raw), 32)),
        "url": url,
        "breaking": bool(payload.get("breaking", False)),
        "trial": Trial.from_obj(payload["trial"]) if payload.get("trial") is not None else None,
    }


# --- transport chunk frames ------------------------------------------------------------


@dataclass(frozen=True)
class ChunkFrame:
    bundle_id: str
    index: int
    data: bytes


def encode_chunk(bundle_id: str, index: int, data: bytes) -> bytes:
    return _CHUNK_HEAD.pack(_CHUNK_MAGIC, bytes.fromhex(bundle_id), index) + data


def decode_chunk(unverified_frame: bytes) -> ChunkFrame:
    """Split a data frame; the caller checks ``data`` against the offer's digest."""
    if len(unverified_frame) < _CHUNK_HEAD.size or len(unverified_frame) > (
        _CHUNK_HEAD.size + MAX_CHUNK_BYTES
    ):
        raise OtaMessageError("chunk frame has a bad length")
    magic, raw_id, index = _CHUNK_HEAD.unpack_from(unverified_frame)
    if magic != _CHUNK_MAGIC:
        raise OtaMessageError("chunk frame has a bad magic")
    return ChunkFrame(raw_id.hex(), index, bytes(unverified_frame[_CHUNK_HEAD.size :]))


def fetch_request(bundle_id: str, indices: Sequence[int]) -> bytes:
    """The device's request for some chunks (JSON on its ``fetch`` topic)."""
    return canonical_json({"bundle_id": bundle_id, "chunks": list(indices)})


def parse_fetch(unverified: bytes, *, max_chunks: int = 256) -> tuple[str, list[int]]:
    """The chunk server's view of a fetch request; OtaMessageError if malformed."""
    if len(unverified) > 64 * 1024:
        raise OtaMessageError("fetch request is too large")
    try:
        obj = parse_json_object(unverified, "fetch request")
    except ValueError as e:
        raise OtaMessageError(str(e)) from e
    bundle_id, chunks = obj.get("bundle_id"), obj.get("chunks")
    if not is_bundle_id(bundle_id):
        raise OtaMessageError("fetch request names no bundle")
    if (
        not isinstance(chunks, list)
        or len(chunks) > max_chunks
        or not all(type(c) is int and 0 <= c < 2**32 for c in chunks)
    ):
        raise OtaMessageError("fetch request chunk list is malformed")
    return bundle_id, chunks
