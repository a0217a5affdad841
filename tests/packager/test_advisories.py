"""Known-vulnerable runtime versions: OSV ranges, PyPI's JSON API, and what pack does."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

import pytest
from packaging.version import Version

from edgeseal.packager.advisories import (
    PROJECT_SOURCE,
    RELEASE_SOURCE,
    AdvisoryError,
    OsvFile,
    PypiService,
    VulnerableRuntimeError,
    check_runtime,
)
from edgeseal.packager.pack import PackOptions
from helpers import FakePypi, cyclonedx_schema_errors, run, serving

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


def test_withdrawn_osv_records_are_skipped(tmp_path):
    _osv(tmp_path, "onnxruntime", [{"introduced": "0"}, {"fixed": "1.12.0"}], id="LIVE")
    gone = json.loads(_osv(tmp_path, "onnxruntime", [{"introduced": "0"}], id="GONE").read_text())
    (tmp_path / "GONE.json").write_text(json.dumps({**gone, "withdrawn": "2024-05-01T00:00:00Z"}))
    src = OsvFile(tmp_path)
    assert [a.id for a in src.affecting("onnxruntime", "1.11.0")] == ["LIVE"]
    assert src.affecting("onnxruntime", "1.13.0") == []


def test_pysec_2021_371s_bound_that_is_not_pep_440_leaves_every_version_affected(tmp_path, caplog):
    # PYSEC-2021-371 as the PyPA advisory database has it: its ECOSYSTEM fix is
    # "0.2.0-n653", which is not a PEP 440 version. Nothing can be compared with it, so
    # the range stays open: every binderhub release is reported, none is cleared.
    pysec = {
        "id": "PYSEC-2021-371",
        "aliases": ["CVE-2021-39159", "GHSA-9jjr-qqfp-ppwx"],
        "details": "BinderHub remote code execution",
        "affected": [
            {
                "package": {"name": "binderhub", "ecosystem": "PyPI"},
                "ranges": [
                    {
                        "type": "GIT",
                        "repo": "https://github.com/jupyterhub/binderhub",
                        "events": [{"introduced": "0"}, {"fixed": "195caac1.patch"}],
                    },
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "0.2.0-n653"}]},
                ],
            }
        ],
    }
    (tmp_path / "all.json").write_text(json.dumps([pysec]))
    with caplog.at_level(logging.WARNING, logger="edgeseal.packager.advisories"):
        src = OsvFile(tmp_path)  # loads: the bad bound is read conservatively, not fatal
    assert [(r.levelno, "PYSEC-2021-371" in r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, True)
    ]
    assert "'0.2.0-n653'" in caplog.records[0].getMessage()
    for v in ("0.1.0", "0.2.0", "1.0.0"):
        assert [a.id for a in src.affecting("binderhub", v)] == ["PYSEC-2021-371"]
    (adv,) = src.affecting("binderhub", "0.1.0")
    assert adv.fixed_in == ()  # no comparable fix: no floor can be raised past it
    audit = check_runtime(src, "binderhub", "0.1.0", None)
    assert audit.checked and audit.safe_floor is None


def test_bounds_that_are_not_pep_440_widen_a_range_never_narrow_it(tmp_path, caplog):
    _osv(tmp_path, "onnxruntime", [{"introduced": "bogus-1"}, {"fixed": "1.0"}], id="INTRO")
    _osv(tmp_path, "onnxruntime", [{"introduced": "1.5"}, {"fixed": "1.6-x"}], id="FIXED")
    _osv(
        tmp_path,
        "onnxruntime",
        [{"introduced": "2.0"}, {"last_affected": "not a version"}],
        id="LAST",
    )
    _osv(
        tmp_path,
        "onnxruntime",
        [{"introduced": "0.1"}, {"fixed": "0.2"}, {"introduced": "0.3"}, {"fixed": "0.4"}],
        id="KEPT",
    )
    with caplog.at_level(logging.WARNING, logger="edgeseal.packager.advisories"):
        src = OsvFile(tmp_path)
    warned = sorted(r.getMessage().split(": ")[1] for r in caplog.records)
    assert warned == ["FIXED", "INTRO", "LAST"]

    def ids(v: str) -> list[str]:
        return sorted(a.id for a in src.affecting("onnxruntime", v))

    assert ids("0.0.1") == ["INTRO"]  # an unreadable introduced counts as "0"
    assert ids("0.3.5") == ["INTRO", "KEPT"]  # the good ranges of a record still count
    assert ids("1.0") == []  # INTRO's fix still closes its range
    assert ids("1.4") == []
    assert ids("1.5") == ids("1.6") == ids("1.9") == ["FIXED"]  # no readable fix: open
    assert ids("2.0") == ids("3.0") == ["FIXED", "LAST"]  # no readable last_affected: open
    assert [a.fixed_in for a in src.affecting("onnxruntime", "0.5")] == [("1.0",)]


def test_a_versions_entry_that_is_not_pep_440_is_kept_as_an_exact_string(tmp_path, caplog):
    _osv(tmp_path, "onnxruntime", versions=["1.9.x", "1.8.0"], id="LIST")
    with caplog.at_level(logging.WARNING, logger="edgeseal.packager.advisories"):
        src = OsvFile(tmp_path)
    assert len(caplog.records) == 1 and "LIST" in caplog.records[0].getMessage()
    record = src._records["onnxruntime"][0]
    assert record.raw_versions == {"1.9.x"}
    assert record.affects(Version("1.9"), "1.9.x")  # the identical string matches
    assert not record.affects(Version("1.9"), "1.9")
    assert [a.id for a in src.affecting("onnxruntime", "1.8.0")] == ["LIST"]
    assert src.affecting("onnxruntime", "1.9.0") == []
    # A version string that is not PEP 440 is never asked about: it cannot be compared
    # with the ranges, so the source refuses it and the check reports "not checked".
    with pytest.raises(AdvisoryError, match="not a version"):
        src.affecting("onnxruntime", "1.9.x")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("affected", {"package": {}}, "'affected' is not a list"),
        ("affected", ["onnxruntime"], "'affected' entry is not an object"),
        ("ranges", ["ECOSYSTEM"], "a range is not an object"),
        ("ranges", [{"type": "ECOSYSTEM", "events": ["0"]}], "an event is not an object"),
        ("ranges", [{"type": "ECOSYSTEM", "events": {"introduced": "0"}}], "'events' is not"),
        ("versions", "1.0", "'versions' is not a list"),
    ],
)
def test_a_malformed_osv_record_is_still_an_error(tmp_path, field, value, message):
    rec = json.loads(_osv(tmp_path, "onnxruntime", [{"introduced": "0"}]).read_text())
    if field == "affected":
        rec["affected"] = value
    else:
        rec["affected"][0][field] = value
    (tmp_path / "TEST-1.json").write_text(json.dumps(rec))
    with pytest.raises(AdvisoryError, match=message):
        OsvFile(tmp_path)


def test_an_advisory_without_a_fix_leaves_no_safe_floor(tmp_path):
    _osv(tmp_path, "onnxruntime", [{"introduced": "1.0.0"}])
    audit = check_runtime(OsvFile(tmp_path), "onnxruntime", "1.13.0", None)
    assert audit.checked and audit.safe_floor is None


class _FakePypi(FakePypi):
    latest: ClassVar[dict[str, str]] = {"onnxruntime": "1.20.0", "tflite-runtime": "2.14.0"}
    known: ClassVar[dict[tuple[str, str], list[dict[str, object]]]] = {
        ("onnxruntime", "1.13.0"): [{"id": "PYSEC-X", "fixed_in": ["1.14.0"]}],
        ("tflite-runtime", "2.14.0"): [
            {"id": "PYSEC-T", "fixed_in": []},
            {"id": "GHSA-GONE", "fixed_in": ["2.15.0"], "withdrawn": "2025-01-01T00:00:00Z"},
        ],
    }
    missing_releases: ClassVar[frozenset[str]] = frozenset({"9.9.9"})

    def project(self, name: str, version: str) -> dict[str, Any]:
        return {
            "info": {"name": name, "version": version},
            "vulnerabilities": [
                {"aliases": [], "summary": "s", "withdrawn": None, **v}
                for v in self.known.get((name, version), [])
            ],
            "releases": {version: [{"yanked": False}]},
        }


@pytest.fixture
def pypi(monkeypatch) -> Iterator[str]:
    monkeypatch.setattr(_FakePypi, "release_json", True)
    monkeypatch.setattr(_FakePypi, "hits", [])
    with serving(_FakePypi) as url:
        yield url


def test_pypi_json_api_answers_are_read_like_pip_audit(pypi):
    audit = check_runtime(PypiService(pypi), "onnxruntime", "1.13.0", "1.14.0")
    assert audit.checked and audit.safe_floor == "1.14.0"
    assert [a.id for a in audit.floor_advisories] == ["PYSEC-X"]
    assert PypiService(pypi).lookup("onnxruntime", "1.13.0").source == RELEASE_SOURCE


def test_the_project_json_answers_for_the_latest_release_without_release_json(pypi, monkeypatch):
    monkeypatch.setattr(_FakePypi, "release_json", False)
    service = PypiService(pypi)
    found = service.lookup("TFLite_Runtime", "2.14")
    assert found.source == PROJECT_SOURCE and found.error is None
    assert [a.id for a in found.advisories] == ["PYSEC-T"]  # the withdrawn one is dropped
    audit = check_runtime(service, "tflite-runtime", "2.14.0", "2.14.0")
    assert audit.checked and audit.safe_floor is None  # PYSEC-T names no fix
    assert [a.id for a in audit.tested_advisories] == ["PYSEC-T"]
    clean = check_runtime(service, "onnxruntime", "1.20.0", "1.20.0")
    assert clean.checked and clean.safe_floor == "1.20.0" and clean.floor_advisories == ()
    # One project JSON per package, however many versions were asked; no release JSON.
    assert sorted(_FakePypi.hits) == ["/pypi/onnxruntime/json", "/pypi/tflite-runtime/json"]


def test_an_older_release_without_release_json_is_not_checked(pypi, monkeypatch):
    monkeypatch.setattr(_FakePypi, "release_json", False)
    audit = check_runtime(PypiService(pypi), "onnxruntime", "1.13.0", "1.20.0")
    assert not audit.checked and audit.tested_advisories == ()
    assert "not the latest release (1.20.0)" in (audit.error or "")
    assert "release JSON" in (audit.error or "") and "HTTP 404" in (audit.error or "")


def test_an_unreachable_or_unknown_source_is_reported_not_fatal(pypi):
    audit = check_runtime(PypiService(pypi), "onnxruntime", "9.9.9", None)
    assert not audit.checked and "HTTP 404" in (audit.error or "")
    unknown = check_runtime(PypiService(pypi), "no-such-runtime", "1.0", None)
    assert not unknown.checked and "HTTP 404" in (unknown.error or "")
    down = check_runtime(PypiService("http://127.0.0.1:9", timeout=2), "onnxruntime", "1.0.0", None)
    assert not down.checked


def test_pack_seals_advisories_in_the_sbom_and_raises_the_floor(fleet, onnx_model, tmp_path):
    osv = _osv(tmp_path, "onnxruntime", [{"introduced": "0"}, {"fixed": "1.16.3"}])
    bundle, result = fleet.pack(onnx_model, options=PackOptions(advisories=OsvFile(osv)))
    sbom = fleet.extras(bundle)["sbom"]
    assert cyclonedx_schema_errors(sbom) is None
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
    proc = _pack_cli(
        onnx_model, out, "--advisories", str(osv), "--fail-on-advisory", env=env, check=1
    )
    assert "TEST-1" in proc.stderr and not out.exists()


def _pack_cli(onnx_model: Path, out: Path, *extra: str, env: dict[str, str], check=0):
    """``edgeseal pack`` of ``onnx_model`` as classifier v1 for dev-a, to ``out``."""
    return run(
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
        *extra,
        env=env,
        check=check,
    )


def test_pack_checks_no_advisories_by_default_and_says_so(fleet, onnx_model, tmp_path):
    """Packing works offline by default: no advisory source is asked (a proxy that
    nobody answers would fail any request), and the output says what was not checked."""
    env = {k: v for k, v in os.environ.items() if k != "EDGESEAL_ADVISORIES"}
    env.update(
        EDGESEAL_KEYS=str(fleet.ring.path),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        COLUMNS="200",
    )
    proc = _pack_cli(onnx_model, tmp_path / "a.esb", env=env)
    assert "runtime advisories: not checked (--advisories off, the default" in proc.stdout
    assert (tmp_path / "a.esb").is_file()
    # The bundle was sealed at the real time, so it is read without the fixed clock.
    doc = json.loads(_pack_cli(onnx_model, tmp_path / "b.esb", "--json", env=env).stdout)
    assert doc["ok"] is True and doc["advisories"] is None


def test_an_unreachable_source_is_said_with_the_floor_named_as_the_floor(
    fleet, onnx_model, tmp_path
):
    """The opset floor is what the SBOM asks of devices, not this workstation's runtime."""
    env = {**os.environ, "EDGESEAL_KEYS": str(fleet.ring.path), "COLUMNS": "300"}
    proc = _pack_cli(onnx_model, tmp_path / "b.esb", "--advisories", "http://127.0.0.1:9", env=env)
    said = " ".join(proc.stdout.split())
    assert "runtime advisories not checked" in said
    assert "the SBOM asks devices for onnxruntime >= " in said
    assert "(the model's opset floor)" in said
