"""scripts/audit_deps.py: constraints.txt's pins against PyPI's vulnerability data.

PyPI's project JSON answers only for the latest release, its release JSON for any release;
a fake index on loopback serves both shapes (or refuses the release JSON, as the build
network does).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit_deps", REPO / "scripts" / "audit_deps.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["audit_deps"] = mod
    spec.loader.exec_module(mod)
    return mod


ad = _load()


def _vuln(id: str, fixed: list[str], withdrawn: str | None = None) -> dict[str, Any]:
    return {
        "id": id,
        "aliases": [f"CVE-{id}"],
        "summary": "test",
        "details": "",
        "fixed_in": fixed,
        "withdrawn": withdrawn,
        "link": "",
        "source": "osv",
    }


def _project(latest: str, vulns: list[dict[str, Any]], releases: dict[str, Any] | None = None):
    return {
        "info": {"version": latest},
        "vulnerabilities": vulns,
        "releases": releases or {latest: [{"yanked": False}]},
    }


def test_constraints_pins_are_parsed_with_markers_and_canonical_names():
    pins = ad.parse_constraints(
        "# header\n\nCacheControl==0.14.4\n"
        "atheris==3.0.0 ; platform_machine == 'x86_64' and python_version < '3.14'\n"
        "backports.strenum==1.2.8  # comment\n"
    )
    assert [(p.name, p.version, p.line) for p in pins] == [
        ("cachecontrol", "0.14.4", 3),
        ("atheris", "3.0.0", 4),
        ("backports-strenum", "1.2.8", 5),
    ]


@pytest.mark.parametrize(
    "line", ["numpy>=2", "numpy", "numpy==2.*", "numpy==2.4.6,!=2.4.5", "-e ."]
)
def test_a_line_that_is_not_an_exact_pin_is_refused(line):
    with pytest.raises(ValueError, match="line 1"):
        ad.parse_constraints(line + "\n")


def test_the_repository_constraints_are_all_exact_pins():
    pins = ad.parse_constraints((REPO / "constraints.txt").read_text())
    lines = [
        ln for ln in (REPO / "constraints.txt").read_text().splitlines() if ln and ln[0] != "#"
    ]
    assert len(pins) == len(lines) > 0


def test_the_latest_release_is_answered_by_the_project_json_with_its_fixes():
    pin = ad.Pin("demo", "2.0", 1)
    found = ad.advisories_from_project(pin, _project("2.0.0", [_vuln("PYSEC-1", ["2.0.1"])]))
    assert found is not None
    assert [(a.id, a.aliases, a.fixed_in) for a in found] == [
        ("PYSEC-1", ("CVE-PYSEC-1",), ("2.0.1",))
    ]
    assert ad.advisories_from_project(pin, _project("2.0", [])) == ()


def test_withdrawn_vulnerabilities_are_ignored():
    pin = ad.Pin("demo", "2.0", 1)
    project = _project("2.0", [_vuln("GHSA-W", [], withdrawn="2026-01-01T00:00:00Z")])
    assert ad.advisories_from_project(pin, project) == ()


def test_the_project_json_says_nothing_about_an_older_or_newer_pin():
    project = _project("2.0", [_vuln("PYSEC-1", ["2.1"])])
    assert ad.advisories_from_project(ad.Pin("demo", "1.9", 1), project) is None
    assert ad.advisories_from_project(ad.Pin("demo", "2.1rc1", 1), project) is None


def test_malformed_vulnerability_data_is_an_error_not_a_clean_bill():
    pin = ad.Pin("demo", "2.0", 1)
    with pytest.raises(ad.AdvisoryError, match="vulnerabilities"):
        ad.advisories_from_project(pin, {"info": {"version": "2.0"}})
    with pytest.raises(ad.AdvisoryError, match="without an id"):
        ad.advisories_from_project(pin, _project("2.0", [{"fixed_in": []}]))


def test_a_yanked_pin_is_named_with_its_reason():
    releases = {
        "1.0": [{"yanked": True, "yanked_reason": "broken wheel"}, {"yanked": True}],
        "1.1": [{"yanked": False}],
    }
    project = _project("1.1", [], releases)
    assert ad.yanked_reason(ad.Pin("demo", "1.0.0", 1), project) == "broken wheel"
    assert ad.yanked_reason(ad.Pin("demo", "1.1", 1), project) is None


class _FakeIndex(BaseHTTPRequestHandler):
    """/pypi/<name>/json and, unless ``release_json`` is off, /pypi/<name>/<version>/json."""

    latest: ClassVar[dict[str, str]] = {"fresh": "2.0", "held": "3.0", "bad": "1.5"}
    vulns: ClassVar[dict[tuple[str, str], list[dict[str, Any]]]] = {
        ("bad", "1.5"): [_vuln("PYSEC-BAD", ["1.6"])],
        ("held", "2.0"): [_vuln("GHSA-OLD", ["2.1"]), _vuln("GHSA-GONE", [], "2026-02-02")],
    }
    release_json: ClassVar[bool] = True

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        name = parts[1] if len(parts) > 2 and parts[0] == "pypi" else ""
        if name not in self.latest or parts[-1] != "json" or len(parts) not in (3, 4):
            self.send_error(404)
            return
        if len(parts) == 4 and not self.release_json:
            self.send_error(404)
            return
        version = parts[2] if len(parts) == 4 else self.latest[name]
        body = _project(version, self.vulns.get((name, version), []))
        body["info"]["version"] = self.latest[name] if len(parts) == 3 else version
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def index(monkeypatch) -> Iterator[str]:
    monkeypatch.setattr(_FakeIndex, "release_json", True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeIndex)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _pins(*specs: str) -> list[Any]:
    return ad.parse_constraints("".join(f"{s}\n" for s in specs))


def test_a_vulnerable_latest_pin_fails_and_a_clean_one_passes(index):
    audits = ad.audit(_pins("bad==1.5", "fresh==2.0"), index)
    assert [(a.pin.name, a.source, [v.id for v in a.advisories]) for a in audits] == [
        ("bad", ad.PROJECT_SOURCE, ["PYSEC-BAD"]),
        ("fresh", ad.PROJECT_SOURCE, []),
    ]
    out, err, rc = ad.report(audits, strict=True)
    assert rc == 1 and err == []
    assert "VULNERABLE bad==1.5: PYSEC-BAD (CVE-PYSEC-BAD); fixed in 1.6" in out
    assert out[-1].startswith("audit-deps: 2 of 2 pinned packages audited")
    assert ad.report(audits[1:], strict=True)[2] == 0


def test_an_older_pin_is_answered_by_the_release_json_when_pypi_serves_it(index):
    (held,) = ad.audit(_pins("held==2.0"), index)
    assert held.source == ad.RELEASE_SOURCE
    assert [v.id for v in held.advisories] == ["GHSA-OLD"]  # the withdrawn one is dropped
    (fixed,) = ad.audit(_pins("held==2.1"), index)
    assert fixed.audited and fixed.advisories == ()


def test_an_older_pin_without_release_json_is_named_not_passed(index, monkeypatch):
    monkeypatch.setattr(_FakeIndex, "release_json", False)
    audits = ad.audit(_pins("held==2.0", "fresh==2.0"), index)
    assert not audits[0].audited and audits[1].audited
    assert "not the latest release (3.0)" in (audits[0].error or "")
    assert "HTTP 404" in (audits[0].error or "")
    out, err, rc = ad.report(audits, strict=False)
    assert rc == 0 and len(err) == 1 and err[0].startswith("audit-deps: NOT AUDITED held==2.0")
    assert out[-1].endswith("0 vulnerable, 1 not audited")
    assert ad.report(audits, strict=True)[2] == 1


def test_an_unreachable_index_audits_nothing(tmp_path):
    (a,) = ad.audit(_pins("fresh==2.0"), "http://127.0.0.1:9")
    assert not a.audited and "release JSON" in (a.error or "")


def test_main_reads_the_constraints_and_sets_the_exit_code(index, tmp_path, capsys):
    c = tmp_path / "constraints.txt"
    c.write_text("fresh==2.0\nheld==3.0\n")
    assert ad.main(["--constraints", str(c), "--index-url", index]) == 0
    c.write_text("fresh==2.0\nbad==1.5\n")
    assert ad.main(["--constraints", str(c), "--index-url", index]) == 1
    assert "VULNERABLE bad==1.5" in capsys.readouterr().out
    c.write_text("fresh>=2.0\n")
    assert ad.main(["--constraints", str(c), "--index-url", index]) == 2
