"""Known-vulnerable runtime versions: OSV ranges, PyPI's JSON API, and what pack does."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import pytest

from edgeseal.packager.advisories import (
    OsvFile,
    PypiService,
    VulnerableRuntimeError,
    check_runtime,
)
from edgeseal.packager.pack import PackOptions
from helpers import run

ORT = version("onnxruntime")


def _osv(tmp: Path, package: str, *ranges: list[dict[str, str]], versions=(), id="TEST-1") -> Path:
    rec = {
        "id": id,
        "aliases": [f"CVE-{id}"],
        "summary": f"{package} test advisory",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": package},
                "ranges": [{"type": "ECOSYSTEM", "events": ev} for ev in ranges],
                "versions": list(versions),
            }
        ],
    }
    path = tmp / f"{id}.json"
    path.write_text(json.dumps(rec))
    return path


def test_osv_ranges_are_evaluated_with_introduced_fixed_and_last_affected(tmp_path):
    _osv(tmp_path, "onnxruntime", [{"introduced": "0"}, {"fixed": "1.12.0"}], id="A")
    _osv(tmp_path, "ONNXRuntime", [{"introduced": "1.14.0"}, {"last_affected": "1.15.1"}], id="B")
    _osv(tmp_path, "onnxruntime", versions=["1.17.3"], id="C")
    src = OsvFile(tmp_path)
    assert [a.id for a in src.affecting("onnxruntime", "1.11.1")] == ["A"]
    assert src.affecting("onnxruntime", "1.12.0") == []
    assert [a.id for a in src.affecting("onnxruntime", "1.15.1")] == ["B"]
    assert src.affecting("onnxruntime", "1.16.0") == []
    assert [a.id for a in src.affecting("onnxruntime", "1.17.3")] == ["C"]
    assert src.affecting("ai-edge-litert", "1.0.0") == []


def test_a_vulnerable_floor_is_raised_through_each_fix(tmp_path):
    _osv(tmp_path, "onnxruntime", [{"introduced": "0"}, {"fixed": "1.14.1"}], id="A")
    _osv(tmp_path, "onnxruntime", [{"introduced": "1.14.0"}, {"fixed": "1.15.0"}], id="B")
    audit = check_runtime(OsvFile(tmp_path), "onnxruntime", "1.13.0", "1.16.0")
    assert audit.checked and audit.safe_floor == "1.15.0"
    assert [a.id for a in audit.floor_advisories] == ["A"]
    assert audit.tested_advisories == ()


def test_an_advisory_without_a_fix_leaves_no_safe_floor(tmp_path):
    _osv(tmp_path, "onnxruntime", [{"introduced": "1.0.0"}])
    audit = check_runtime(OsvFile(tmp_path), "onnxruntime", "1.13.0", None)
    assert audit.checked and audit.safe_floor is None


class _FakePypi(BaseHTTPRequestHandler):
    """PyPI's JSON API shape: /pypi/<name>/<version>/json with a vulnerabilities list."""

    known: ClassVar[dict[tuple[str, str], list[dict[str, object]]]] = {
        ("onnxruntime", "1.13.0"): [{"id": "PYSEC-X", "fixed_in": ["1.14.0"]}]
    }

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "pypi" or parts[3] != "json":
            self.send_error(404)
            return
        if parts[2] == "9.9.9":
            self.send_error(404)
            return
        body = {
            "info": {"name": parts[1], "version": parts[2]},
            "vulnerabilities": [
                {"aliases": [], "summary": "s", "withdrawn": None, **v}
                for v in self.known.get((parts[1], parts[2]), [])
            ],
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pypi() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePypi)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pypi_json_api_answers_are_read_like_pip_audit(pypi):
    audit = check_runtime(PypiService(pypi), "onnxruntime", "1.13.0", "1.14.0")
    assert audit.checked and audit.safe_floor == "1.14.0"
    assert [a.id for a in audit.floor_advisories] == ["PYSEC-X"]


def test_an_unreachable_or_unknown_source_is_reported_not_fatal(pypi):
    audit = check_runtime(PypiService(pypi), "onnxruntime", "9.9.9", None)
    assert not audit.checked and "HTTP 404" in (audit.error or "")
    down = check_runtime(PypiService("http://127.0.0.1:9", timeout=2), "onnxruntime", "1.0.0", None)
    assert not down.checked


def test_pack_seals_advisories_in_the_sbom_and_raises_the_floor(fleet, onnx_model, tmp_path):
    osv = _osv(tmp_path, "onnxruntime", [{"introduced": "0"}, {"fixed": "1.16.3"}])
    bundle, result = fleet.pack(onnx_model, options=PackOptions(advisories=OsvFile(osv)))
    sbom = fleet.extras(bundle)["sbom"]
    runtime = sbom["components"][0]
    assert runtime["version"] == ">=1.16.3"
    props = {p["name"]: p["value"] for p in runtime["properties"]}
    assert props["edgeseal:advisories"] == "checked against OSV"
    assert [v["id"] for v in sbom["vulnerabilities"]] == ["TEST-1"]
    assert result.audit is not None and result.audit.tested_advisories == ()


def test_fail_on_advisory_refuses_an_affected_workstation_runtime(fleet, onnx_model, tmp_path):
    osv = _osv(tmp_path, "onnxruntime", versions=[ORT])
    out = tmp_path / "x.esb"
    with pytest.raises(VulnerableRuntimeError, match="TEST-1"):
        fleet.pack(
            onnx_model,
            out=out,
            options=PackOptions(advisories=OsvFile(osv), fail_on_advisory=True),
        )
    assert not out.exists()
    env = {**os.environ, "EDGESEAL_KEYS": str(fleet.ring.path)}
    proc = run(
        "pack",
        str(onnx_model),
        "--name",
        "classifier",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "dev-a",
        "-o",
        str(out),
        "--advisories",
        str(osv),
        "--fail-on-advisory",
        env=env,
        check=1,
    )
    assert "TEST-1" in proc.stderr and not out.exists()
