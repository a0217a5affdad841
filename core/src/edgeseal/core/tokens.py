"""Signer keys held outside this process (a PKCS#11 HSM or token). Stable API.

The keyring records such a key as a *reference* (``{"kind": "pkcs11", "module",
"token_label", "key_label", "pin_file"}``, never the PIN) and asks a backend to create or
load it. Backends come from other parts through the ``edgeseal.signer_backends`` entry
point (``edgeseal-hardware`` provides ``pkcs11``), so core imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol

from edgeseal.core.errors import MissingExtraError
from edgeseal.core.keys import Signer

__all__ = ["SignerBackend", "signer_backend"]


class SignerBackend(Protocol):
    def create(self, ref: Mapping[str, Any]) -> Signer:
        """Make a new P-256 signing key where ``ref`` says and return its signer."""
        ...

    def load(self, ref: Mapping[str, Any]) -> Signer: ...


def signer_backend(kind: str) -> SignerBackend:
    for ep in entry_points(group="edgeseal.signer_backends"):
        if ep.name == kind:
            backend: SignerBackend = ep.load()
            return backend
    raise MissingExtraError(
        f"no signer backend {kind!r} is installed (pip install 'edgeseal-hardware[{kind}]')"
    )
