"""TPM 2.0 key store: a P-256 ECDH key that never leaves the TPM.

The key is a non-restricted decrypt key with the null scheme (``TPM2_ECDH_ZGen`` refuses
restricted keys) under the owner hierarchy's storage primary key, which is re-created
from its fixed template at every use (same TPM, same template, same key), so only the
child's wrapped blob is kept on disk: it loads into this TPM and no other.

- Optional PCR policy (``pcrs=(7, 16)``): the key works only while those PCRs hold the
  values they had when it was created (the measured boot state).
- Every command runs in a session salted with the storage key and with response
  encryption, so the shared secret does not cross an SPI/I2C bus in the clear.
- Every transient handle is flushed in ``finally`` (swtpm has no resource manager and
  three transient slots).
- The owner password (Jetson provisioning may set one) is given as ``owner_auth``.

Needs the ``edgeseal-hardware[tpm]`` extra (tpm2-pytss) and libtss2 on the system.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeseal.core.encoding import b64d, b64e
from edgeseal.core.errors import KeyFileError, KeyStoreError, MissingExtraError
from edgeseal.core.files import atomic_write
from edgeseal.core.keys import key_id

__all__ = ["LABEL", "TpmKeyStore"]

LABEL = "TPM 2.0 (hardware-backed)"


def _tss() -> Any:
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # ESYS logs expected failures as errors
    try:
        import tpm2_pytss
    except ImportError as e:
        raise MissingExtraError(
            "the TPM key store needs tpm2-pytss and libtss2: "
            "apt install libtss2-dev && pip install 'edgeseal-hardware[tpm]'"
        ) from e
    return tpm2_pytss


@contextlib.contextmanager
def _esapi(tcti: str, owner_auth: str | None) -> Iterator[Any]:
    t = _tss()
    try:
        with t.ESAPI(tcti) as ectx:
            if owner_auth:
                ectx.tr_set_auth(t.ESYS_TR.OWNER, owner_auth)
            yield ectx
    except t.TSS2_Exception as e:
        raise KeyStoreError(f"TPM ({tcti}) refused: {e}") from e


def _primary(ectx: Any) -> Any:
    t = _tss()
    a = t.TPMA_OBJECT
    tmpl = t.TPMT_PUBLIC.parse(
        alg="ecc256:aes128cfb",
        objectAttributes=a.RESTRICTED
        | a.DECRYPT
        | a.FIXEDTPM
        | a.FIXEDPARENT
        | a.SENSITIVEDATAORIGIN
        | a.USERWITHAUTH
        | a.NODA,
    )
    return ectx.create_primary(None, t.TPM2B_PUBLIC(tmpl), t.ESYS_TR.OWNER)[0]


def _pcr_selection(pcrs: Sequence[int]) -> str:
    return "sha256:" + ",".join(str(p) for p in pcrs)


def _session(ectx: Any, srk: Any, *, policy: bool) -> Any:
    """A session salted with the SRK, encrypting the response parameter."""
    t = _tss()
    sym = t.TPMT_SYM_DEF(
        algorithm=t.TPM2_ALG.AES, keyBits={"aes": 128}, mode={"aes": t.TPM2_ALG.CFB}
    )
    kind = t.TPM2_SE.POLICY if policy else t.TPM2_SE.HMAC
    s = ectx.start_auth_session(srk, t.ESYS_TR.NONE, kind, sym, t.TPM2_ALG.SHA256)
    # ENCRYPT alone would drop CONTINUESESSION (it replaces the attributes).
    ectx.trsess_set_attributes(s, t.TPMA_SESSION.ENCRYPT | t.TPMA_SESSION.CONTINUESESSION)
    return s


@dataclass(frozen=True)
class TpmKeyStore:
    """A device key inside a TPM 2.0, used through its wrapped blob."""

    tcti: str
    private_blob: bytes
    public_blob: bytes
    public_key: ec.EllipticCurvePublicKey
    pcrs: tuple[int, ...] = ()
    owner_auth: str | None = field(default=None, repr=False)
    kind: str = "tpm"
    hardware_backed: bool = True

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def label(self) -> str:
        return LABEL + (f", PCR policy {_pcr_selection(self.pcrs)}" if self.pcrs else "")

    @classmethod
    def create(
        cls,
        tcti: str,
        *,
        pcrs: Sequence[int] = (),
        owner_auth: str | None = None,
    ) -> TpmKeyStore:
        t = _tss()
        a = t.TPMA_OBJECT
        pcrs = tuple(sorted(set(pcrs)))
        if any(not 0 <= p <= 23 for p in pcrs):
            raise ValueError("PCR indices must be 0..23")
        with _esapi(tcti, owner_auth) as ectx:
            srk = _primary(ectx)
            try:
                attrs = a.DECRYPT | a.FIXEDTPM | a.FIXEDPARENT | a.SENSITIVEDATAORIGIN | a.NODA
                policy = t.TPM2B_DIGEST()
                if pcrs:
                    trial = ectx.start_auth_session(
                        t.ESYS_TR.NONE,
                        t.ESYS_TR.NONE,
                        t.TPM2_SE.TRIAL,
                        t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL),
                        t.TPM2_ALG.SHA256,
                    )
                    try:
                        ectx.policy_pcr(trial, t.TPM2B_DIGEST(), _pcr_selection(pcrs))
                        policy = ectx.policy_get_digest(trial)
                    finally:
                        ectx.flush_context(trial)
                else:
                    attrs |= a.USERWITHAUTH
                tmpl = t.TPMT_PUBLIC.parse(alg="ecc256:null", objectAttributes=attrs)
                tmpl.authPolicy = policy
                priv, pub, *_ = ectx.create(srk, None, t.TPM2B_PUBLIC(tmpl))
            finally:
                ectx.flush_context(srk)
        public_key = serialization.load_der_public_key(pub.publicArea.to_der())
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return cls(tcti, priv.marshal(), pub.marshal(), public_key, pcrs, owner_auth)

    def save(self, path: Path) -> None:
        """Write the wrapped key blob (useless outside this TPM) and its settings."""
        doc = {
            "kind": "tpm",
            "private": b64e(self.private_blob),
            "public": b64e(self.public_blob),
            "pcrs": list(self.pcrs),
        }
        atomic_write(path, json.dumps(doc).encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path, *, tcti: str, owner_auth: str | None = None) -> TpmKeyStore:
        t = _tss()
        try:
            doc = json.loads(path.read_bytes())
            priv, pub = b64d(doc["private"], "private blob"), b64d(doc["public"], "public blob")
            public, _ = t.TPM2B_PUBLIC.unmarshal(pub)
            public_key = serialization.load_der_public_key(public.publicArea.to_der())
        except FileNotFoundError as e:
            raise KeyFileError(f"TPM key blob {path} does not exist") from e
        except (ValueError, KeyError, TypeError) as e:
            raise KeyFileError(f"{path} is not a TPM key blob: {e}") from e
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return cls(tcti, priv, pub, public_key, tuple(doc.get("pcrs", [])), owner_auth)

    def ecdh(self, peer_point: bytes) -> bytes:
        t = _tss()
        if len(peer_point) != 65 or peer_point[0] != 4:
            raise ValueError("peer point must be 65 bytes, uncompressed")
        point = t.TPM2B_ECC_POINT(t.TPMS_ECC_POINT(x=peer_point[1:33], y=peer_point[33:]))
        with _esapi(self.tcti, self.owner_auth) as ectx:
            srk = _primary(ectx)
            handles = [srk]
            try:
                priv, _ = t.TPM2B_PRIVATE.unmarshal(self.private_blob)
                pub, _ = t.TPM2B_PUBLIC.unmarshal(self.public_blob)
                key = ectx.load(srk, priv, pub)
                handles.append(key)
                session = _session(ectx, srk, policy=bool(self.pcrs))
                handles.append(session)
                if self.pcrs:
                    ectx.policy_pcr(session, t.TPM2B_DIGEST(), _pcr_selection(self.pcrs))
                result = ectx.ecdh_zgen(key, point, session1=session)
                # Keep `result` alive while reading (tpm2-pytss frees the parent otherwise).
                z = bytes(result.point.x)
                del result
                return z
            finally:
                for h in reversed(handles):
                    with contextlib.suppress(t.TSS2_Exception):
                        ectx.flush_context(h)
