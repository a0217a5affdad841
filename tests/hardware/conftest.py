"""Real parts for the key stores: a swtpm (TPM 2.0) and a SoftHSM2 token, per test session.

Both come from Debian (swtpm, softhsm2). In CI (EDGESEAL_REQUIRE_ALL_LANES=1) a missing
part fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hw_parts import Swtpm

SOFTHSM_MODULES = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
]


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
    pytest.importorskip("tpm2_pytss") if os.environ.get(
        "EDGESEAL_REQUIRE_ALL_LANES"
    ) != "1" else __import__("tpm2_pytss")
    # Unix socket paths are limited to ~107 bytes: keep it short.
    d = Path(tempfile.mkdtemp(prefix="estpm-", dir="/tmp"))
    tpm = Swtpm(d, d / "s")
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class SoftHsm:
    module: str
    token_label: str
    pin: str


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    module = next((m for m in SOFTHSM_MODULES if Path(m).exists()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        _missing("softhsm2")
    pytest.importorskip("pkcs11") if os.environ.get(
        "EDGESEAL_REQUIRE_ALL_LANES"
    ) != "1" else __import__("pkcs11")
    d = Path(tempfile.mkdtemp(prefix="eshsm-"))
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    # SoftHSM2 reads its config once per process: set it before the module first loads.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "edgeseal-test",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield SoftHsm(module, "edgeseal-test", "1234")  # type: ignore[arg-type]
    finally:
        shutil.rmtree(d, ignore_errors=True)
