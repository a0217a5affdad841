"""The two SBOMs edgeseal writes (the bundle's, and the agent install's from
scripts/sbom-agent) are valid CycloneDX 1.5, say what they must, and are deterministic."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from edgeseal.core.extras import sbom_digest
from edgeseal.packager.advisories import Advisory, RuntimeAudit
from edgeseal.packager.sbom import make_sbom
from helpers import NOW, cyclonedx_schema_errors

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: schemas must come from the wheel."""

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("the SBOM schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _sbom(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "classifier",
        "version": 3,
        "model_format": "onnx",
        "model_sha256": "ab" * 32,
        "opsets": {"": 17, "com.microsoft": 1},
        "domains": ["", "com.microsoft"],
        "runtime_version": "1.20.0",
        "created": NOW,
    }
    return make_sbom(**{**args, **kw})


def test_bundle_sbom_from_a_real_pack_is_valid_cyclonedx_and_names_the_model_digest(
    fleet, tflite_model, no_network
):
    """A TFLite model is sealed as given, so its SBOM names the digest of the file."""
    bundle, _ = fleet.pack(tflite_model, name="dense", version=2)
    sbom = fleet.extras(bundle)["sbom"]
    assert cyclonedx_schema_errors(sbom) is None
    assert sbom["specVersion"] == "1.5"
    model = sbom["metadata"]["component"]
    assert (model["type"], model["name"], model["version"]) == (
        "machine-learning-model",
        "dense",
        "2",
    )
    digest = hashlib.sha256(tflite_model.read_bytes()).hexdigest()
    assert model["hashes"] == [{"alg": "SHA-256", "content": digest}]
    assert [c["name"] for c in sbom["components"]] == ["ai-edge-litert"]
    assert sbom["dependencies"][0] == {"ref": "model", "dependsOn": ["runtime"]}
    # The SBOM's time is the bundle's creation time, not the wall clock at SBOM time.
    assert sbom["metadata"]["timestamp"] == NOW.isoformat()


def test_bundle_sbom_of_a_packed_onnx_model_is_valid_cyclonedx(fleet, onnx_model, no_network):
    bundle, result = fleet.pack(onnx_model)
    extras = fleet.extras(bundle)
    sbom = extras["sbom"]
    assert cyclonedx_schema_errors(sbom) is None
    assert sbom_digest(sbom) == result.manifest.sbom_digest
    (runtime,) = sbom["components"]
    assert runtime["name"] == "onnxruntime" and runtime["version"].startswith(">=")
    props = {p["name"]: p["value"] for p in runtime["properties"]}
    assert props["edgeseal:tested-with"] == metadata.version("onnxruntime")


def test_bundle_sbom_keeps_runtime_floor_opsets_and_advisories_and_is_valid():
    audit = RuntimeAudit(
        package="onnxruntime",
        source="OSV",
        floor="1.13.0",
        safe_floor="1.16.3",
        floor_advisories=(Advisory("TEST-1", "onnxruntime", "bad", ("CVE-1",), ("1.16.3",)),),
        tested_with="1.20.0",
        tested_advisories=(),
    )
    sbom = _sbom(audit=audit)
    assert cyclonedx_schema_errors(sbom) is None
    (runtime,) = sbom["components"]
    assert (runtime["name"], runtime["version"], runtime["purl"]) == (
        "onnxruntime",
        ">=1.16.3",
        "pkg:pypi/onnxruntime",
    )
    props = {p["name"]: p["value"] for p in runtime["properties"]}
    assert props == {
        "edgeseal:tested-with": "1.20.0",
        "edgeseal:format-floor": "1.13.0",
        "edgeseal:advisories": "checked against OSV",
    }
    model_props = {(p["name"], p["value"]) for p in sbom["metadata"]["component"]["properties"]}
    assert {
        ("edgeseal:format", "onnx"),
        ("edgeseal:onnx:opset:ai.onnx", "17"),
        ("edgeseal:onnx:opset:com.microsoft", "1"),
        ("edgeseal:onnx:domain", "ai.onnx"),
        ("edgeseal:onnx:domain", "com.microsoft"),
    } == model_props
    (vuln,) = sbom["vulnerabilities"]
    assert vuln["id"] == "TEST-1" and vuln["recommendation"] == "use onnxruntime >= 1.16.3"
    assert vuln["affects"] == [
        {"ref": "runtime", "versions": [{"version": "1.13.0", "status": "affected"}]}
    ]
    assert vuln["properties"] == [{"name": "edgeseal:affected:floor", "value": "1.13.0"}]


def test_bundle_sbom_is_the_same_for_the_same_inputs_and_its_serial_follows_them():
    first, again = _sbom(), _sbom()
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    later = _sbom(created=NOW + timedelta(seconds=1))
    other_model = _sbom(model_sha256="cd" * 32)
    serials = {d["serialNumber"] for d in (first, later, other_model)}
    assert len(serials) == 3


def test_bundle_sbom_refuses_a_creation_time_without_timezone():
    with pytest.raises(ValueError, match="timezone"):
        _sbom(created=NOW.replace(tzinfo=None))


def test_the_validator_rejects_a_broken_sbom(no_network):
    """The schema check can fail: each breakage is reported."""
    sbom = _sbom()
    wrong_type = json.loads(json.dumps(sbom))
    wrong_type["metadata"]["component"]["type"] = "neural-network"
    no_format = {k: v for k, v in sbom.items() if k != "bomFormat"}
    bad_hash = json.loads(json.dumps(sbom))
    bad_hash["metadata"]["component"]["hashes"][0]["content"] = "not-hex"
    unknown_field = {**sbom, "x-edgeseal": 1}
    for broken in (wrong_type, no_format, bad_hash, unknown_field):
        assert cyclonedx_schema_errors(broken) is not None


def _sbom_agent(out: Path, created: str) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sbom-agent"),
            "--python",
            sys.executable,
            "--created",
            created,
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def test_agent_sbom_is_valid_and_lists_the_installed_runtime_dependencies(tmp_path, no_network):
    sbom = _sbom_agent(tmp_path / "a.json", NOW.isoformat())
    assert cyclonedx_schema_errors(sbom) is None
    top = sbom["metadata"]["component"]
    assert (top["name"], top["type"], top["bom-ref"]) == ("edgeseal-agent", "application", "root")
    listed = {c["name"]: c for c in sbom["components"]}
    for dist in ("onnxruntime", "cryptography", "numpy", "edgeseal-core"):
        version = metadata.version(dist)
        assert listed[dist]["version"] == version, dist
        assert listed[dist]["purl"] == f"pkg:pypi/{dist}@{version}"
        props = {p["name"] for p in listed[dist]["properties"]}
        assert "edgeseal:record-sha256" in props
    root_deps = next(d for d in sbom["dependencies"] if d["ref"] == "root")["dependsOn"]
    assert {"onnxruntime", "edgeseal-core"} <= set(root_deps)
    assert sbom["metadata"]["timestamp"] == NOW.isoformat()
    props = {p["name"]: p["value"] for p in sbom["metadata"]["properties"]}
    assert props["edgeseal:python"] == sys.version.split()[0]


def test_agent_sbom_is_byte_identical_for_the_same_install_and_time(tmp_path):
    _sbom_agent(tmp_path / "a.json", NOW.isoformat())
    _sbom_agent(tmp_path / "b.json", NOW.isoformat())
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    later = _sbom_agent(tmp_path / "c.json", (NOW + timedelta(days=1)).isoformat())
    assert later["serialNumber"] != json.loads((tmp_path / "a.json").read_text())["serialNumber"]
