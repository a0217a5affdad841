"""The HPKE receiver path with the ECDH outside: RFC 9180 A.3 and interop with cryptography."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core import _hpke
from edgeseal.core.errors import DecryptError, KeyStoreError

# RFC 9180 appendix A.3: DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode.
A3 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "skEm": "4995788ef4b9d6132b249ce59a77281493eb39af373d236a1fe415cb0c2d7beb",
    "skRm": "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2",
    "pkRm": "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8"
    "a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0",
    "enc": "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b"
    "78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4",
    "shared_secret": "c0d26aeab536609a572b07695d933b589dcf363ff9d93c93adea537aeabb8cb8",
    "key": "868c066ef58aae6dc589b6cfdd18f97e",
    "base_nonce": "4e0bc5018beba4bf004cca59",
    "exporter_secret": "14ad94af484a7ad3ef40e9f3be99ecc6fa9036df9d4920548424df127ee0d99f",
    "aad0": "436f756e742d30",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "ct0": "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f"
    "39513434",
}
H = {k: bytes.fromhex(v) for k, v in A3.items()}


def _recipient() -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(H["skRm"], "big"), ec.SECP256R1())


def test_rfc9180_a3_keys_match_the_published_points():
    assert _hpke.point_bytes(_recipient().public_key()) == H["pkRm"]
    eph = ec.derive_private_key(int.from_bytes(H["skEm"], "big"), ec.SECP256R1())
    assert _hpke.point_bytes(eph.public_key()) == H["enc"]


def test_rfc9180_a3_kem_and_key_schedule_match_with_external_ecdh():
    dh = _hpke.software_ecdh(_recipient())(H["enc"])
    shared = _hpke.kem_shared_secret(dh, H["enc"], H["pkRm"])
    assert shared == H["shared_secret"]
    assert _hpke.key_schedule(shared, H["info"]) == (
        H["key"],
        H["base_nonce"],
        H["exporter_secret"],
    )


def test_rfc9180_a3_first_encryption_opens_with_external_ecdh():
    plaintext = _hpke.open_with_ecdh(
        H["enc"] + H["ct0"],
        ecdh=_hpke.software_ecdh(_recipient()),
        recipient_point=H["pkRm"],
        info=H["info"],
        aad=H["aad0"],
    )
    assert plaintext == H["pt"]


def _sealed(info: bytes = b"edgeseal test") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _hpke.seal(key.public_key(), b"k" * 32, info=info)


def _open(key: ec.EllipticCurvePrivateKey, sealed: bytes, info: bytes = b"edgeseal test") -> bytes:
    return _hpke.open_with_ecdh(
        sealed,
        ecdh=_hpke.software_ecdh(key),
        recipient_point=_hpke.point_bytes(key.public_key()),
        info=info,
    )


def test_what_cryptography_seals_opens_on_the_external_ecdh_path():
    key, sealed = _sealed()
    assert len(sealed) == _hpke.ENC_LEN + 32 + _hpke.TAG_LEN
    assert _open(key, sealed) == b"k" * 32


def test_a_wrong_recipient_key_is_a_decrypt_error():
    _, sealed = _sealed()
    with pytest.raises(DecryptError):
        _open(ec.generate_private_key(ec.SECP256R1()), sealed)


@pytest.mark.parametrize("offset", [1, 40, 64, 65, 80, 112])
def test_a_flipped_bit_in_enc_or_ciphertext_is_a_decrypt_error(offset):
    key, sealed = _sealed()
    flipped = bytearray(sealed)
    flipped[offset] ^= 0x01
    with pytest.raises(DecryptError):
        _open(key, bytes(flipped))


@pytest.mark.parametrize("length", [0, 1, 64, 65, 80])
def test_a_truncated_wrapped_key_is_a_decrypt_error(length):
    key, sealed = _sealed()
    with pytest.raises(DecryptError):
        _open(key, sealed[:length])


def test_a_different_info_is_a_decrypt_error():
    key, sealed = _sealed(b"bundle one")
    with pytest.raises(DecryptError):
        _open(key, sealed, b"bundle two")


def test_a_key_store_failure_propagates_as_itself():
    key, sealed = _sealed()

    def broken(_: bytes) -> bytes:
        raise KeyStoreError("TPM said no")

    with pytest.raises(KeyStoreError, match="TPM said no"):
        _hpke.open_with_ecdh(
            sealed,
            ecdh=broken,
            recipient_point=_hpke.point_bytes(key.public_key()),
            info=b"edgeseal test",
        )


def test_an_enc_point_off_the_curve_never_reaches_the_key_store():
    key, sealed = _sealed()
    off_curve = b"\x04" + b"\x01" * 64
    calls: list[bytes] = []

    def record(point: bytes) -> bytes:
        calls.append(point)
        return b"\x00" * 32

    with pytest.raises(DecryptError):
        _hpke.open_with_ecdh(
            off_curve + sealed[65:],
            ecdh=record,
            recipient_point=_hpke.point_bytes(key.public_key()),
            info=b"edgeseal test",
        )
    assert calls == []
