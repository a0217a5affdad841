"""Hazmat room: HPKE base mode (RFC 9180) for one suite, with the receiver's ECDH outside.

Suite: DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM, single-shot (sequence 0,
empty AAD), as in RFC 9180 appendix A.3. Sealing uses ``cryptography``'s own HPKE. The
receiver path is written out here because its one private-key step, ECDH, must be a call
on a key store (TPM2_ECDH_ZGen, CKM_ECDH1_DERIVE) so the key never leaves the chip.
Internal API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeseal.core.errors import DecryptError, KeyStoreError

log = logging.getLogger(__name__)

ENC_LEN = 65
TAG_LEN = 16
EcdhFn = Callable[[bytes], bytes]

_KEM_ID, _KDF_ID, _AEAD_ID = 0x0010, 0x0001, 0x0001
_KEM_SUITE = b"KEM" + _KEM_ID.to_bytes(2, "big")
_HPKE_SUITE = (
    b"HPKE" + _KEM_ID.to_bytes(2, "big") + _KDF_ID.to_bytes(2, "big") + _AEAD_ID.to_bytes(2, "big")
)
_SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)


def seal(recipient: ec.EllipticCurvePublicKey, plaintext: bytes, *, info: bytes) -> bytes:
    """Seal ``plaintext`` to ``recipient``; returns enc (65 bytes) || ciphertext."""
    return _SUITE.encrypt(plaintext, recipient, info=info)


def point_bytes(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Uncompressed SEC1 encoding (65 bytes)."""
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def software_ecdh(private_key: ec.EllipticCurvePrivateKey) -> EcdhFn:
    def ecdh(peer_point: bytes) -> bytes:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
        return private_key.exchange(ec.ECDH(), peer)

    return ecdh


def _extract(salt: bytes, ikm: bytes) -> bytes:
    h = hmac.HMAC(salt or b"\x00" * 32, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        h = hmac.HMAC(prk, hashes.SHA256())
        h.update(block + info + bytes([counter]))
        block = h.finalize()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info, length)


def kem_shared_secret(dh: bytes, enc: bytes, recipient_point: bytes) -> bytes:
    """DHKEM ExtractAndExpand (RFC 9180 4.1)."""
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + recipient_point, 32)


def key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes, bytes]:
    """Base-mode key schedule (RFC 9180 5.1): (key, base_nonce, exporter_secret)."""
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE, secret, b"key", context, 16)
    base_nonce = _labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, 12)
    exporter = _labeled_expand(_HPKE_SUITE, secret, b"exp", context, 32)
    return key, base_nonce, exporter


def open_with_ecdh(
    sealed: bytes, *, ecdh: EcdhFn, recipient_point: bytes, info: bytes, aad: bytes = b""
) -> bytes:
    """Open ``enc || ciphertext`` with the receiver's ECDH done by ``ecdh``.

    Every failure except a key store's own :class:`KeyStoreError` is one
    :class:`DecryptError`.
    """
    try:
        if len(sealed) < ENC_LEN + TAG_LEN or sealed[0] != 0x04:
            raise ValueError("sealed key has the wrong length or point encoding")
        enc, ciphertext = sealed[:ENC_LEN], sealed[ENC_LEN:]
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), enc)  # on the curve?
        dh = ecdh(enc)
        if len(dh) != 32:
            raise ValueError("ECDH returned a secret of the wrong length")
        key, base_nonce, _ = key_schedule(kem_shared_secret(dh, enc, recipient_point), info)
        return AESGCM(key).decrypt(base_nonce, ciphertext, aad)
    except KeyStoreError:
        raise
    except (ValueError, InvalidTag) as e:
        log.debug("HPKE open failed: %r", e)
        raise DecryptError("could not unwrap the content key") from None
