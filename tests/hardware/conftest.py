"""Real parts for the key stores: a swtpm (TPM 2.0) and a SoftHSM2 token, per test session.

Both come from Debian (swtpm, softhsm2). In CI (EDGESEAL_REQUIRE_ALL_LANES=1) a missing
part fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from edgeseal.hardware.simulators import SoftHsmToken, Swtpm, find_softhsm_module


def _missing(what: str) -> None:
    if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
        pytest.fail(f"{what} is not installed but CI requires this lane")
    pytest.skip(f"{what} is not installed")


def _require_module(name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        _missing(f"the Python module {name}")


@pytest.fixture(scope="session")
def swtpm() -> Iterator[Swtpm]:
    if shutil.which("swtpm") is None:
        _missing("swtpm")
    _require_module("tpm2_pytss")
    tpm = Swtpm.in_tempdir().start()
    try:
        yield tpm
    finally:
        tpm.remove()


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsmToken]:
    if find_softhsm_module() is None or shutil.which("softhsm2-util") is None:
        _missing("softhsm2")
    _require_module("pkcs11")
    token = SoftHsmToken.create(label="edgeseal-test")
    try:
        yield token
    finally:
        token.remove()
