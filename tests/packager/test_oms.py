"""OpenSSF model signing interop: the stock model_signing CLI verifies what pack signed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseal.core.extras import decode_extras
from edgeseal.core.reader import BundleFile, unwrap_content_key
from edgeseal.packager.pack import PackOptions
from helpers import run

if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") != "1":
    pytest.importorskip("model_signing")


def _stock_verify(model: Path, signature: Path, public_key: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("model_signing", path=str(Path(sys.executable).parent))
    assert exe, "the model_signing command is not installed"
    return subprocess.run(
        [
            exe,
            "verify",
            "key",
            "--signature",
            str(signature),
            "--public_key",
            str(public_key),
            str(model),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_stock_tool_verifies_the_oms_signature_pack_wrote(tmp_path):
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--no-passphrase", env=env)
    from edgeseal.packager.samples import make_onnx_classifier

    model = tmp_path / "classifier.onnx"
    model.write_bytes(make_onnx_classifier())
    signer_pub = tmp_path / "signer.pub"
    from edgeseal.core.keyring import Keyring
    from edgeseal.core.keys import write_public_key

    write_public_key(signer_pub, Keyring(tmp_path / "keys").load_signer("release")[0].public_key)
    run(
        "agent",
        "provision",
        "--home",
        str(tmp_path / "dev"),
        "--root",
        str(tmp_path / "keys/root.pub"),
        "--device-id",
        "d1",
        env=env,
    )
    run("keys", "add-device", "d1", str(tmp_path / "dev/device.pub.json"), env=env)
    run(
        "pack",
        str(model),
        "--name",
        "c",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "d1",
        "--oms-out",
        str(tmp_path / "classifier.sig"),
        "-o",
        str(tmp_path / "c.esb"),
        env=env,
    )
    ok = _stock_verify(model, tmp_path / "classifier.sig", signer_pub)
    assert ok.returncode == 0, ok.stderr
    tampered = tmp_path / "tampered" / "classifier.onnx"
    tampered.parent.mkdir()
    tampered.write_bytes(model.read_bytes()[:-1] + b"\x00")
    assert _stock_verify(tampered, tmp_path / "classifier.sig", signer_pub).returncode != 0


def test_the_oms_signature_is_sealed_in_extras(fleet, onnx_model):
    bundle, _ = fleet.pack(onnx_model, options=PackOptions(oms="on"))
    with BundleFile.open(bundle) as bf:
        vb = bf.verify(fleet.policy())
        extras = decode_extras(
            bf.read_section(vb, "extras", unwrap_content_key(vb.manifest, fleet.devices["dev-a"]))
        )
    oms = extras["oms"]
    assert oms["bundle"]["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert json.dumps(oms["bundle"])


def test_the_stock_tool_verifies_the_split_form_signature_over_the_sections(
    fleet, onnx_model, tmp_path
):
    """The split-form signature the agent checks from memory is a stock OMS signature:
    on the workstation, the two sections written as files verify with model_signing."""
    from edgeseal.core.keys import write_public_key

    bundle, _ = fleet.pack(onnx_model, options=PackOptions(oms="on"))
    key = fleet.devices["dev-a"]
    folder = tmp_path / "split"
    folder.mkdir()
    with BundleFile.open(bundle) as bf:
        vb = bf.verify(fleet.policy())
        for name in ("graph", "weights", "extras"):
            data = bf.read_section(vb, name, unwrap_content_key(vb.manifest, key))
            if name == "extras":
                extras = decode_extras(data)
            else:
                (folder / name).write_bytes(data)
    sig = tmp_path / "split.sig"
    sig.write_text(json.dumps(extras["oms"]["split"]))
    pub = tmp_path / "signer.pub"
    write_public_key(pub, vb.signer.public_key)
    ok = _stock_verify(folder, sig, pub)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    (folder / "weights").write_bytes((folder / "weights").read_bytes()[:-1] + b"\x01")
    assert _stock_verify(folder, sig, pub).returncode != 0
