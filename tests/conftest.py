"""Shared fixtures: a workstation keyring, simulated devices, sample models and bundles."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeseal.core.config import Config
from edgeseal.core.extras import decode_extras
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import BundleFile, VerifyPolicy, unwrap_content_key
from edgeseal.packager.pack import PackResult, pack_model
from edgeseal.packager.samples import make_onnx_classifier, make_tflite_dense
from helpers import NOW

# CLI runs in tests do not ask PyPI for runtime advisories (tests/packager/test_advisories.py
# serves its own); a user's default is "pypi".
os.environ.setdefault("EDGESEAL_ADVISORIES", "off")


@dataclass
class Fleet:
    ring: Keyring
    devices: dict[str, InMemoryKey]
    tmp: Path

    def policy(self, **kw: object) -> VerifyPolicy:
        base: dict[str, object] = {"anchor": self.ring.anchor(), "now": NOW}
        base.update(kw)
        return VerifyPolicy(**base)  # type: ignore[arg-type]

    def pack(
        self,
        model: Path,
        *,
        name: str = "classifier",
        version: int = 1,
        signer: str = "release",
        to: tuple[str, ...] = ("dev-a",),
        out: Path | None = None,
        **kw: object,
    ) -> tuple[Path, PackResult]:
        sgn, cert = self.ring.load_signer(signer)
        out = out or self.tmp / f"{name}-{version}-{len(list(self.tmp.glob('*.esb')))}.esb"
        result = pack_model(
            model,
            out,
            name=name,
            version=version,
            signer=sgn,
            certificate=cert,
            devices=[self.ring.device(d) for d in to],
            now=NOW,
            revocations=self.ring.revocations(),
            root_rotations=self.ring.rotations(),
            **kw,
        )  # type: ignore[arg-type]
        return out, result

    def extras(self, bundle: Path, device: str = "dev-a") -> dict[str, Any]:
        """The sealed extras section, as the device decrypts it."""
        with BundleFile.open(bundle) as bf:
            vb = bf.verify(self.policy())
            key = unwrap_content_key(vb.manifest, self.devices[device])
            return decode_extras(bf.read_section(vb, "extras", key))


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    ring = Keyring(tmp_path / "keys")
    ring.init_root()
    ring.new_signer(
        "release", roles=["pack"], model_patterns=["*"], days=365, now=NOW - timedelta(days=1)
    )
    devices = {}
    for dev in ("dev-a", "dev-b"):
        key = InMemoryKey(generate_private_key())
        ring.add_device(dev, key.public_key, target=None, key_store="software")
        devices[dev] = key
    return Fleet(ring, devices, tmp_path)


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    p = tmp_path / "classifier.onnx"
    p.write_bytes(make_onnx_classifier(seed=1))
    return p


@pytest.fixture
def tflite_model(tmp_path: Path) -> Path:
    p = tmp_path / "dense.tflite"
    p.write_bytes(make_tflite_dense(seed=2))
    return p


@pytest.fixture
def config() -> Config:
    return Config()


BundleMaker = Callable[..., tuple[Path, PackResult]]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (EDGESEAL_REQUIRE_ALL_LANES=1) a skipped test fails the run: every lane
    (mqtt, tpm, pkcs11, arm64, slow) must have its real parts installed and run."""
    del exitstatus
    if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:5])
        print(f"\nCI requires every lane to run; skipped: {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
