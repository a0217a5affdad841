"""OpenSSF Model Signing (OMS) interop: sign the plaintext model with the signer's key.

The signature is made with the ``model-signing`` library itself (a Sigstore bundle with a
DSSE envelope over an in-toto statement of the model's digests), so the stock
``model_signing verify key`` command accepts it. It is sealed in the bundle's ``extras``
and, on request, written beside the model on the workstation.

Needs ``edgeseal-packager[oms]`` (model-signing, pyOpenSSL). Signers held on a PKCS#11
token are not supported here yet: their OMS signature needs the token's PKCS#11 URI.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from edgeseal.core.errors import MissingExtraError
from edgeseal.core.keys import Signer, SoftwareSigner

__all__ = ["available", "oms_sign"]


def available() -> bool:
    return importlib.util.find_spec("model_signing") is not None


def oms_sign(model: Path, signer: Signer) -> dict[str, Any]:
    """The OMS signature (Sigstore bundle JSON) of the file ``model``."""
    if not available():
        raise MissingExtraError(
            "OMS signing needs model-signing: "
            "pip install 'edgeseal-packager[oms]' (or pack with --no-oms)"
        )
    if not isinstance(signer, SoftwareSigner):
        raise MissingExtraError(
            "OMS signing with a token-held signer is not supported yet; pack with --no-oms"
        )
    from model_signing import signing

    with tempfile.TemporaryDirectory(prefix="edgeseal-oms-") as tmp:
        # The library reads a PEM file: give it one encrypted under a one-time password.
        password = secrets.token_bytes(32)
        key = Path(tmp) / "key.pem"
        key.write_bytes(
            signer.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        )
        key.chmod(0o600)
        sig = Path(tmp) / "model.sig"
        config = signing.Config()  # type: ignore[no-untyped-call]
        # model-signing 1.1 annotates the password as str but hands it to cryptography,
        # which takes bytes only.
        config.use_elliptic_key_signer(private_key=key, password=password)  # type: ignore[arg-type]
        config.sign(model, sig)
        bundle: dict[str, Any] = json.loads(sig.read_bytes())
        return bundle
