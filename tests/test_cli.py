"""The edgeseal command end to end, as a user runs it: outputs, --json and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgeseal.packager.samples import make_onnx_classifier, reference_onnx_classifier
from helpers import run


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    env.pop("EDGESEAL_PASSPHRASE", None)
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--models", "cls-*", "--no-passphrase", env=env)
    run(
        "agent",
        "provision",
        "--home",
        str(tmp_path / "dev"),
        "--root",
        str(tmp_path / "keys/root.pub"),
        "--device-id",
        "cam-01",
        env=env,
    )
    run("keys", "add-device", "cam-01", str(tmp_path / "dev/device.pub.json"), env=env)
    (tmp_path / "m.onnx").write_bytes(make_onnx_classifier(seed=3))
    run(
        "pack",
        str(tmp_path / "m.onnx"),
        "--name",
        "cls-a",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "cam-01",
        "-o",
        str(tmp_path / "m.esb"),
        env=env,
    )
    return tmp_path, env


def test_pack_inspect_verify_and_infer_work_end_to_end(workspace):
    tmp, env = workspace
    info = json.loads(run("inspect", str(tmp / "m.esb"), "--json", env=env).stdout)
    assert info["verified"] is False
    assert info["manifest"]["model"] == {"name": "cls-a", "version": 1, "format": "onnx"}
    assert [r["device"] for r in info["manifest"]["recipients"]] == ["cam-01"]
    verified = json.loads(
        run(
            "verify",
            str(tmp / "m.esb"),
            "--root",
            str(tmp / "keys/root.pub"),
            "--device-key",
            str(tmp / "dev/device.key"),
            "--json",
            env=env,
        ).stdout
    )
    assert verified["ok"] and "V14 section digests" in verified["checked"]
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
    np.save(tmp / "x.npy", x)
    out = json.loads(
        run(
            "agent",
            "infer",
            str(tmp / "m.esb"),
            "--home",
            str(tmp / "dev"),
            "--input",
            str(tmp / "x.npy"),
            "--json",
            env=env,
        ).stdout
    )
    np.testing.assert_allclose(
        np.array(out["outputs"]["probs"]), reference_onnx_classifier(x, seed=3), rtol=1e-5
    )
    assert out["status"]["hardware_backed"] is False


def test_a_tampered_bundle_exits_1_and_names_the_failure(workspace):
    tmp, env = workspace
    data = bytearray((tmp / "m.esb").read_bytes())
    data[-20] ^= 0x40
    (tmp / "bad.esb").write_bytes(bytes(data))
    proc = run("agent", "infer", str(tmp / "bad.esb"), "--home", str(tmp / "dev"), env=env, check=1)
    assert "DigestMismatchError" in proc.stderr
    proc = run(
        "verify",
        str(tmp / "bad.esb"),
        "--root",
        str(tmp / "keys/root.pub"),
        "--device-key",
        str(tmp / "dev/device.key"),
        "--json",
        env=env,
        check=1,
    )
    assert json.loads(proc.stdout) == {
        "ok": False,
        "error": "DigestMismatchError",
        "message": proc.stdout and json.loads(proc.stdout)["message"],
        "exit_code": 1,
    }


def test_verify_without_a_key_refuses_a_flipped_payload_byte(workspace):
    """The signed manifest lists every sealed chunk's digest: `verify` checks them
    without any key, so a flipped payload byte is refused (exit 1); only `--quick` skips
    it, and then says the payload was not checked."""
    tmp, env = workspace
    data = bytearray((tmp / "m.esb").read_bytes())
    data[-20] ^= 0x40
    (tmp / "bad.esb").write_bytes(bytes(data))
    root = str(tmp / "keys/root.pub")
    proc = run("verify", str(tmp / "bad.esb"), "--root", root, "--json", env=env, check=1)
    assert json.loads(proc.stdout)["error"] == "DigestMismatchError"
    good = json.loads(run("verify", str(tmp / "m.esb"), "--root", root, "--json", env=env).stdout)
    assert good["payload_checked"] and "V13 chunk digests (sealed payload)" in good["checked"]
    quick = run("verify", str(tmp / "bad.esb"), "--root", root, "--quick", env=env)
    assert "payload not checked" in quick.stdout and "verified" in quick.stdout


def test_inspect_prints_a_bundles_unverified_strings_as_written(workspace):
    """`inspect` shows what an unverified bundle says: as text, never as markup (a model
    name of "[/]" crashed it)."""
    tmp, env = workspace
    data = (tmp / "m.esb").read_bytes()
    assert data.count(b'"cls-a"') == 1
    (tmp / "odd.esb").write_bytes(data.replace(b'"cls-a"', b'"[/]b["'))
    proc = run("inspect", str(tmp / "odd.esb"), env=env)
    assert "model [/]b[ v1" in proc.stdout


def test_a_model_outside_the_signers_scope_is_refused_with_exit_1(workspace):
    tmp, env = workspace
    proc = run(
        "pack",
        str(tmp / "m.onnx"),
        "--name",
        "other",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "cam-01",
        "-o",
        str(tmp / "o.esb"),
        env=env,
        check=1,
    )
    assert "may not sign model 'other'" in proc.stderr
    assert not (tmp / "o.esb").exists()


def test_usage_errors_exit_2(workspace):
    tmp, env = workspace
    run(
        "pack",
        str(tmp / "m.onnx"),
        "--name",
        "cls-a",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "cam-01",
        "-o",
        str(tmp / "x.esb"),
        "--target",
        "pdp11",
        env=env,
        check=2,
    )
    run("inspect", str(tmp / "missing.esb"), env=env, check=2)
    run("verify", str(tmp / "m.esb"), env=env, check=2)  # --root is required


def test_a_group_readable_private_key_is_refused(workspace):
    tmp, env = workspace
    key = tmp / "keys/signers/release.key"
    key.chmod(0o644)
    proc = run(
        "pack",
        str(tmp / "m.onnx"),
        "--name",
        "cls-a",
        "--version",
        "2",
        "--signer",
        "release",
        "--to",
        "cam-01",
        "-o",
        str(tmp / "m2.esb"),
        env=env,
        check=1,
    )
    assert "chmod 600" in proc.stderr


def test_an_encrypted_root_key_needs_its_passphrase(tmp_path):
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    env.pop("EDGESEAL_PASSPHRASE", None)
    env.pop("EDGESEAL_SIGNER_PASSPHRASE", None)
    (tmp_path / "pass").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    run("keys", "init-root", "--passphrase-file", str(tmp_path / "pass"), env=env)
    assert b"ENCRYPTED" in (tmp_path / "keys/root.key").read_bytes()
    unencrypted_signer = ("--no-passphrase",)
    assert (
        "encrypted" in run("keys", "new-signer", "s1", *unencrypted_signer, env=env, check=1).stderr
    )
    assert (
        "wrong passphrase"
        in run(
            "keys",
            "new-signer",
            "s1",
            "--passphrase-file",
            str(tmp_path / "wrong"),
            *unencrypted_signer,
            env=env,
            check=1,
        ).stderr
    )
    run(
        "keys",
        "new-signer",
        "s1",
        "--passphrase-file",
        str(tmp_path / "pass"),
        "--signer-passphrase-file",
        str(tmp_path / "wrong"),
        env=env,
    )
    assert b"ENCRYPTED" in (tmp_path / "keys/signers/s1.key").read_bytes()


def test_keys_are_encrypted_unless_asked_otherwise_and_listed_when_not(tmp_path):
    """An empty passphrase file is an error (it wrote an unencrypted root and exited 0);
    a key without a passphrase needs --no-passphrase; `keys list` names unencrypted keys."""
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    env.pop("EDGESEAL_PASSPHRASE", None)
    env.pop("EDGESEAL_SIGNER_PASSPHRASE", None)
    (tmp_path / "empty.pass").write_text("")
    (tmp_path / "blank.pass").write_text("\n")
    (tmp_path / "pass").write_text("correct horse\n")
    for empty in ("empty.pass", "blank.pass"):
        proc = run(
            "keys", "init-root", "--passphrase-file", str(tmp_path / empty), env=env, check=2
        )
        assert "empty" in proc.stderr
    assert not (tmp_path / "keys/root.key").exists()
    assert "--no-passphrase" in run("keys", "init-root", env=env, check=2).stderr
    assert not (tmp_path / "keys/root.key").exists()
    run("keys", "init-root", "--passphrase-file", str(tmp_path / "pass"), env=env)
    root_pass = ("--passphrase-file", str(tmp_path / "pass"))
    proc = run("keys", "new-signer", "quiet", *root_pass, env=env, check=2)
    assert "--no-passphrase" in proc.stderr
    assert not (tmp_path / "keys/signers/quiet.key").exists()
    run("keys", "new-signer", "plain", *root_pass, "--no-passphrase", env=env)
    run(
        "keys",
        "new-signer",
        "sealed",
        *root_pass,
        "--signer-passphrase-file",
        str(tmp_path / "pass"),
        env=env,
    )
    listing = json.loads(run("keys", "list", "--json", env=env).stdout)
    assert listing["root"]["protection"] == "passphrase"
    assert {s["name"]: s["protection"] for s in listing["signers"]} == {
        "plain": "none",
        "sealed": "passphrase",
    }
    assert listing["unencrypted_keys"] == ["plain"]
    assert "unencrypted" in run("keys", "list", env=env).stdout


def test_revocation_and_listing_are_reported_as_json(workspace):
    tmp, env = workspace
    run("keys", "revoke", "release", "--reason", "laptop stolen", env=env)
    listing = json.loads(run("keys", "list", "--json", env=env).stdout)
    assert listing["revoked"][0]["reason"] == "laptop stolen"
    assert [d["id"] for d in listing["devices"]] == ["cam-01"]
    run(
        "pack",
        str(tmp / "m.onnx"),
        "--name",
        "cls-a",
        "--version",
        "2",
        "--signer",
        "release",
        "--to",
        "cam-01",
        "-o",
        str(tmp / "m2.esb"),
        env=env,
    )
    proc = run("agent", "infer", str(tmp / "m2.esb"), "--home", str(tmp / "dev"), env=env, check=1)
    assert "revoked: laptop stolen" in proc.stderr


def test_help_lists_the_groups_every_part_registers(workspace):
    _, env = workspace
    out = run("--help", env=env).stdout
    for command in ("keys", "pack", "inspect", "verify", "agent"):
        assert command in out
