"""PKCS#11 key store: a P-256 key on a token (OP-TEE, secure element, HSM, SoftHSM2).

``CKM_ECDH1_DERIVE`` with ``CKD_NULL`` and the raw uncompressed peer point gives the
ECDH secret; the HPKE key schedule then runs on the host (edgeseal.core._hpke). The
private key is generated on the token, sensitive and not extractable.

Module quirks (docs/hardware.md): SoftHSM2 reads ``SOFTHSM2_CONF`` once per process and
gives random slot ids (select tokens by label); OP-TEE's ``libckteec.so`` needs the
``tee-supplicant`` running and the ``tee`` snap interface; ATECC608 (cryptoauthlib) and
SE050 (the plug-and-trust module) keep keys in fixed slots, referenced by label.

Needs the ``edgeseal-hardware[pkcs11]`` extra (python-pkcs11).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.errors import KeyFileError, KeyStoreError, MissingExtraError
from edgeseal.core.keys import key_id

__all__ = ["LABEL", "SIGNER_BACKEND", "Pkcs11KeyStore", "Pkcs11Signer", "read_pin"]

LABEL = "PKCS#11 token"
_libs: dict[str, Any] = {}
_lock = threading.Lock()


def _p11() -> Any:
    try:
        import pkcs11
    except ImportError as e:
        raise MissingExtraError(
            "the PKCS#11 key store needs python-pkcs11: pip install 'edgeseal-hardware[pkcs11]'"
        ) from e
    return pkcs11


def _lib(module: str) -> Any:
    p = _p11()
    with _lock:
        if module not in _libs:
            try:
                _libs[module] = p.lib(module)
            except (RuntimeError, OSError) as e:
                raise KeyStoreError(f"cannot load PKCS#11 module {module}: {e}") from e
        return _libs[module]


def _generate_p256(
    module: str, token_label: str, pin: str, key_label: str, *, use: str
) -> ec.EllipticCurvePublicKey:
    """A new P-256 key pair on the token, private half sensitive and not extractable,
    usable for ECDH (``use="derive"``) or ECDSA (``use="sign"``)."""
    p = _p11()
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    a = p.Attribute
    public_use, private_use = (a.DERIVE, a.DERIVE) if use == "derive" else (a.VERIFY, a.SIGN)
    with Pkcs11KeyStore._session(module, token_label, pin, rw=True) as session:
        if list(session.get_objects({a.LABEL: key_label, a.CLASS: p.ObjectClass.PRIVATE_KEY})):
            raise KeyStoreError(f"token {token_label!r} already holds a key {key_label!r}")
        params = session.create_domain_parameters(
            p.KeyType.EC, {a.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        pub, _ = params.generate_keypair(
            store=True,
            label=key_label,
            public_template={public_use: True},
            private_template={private_use: True, a.SENSITIVE: True, a.EXTRACTABLE: False},
        )
        public_key = serialization.load_der_public_key(encode_ec_public_key(pub))
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return public_key


def read_pin(pin_file: str) -> str:
    """The token PIN: the first line of ``pin_file``, else ``$EDGESEAL_PKCS11_PIN``."""
    if pin_file:
        try:
            return Path(pin_file).read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise KeyFileError(f"cannot read the PKCS#11 PIN file {pin_file}") from e
    pin = os.environ.get("EDGESEAL_PKCS11_PIN")
    if not pin:
        raise KeyFileError("the PKCS#11 PIN is not set (--pin-file or EDGESEAL_PKCS11_PIN)")
    return pin


@dataclass(frozen=True)
class Pkcs11KeyStore:
    module: str
    token_label: str
    key_label: str
    public_key: ec.EllipticCurvePublicKey
    pin: str = field(repr=False, default="")
    kind: str = "pkcs11"
    hardware_backed: bool = True

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def label(self) -> str:
        return f"{LABEL} {self.token_label!r} ({self.module})"

    @staticmethod
    @contextlib.contextmanager
    def _session(module: str, token_label: str, pin: str, *, rw: bool = False) -> Iterator[Any]:
        p = _p11()
        try:
            token = _lib(module).get_token(token_label=token_label)
            with token.open(rw=rw, user_pin=pin) as session:
                yield session
        except p.exceptions.PKCS11Error as e:
            raise KeyStoreError(
                f"PKCS#11 token {token_label!r} refused: {type(e).__name__} {e}"
            ) from e

    @classmethod
    def create(cls, module: str, token_label: str, pin: str, *, key_label: str) -> Pkcs11KeyStore:
        public_key = _generate_p256(module, token_label, pin, key_label, use="derive")
        return cls(module, token_label, key_label, public_key, pin)

    @classmethod
    def load(cls, module: str, token_label: str, pin: str, *, key_label: str) -> Pkcs11KeyStore:
        p = _p11()
        from pkcs11.util.ec import encode_ec_public_key

        with cls._session(module, token_label, pin) as session:
            try:
                pub = session.get_key(
                    object_class=p.ObjectClass.PUBLIC_KEY, key_type=p.KeyType.EC, label=key_label
                )
            except (p.NoSuchKey, p.MultipleObjectsReturned) as e:
                raise KeyStoreError(f"token {token_label!r}: no single key {key_label!r}") from e
            public_key = serialization.load_der_public_key(encode_ec_public_key(pub))
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return cls(module, token_label, key_label, public_key, pin)

    def ecdh(self, peer_point: bytes) -> bytes:
        p = _p11()
        a = p.Attribute
        with self._session(self.module, self.token_label, self.pin) as session:
            priv = session.get_key(
                object_class=p.ObjectClass.PRIVATE_KEY, key_type=p.KeyType.EC, label=self.key_label
            )
            secret = priv.derive_key(
                p.KeyType.GENERIC_SECRET,
                256,
                mechanism_param=(p.KDF.NULL, None, bytes(peer_point)),
                template={a.SENSITIVE: False, a.EXTRACTABLE: True, a.TOKEN: False},
            )
            try:
                return bytes(secret[a.VALUE])
            finally:
                secret.destroy()


@dataclass(frozen=True)
class Pkcs11Signer:
    """A P-256 signing key on a PKCS#11 token (an HSM, a YubiKey-class token, SoftHSM2).

    The host hashes with SHA-256 and the token signs the digest with ``CKM_ECDSA``, which
    every token that does P-256 supports; the result is the raw 64-byte r||s.
    """

    module: str
    token_label: str
    key_label: str
    public_key: ec.EllipticCurvePublicKey
    pin: str = field(repr=False, default="")

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        p = _p11()
        digest = hashlib.sha256(data).digest()
        with Pkcs11KeyStore._session(self.module, self.token_label, self.pin) as session:
            priv = session.get_key(
                object_class=p.ObjectClass.PRIVATE_KEY, key_type=p.KeyType.EC, label=self.key_label
            )
            sig = bytes(priv.sign(digest, mechanism=p.Mechanism.ECDSA))
        if len(sig) != 64:
            raise KeyStoreError(f"token returned a {len(sig)}-byte ECDSA signature, expected 64")
        return sig


class _SignerBackend:
    """The ``pkcs11`` entry of ``edgeseal.signer_backends``."""

    def create(self, ref: Mapping[str, Any]) -> Pkcs11Signer:
        module, token, label = str(ref["module"]), str(ref["token_label"]), str(ref["key_label"])
        pin = read_pin(str(ref.get("pin_file") or ""))
        public_key = _generate_p256(module, token, pin, label, use="sign")
        return Pkcs11Signer(module, token, label, public_key, pin)

    def load(self, ref: Mapping[str, Any]) -> Pkcs11Signer:
        store = Pkcs11KeyStore.load(
            str(ref["module"]),
            str(ref["token_label"]),
            read_pin(str(ref.get("pin_file") or "")),
            key_label=str(ref["key_label"]),
        )
        return Pkcs11Signer(
            store.module, store.token_label, store.key_label, store.public_key, store.pin
        )


SIGNER_BACKEND = _SignerBackend()
