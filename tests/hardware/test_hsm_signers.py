"""Workstation keys on a PKCS#11 token: root and signer sign, devices verify."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import generate_private_key, verify_raw_signature
from edgeseal.core.keystore import InMemoryKey
from edgeseal.hardware.pkcs11 import SIGNER_BACKEND, Pkcs11Signer
from helpers import NOW, run


@pytest.fixture
def token_ref(softhsm, tmp_path):
    (tmp_path / "pin").write_text(softhsm.pin + "\n")
    return {
        "kind": "pkcs11",
        "module": softhsm.module,
        "token_label": softhsm.label,
        "pin_file": str(tmp_path / "pin"),
    }


@pytest.mark.pkcs11
def test_a_token_signer_signs_with_a_key_that_never_leaves_it(token_ref):
    signer = SIGNER_BACKEND.create({**token_ref, "key_label": "sig-unit"})
    assert isinstance(signer, Pkcs11Signer)
    sig = signer.sign(b"manifest bytes")
    assert verify_raw_signature(signer.public_key, sig, b"manifest bytes")
    again = SIGNER_BACKEND.load({**token_ref, "key_label": "sig-unit"})
    assert again.key_id == signer.key_id


@pytest.mark.pkcs11
def test_root_and_signer_on_a_token_pack_bundles_devices_accept(token_ref, tmp_path, onnx_model):
    from datetime import timedelta

    from edgeseal.core.reader import VerifyPolicy
    from edgeseal.packager.pack import pack_model

    ring = Keyring(tmp_path / "keys")
    ring.init_root(token=token_ref)
    assert not (tmp_path / "keys/root.key").exists()
    ring.new_signer(
        "hsm-release",
        roles=["pack"],
        model_patterns=["*"],
        days=30,
        now=NOW - timedelta(days=1),
        token=token_ref,
    )
    assert not (tmp_path / "keys/signers/hsm-release.key").exists()
    device = InMemoryKey(generate_private_key())
    ring.add_device("dev-h", device.public_key, target=None)
    signer, cert = ring.load_signer("hsm-release")
    out = tmp_path / "m.esb"
    pack_model(
        onnx_model,
        out,
        name="classifier",
        version=1,
        signer=signer,
        certificate=cert,
        devices=ring.devices(),
        now=NOW,
    )
    policy = VerifyPolicy(anchor=ring.anchor(), now=NOW)
    with open_bundle(out, key_store=device, policy=policy, config=Config()) as model:
        assert model.run({"input": np.ones((1, 8), np.float32)})["probs"].shape == (1, 4)
    # Rotation keeps the root on the token.
    _, version = ring.rotate_root()
    assert version == 2 and (tmp_path / "keys/root.token.json").exists()


@pytest.mark.pkcs11
def test_keys_commands_keep_root_and_signer_on_the_token(token_ref, tmp_path):
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    hsm = [
        "--pkcs11-module",
        token_ref["module"],
        "--token-label",
        token_ref["token_label"],
        "--pin-file",
        token_ref["pin_file"],
    ]
    run("keys", "init-root", *hsm, env=env)
    out = json.loads(run("keys", "new-signer", "cli-hsm", *hsm, "--json", env=env).stdout)
    assert out["signer"]["name"] == "cli-hsm"
    ref = json.loads((tmp_path / "keys/signers/cli-hsm.token.json").read_text())
    assert ref["key_label"].startswith("edgeseal-signer-cli-hsm-") and "pin" not in ref
    assert not list((tmp_path / "keys").rglob("*.key"))
