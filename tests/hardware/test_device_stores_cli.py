"""Provisioning a device on each key store from the command line, then serving a bundle."""

from __future__ import annotations

import json
import os

import pytest

from helpers import run


def _provision_pack_infer(tmp_path, *store_args: str) -> dict:
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--no-passphrase", env=env)
    info = json.loads(
        run(
            "agent",
            "provision",
            "--home",
            str(tmp_path / "dev"),
            "--root",
            str(tmp_path / "keys/root.pub"),
            "--device-id",
            "hw-01",
            *store_args,
            "--json",
            env=env,
        ).stdout
    )
    assert info["hardware_backed"] is True
    run("keys", "add-device", "hw-01", str(tmp_path / "dev/device.pub.json"), env=env)
    from edgeseal.packager.samples import make_onnx_classifier

    (tmp_path / "m.onnx").write_bytes(make_onnx_classifier())
    run(
        "pack",
        str(tmp_path / "m.onnx"),
        "--name",
        "hw-model",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "hw-01",
        "-o",
        str(tmp_path / "m.esb"),
        env=env,
    )
    out = json.loads(
        run(
            "agent",
            "infer",
            str(tmp_path / "m.esb"),
            "--home",
            str(tmp_path / "dev"),
            "--json",
            env=env,
        ).stdout
    )
    assert not (tmp_path / "dev/device.key").exists()  # no software key was made
    return out["status"]


@pytest.mark.tpm
def test_auto_provisioning_picks_the_tpm_and_serves_from_the_cli(swtpm, tmp_path):
    status = _provision_pack_infer(tmp_path, "--keystore", "auto", "--tcti", swtpm.tcti)
    assert status["key_store"] == "tpm"


@pytest.mark.pkcs11
def test_a_pkcs11_device_is_provisioned_and_serves_from_the_cli(softhsm, tmp_path):
    (tmp_path / "pin").write_text(softhsm.pin + "\n")
    status = _provision_pack_infer(
        tmp_path,
        "--keystore",
        "pkcs11",
        "--pkcs11-module",
        softhsm.module,
        "--token-label",
        softhsm.label,
        "--pin-file",
        str(tmp_path / "pin"),
    )
    assert status["key_store"] == "pkcs11"


def test_auto_falls_back_to_pkcs11_then_software(tmp_path):
    from edgeseal.hardware.stores import choose_store

    missing = f"device:{tmp_path}/tpmrm0"
    module = tmp_path / "lib.so"
    assert choose_store("auto", tcti=missing, pkcs11_module="") == "software"
    assert choose_store("auto", tcti=missing, pkcs11_module=str(module)) == "software"
    module.write_bytes(b"")
    assert choose_store("auto", tcti=missing, pkcs11_module=str(module)) == "pkcs11"
    assert choose_store("software", tcti="swtpm:path=/x", pkcs11_module="") == "software"


@pytest.mark.pkcs11
def test_the_device_table_of_the_config_chooses_the_store(softhsm, tmp_path):
    (tmp_path / "pin").write_text(softhsm.pin + "\n")
    (tmp_path / "edgeseal.toml").write_text(
        "[device]\n"
        'key_store = "pkcs11"\n'
        f'pkcs11_module = "{softhsm.module}"\n'
        f'pkcs11_token_label = "{softhsm.label}"\n'
        f'pkcs11_pin_file = "{tmp_path / "pin"}"\n'
    )
    status = _provision_pack_infer(tmp_path, "--config", str(tmp_path / "edgeseal.toml"))
    assert status["key_store"] == "pkcs11"
