"""Golden bundles: files packed once and committed, which the reader must keep opening.

A change that breaks them is a format change: bump the format version instead. They are
regenerated only on purpose:

    EDGESEAL_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/core/test_golden.py
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import load_private_key, write_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import VerifyPolicy
from edgeseal.core.targets import get_target
from edgeseal.core.trust import TrustAnchor
from edgeseal.packager.pack import pack_model
from edgeseal.packager.samples import (
    make_onnx_classifier,
    make_tflite_dense,
    reference_onnx_classifier,
    reference_tflite_dense,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PACKED_AT = datetime(2026, 11, 1, 12, 0, 0, tzinfo=timezone.utc)
CASES = {
    "onnx-classifier-v1.esb": ("golden-classifier", "generic"),
    "onnx-classifier-chacha-v1.esb": ("golden-classifier", "rpi4"),
    "tflite-dense-v1.esb": ("golden-dense", "generic"),
}


def _regenerate(tmp: Path) -> None:
    ring = Keyring(tmp / "keys")
    ring.init_root()
    ring.new_signer(
        "golden",
        roles=["pack"],
        model_patterns=["golden-*"],
        days=7300,
        now=PACKED_AT - timedelta(days=1),
    )
    key = tmp / "device.key"
    shutil.copy(GOLDEN / "device.key", key)
    key.chmod(0o600)
    device = InMemoryKey(load_private_key(key, passphrase=None))
    ring.add_device("golden-device", device.public_key, target=None)
    signer, cert = ring.load_signer("golden")
    (tmp / "m.onnx").write_bytes(make_onnx_classifier(seed=1))
    (tmp / "m.tflite").write_bytes(make_tflite_dense(seed=2))
    for name, (model, target) in CASES.items():
        src = tmp / ("m.tflite" if "tflite" in name else "m.onnx")
        pack_model(
            src,
            GOLDEN / name,
            name=model,
            version=1,
            signer=signer,
            certificate=cert,
            devices=ring.devices(),
            target=get_target(target),
            now=PACKED_AT,
            validity=timedelta(days=7300),
        )
    shutil.copy(ring.root_pub_path, GOLDEN / "root.pub")


def _bundle_id(path: Path) -> str:
    data = path.read_bytes()
    manifest_len = int.from_bytes(data[12:16], "big")
    return str(json.loads(data[32 : 32 + manifest_len])["bundle_id"])


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> InMemoryKey:
    tmp = tmp_path_factory.mktemp("golden")
    if os.environ.get("EDGESEAL_REGENERATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        if not (GOLDEN / "device.key").exists():
            from edgeseal.core.keys import generate_private_key

            write_private_key(GOLDEN / "device.key", generate_private_key(), passphrase=None)
        _regenerate(tmp)
        ids = {n: _bundle_id(GOLDEN / n) for n in CASES}
        (GOLDEN / "bundle-ids.json").write_text(json.dumps(ids, indent=2) + "\n")
    # git does not keep 0600: copy the (test-only) key and tighten it before loading.
    key = tmp / "device.key"
    shutil.copy(GOLDEN / "device.key", key)
    key.chmod(0o600)
    return InMemoryKey(load_private_key(key, passphrase=None))


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_bundles_still_open_and_answer_the_same(device, name):
    ids = json.loads((GOLDEN / "bundle-ids.json").read_text())
    policy = VerifyPolicy(
        anchor=TrustAnchor.from_pem_files([(GOLDEN / "root.pub").read_bytes()]),
        now=PACKED_AT + timedelta(days=1),
    )
    with open_bundle(GOLDEN / name, key_store=device, policy=policy, config=Config()) as model:
        m = model.manifest
        assert (m.model_name, m.version, m.bundle_id) == (CASES[name][0], 1, ids[name])
        if "tflite" in name:
            x = np.array([[1.0, -0.5, 0.25, 2.0]], np.float32)
            expected = reference_tflite_dense(x, seed=2)
            got = model.run({"input": x})["output"]
        else:
            x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)
            expected = reference_onnx_classifier(x, seed=1)
            got = model.run({"input": x})["probs"]
        assert m.cipher == ("ChaCha20-Poly1305" if "chacha" in name else "AES-256-GCM")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
