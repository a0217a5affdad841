"""scripts/audit_deps.py: constraints.txt's pins against PyPI's vulnerability data.

PyPI's project JSON answers only for the latest release, its release JSON for any release;
a fake index on loopback serves both shapes (or refuses the release JSON, as the build
network does). A pin not audited fails unless the held-back file excuses its exact version.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from helpers import FakePypi, serving

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


def test_the_repository_held_back_file_matches_the_pins_exactly():
    pins = ad.parse_constraints((REPO / "constraints.txt").read_text())
    held = ad.parse_held_back((REPO / "scripts" / "audit-held-back.toml").read_text())
    assert ad.stale_held_back(pins, held) == []
    assert sorted(held) == ["atheris", "backports-strenum", "cryptography", "mpmath", "numpy"]
    assert all(h.reason for h in held.values())


_HELD = """
[[held-back]]
name = "Held"
version = "2.0"
reason = "3.0 needs a newer Python"
"""


def test_held_back_entries_are_parsed_with_canonical_names():
    assert ad.parse_held_back(_HELD) == {
        "held": ad.HeldBack("held", "2.0", "3.0 needs a newer Python")
    }
    assert ad.parse_held_back("# nothing held back\n") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[held-back]]\nname = "x"\nversion = "1"\n', "exactly name, version and reason"),
        (_HELD.replace("reason", "why"), "exactly name, version and reason"),
        (_HELD + 'extra = "no"\n', "exactly name, version and reason"),
        (_HELD.replace('"3.0 needs a newer Python"', '" "'), "'reason' must be a non-empty"),
        (_HELD.replace('"2.0"', "2.0"), "'version' must be a non-empty string"),
        (_HELD + _HELD.replace('"Held"', '"held"'), "held is listed twice"),
        ('[held-back]\nname = "x"\n', "array of tables"),
        ('[other]\nname = "x"\n', "unknown keys"),
        ("[[held-back]\n", "not TOML"),
    ],
)
def test_a_malformed_held_back_file_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ad.parse_held_back(text)


def test_a_held_back_entry_that_no_longer_matches_its_pin_is_stale():
    held = ad.parse_held_back(_HELD)
    assert ad.stale_held_back(_pins("held==2.0"), held) == []
    assert ad.stale_held_back(_pins("held==2.1"), held) == [
        "held==2.0: the pin is now held==2.1; review the entry"
    ]
    assert ad.stale_held_back(_pins("fresh==2.0"), held) == ["held==2.0: held is not pinned"]


def test_a_subset_of_the_pins_is_never_stale_against_the_held_back_file():
    """A device's wheelhouse (--subset) resolves the newest wheels for its board on the
    day it is built: the held-back file describes constraints.txt, and a board that
    leaves a package out, or got a newer release of it, does not make an entry stale
    (the entry only excuses the version it names)."""
    held = ad.parse_held_back(_HELD)
    assert ad.stale_held_back(_pins("fresh==2.0"), held, subset=True) == []
    assert ad.stale_held_back(_pins("held==2.1"), held, subset=True) == []


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


class _FakeIndex(FakePypi):
    latest: ClassVar[dict[str, str]] = {"fresh": "2.0", "held": "3.0", "bad": "1.5"}
    vulns: ClassVar[dict[tuple[str, str], list[dict[str, Any]]]] = {
        ("bad", "1.5"): [_vuln("PYSEC-BAD", ["1.6"])],
        ("held", "2.0"): [_vuln("GHSA-OLD", ["2.1"]), _vuln("GHSA-GONE", [], "2026-02-02")],
    }

    def project(self, name: str, version: str) -> dict[str, Any]:
        return _project(version, self.vulns.get((name, version), []))


@pytest.fixture
def index(monkeypatch) -> Iterator[str]:
    monkeypatch.setattr(_FakeIndex, "release_json", True)
    with serving(_FakeIndex) as url:
        yield url


def _pins(*specs: str) -> list[Any]:
    return ad.parse_constraints("".join(f"{s}\n" for s in specs))


def test_a_vulnerable_latest_pin_fails_and_a_clean_one_passes(index):
    audits = ad.audit(_pins("bad==1.5", "fresh==2.0"), index)
    assert [(a.pin.name, a.source, [v.id for v in a.advisories]) for a in audits] == [
        ("bad", ad.PROJECT_SOURCE, ["PYSEC-BAD"]),
        ("fresh", ad.PROJECT_SOURCE, []),
    ]
    out, err, rc = ad.report(audits, {})
    assert rc == 1 and err == []
    assert "VULNERABLE bad==1.5: PYSEC-BAD (CVE-PYSEC-BAD); fixed in 1.6" in out
    assert out[-1].startswith("audit-deps: 2 of 2 pinned packages audited")
    assert ad.report(audits[1:], {})[2] == 0


def test_an_older_pin_is_answered_by_the_release_json_when_pypi_serves_it(index):
    (held,) = ad.audit(_pins("held==2.0"), index)
    assert held.source == ad.RELEASE_SOURCE
    assert [v.id for v in held.advisories] == ["GHSA-OLD"]  # the withdrawn one is dropped
    (fixed,) = ad.audit(_pins("held==2.1"), index)
    assert fixed.audited and fixed.advisories == ()
    # Held back or not, a pin that is audited and vulnerable fails.
    assert ad.report([held], ad.parse_held_back(_HELD))[2] == 1


def test_an_older_pin_without_release_json_is_a_dated_warning_and_fails_only_when_strict(
    index, monkeypatch
):
    """Once upstream ships a release, the pin is no longer the latest, the project JSON
    stops answering for it and (the release JSON being 404 on this network) it cannot be
    audited. The calendar must not turn the build red by itself: the run warns, naming
    the pin, why and the date; a release runs --strict, which fails on it."""
    monkeypatch.setattr(_FakeIndex, "release_json", False)
    audits = ad.audit(_pins("held==2.0", "fresh==2.0"), index)
    assert not audits[0].audited and audits[1].audited
    assert "not the latest release (3.0)" in (audits[0].error or "")
    assert "HTTP 404" in (audits[0].error or "")

    day = date(2027, 3, 4)
    out, err, rc = ad.report(audits, {}, today=day)
    assert rc == 0
    warning = "audit-deps: warning: not audited held==2.0 (on 2027-03-04)"
    assert err[0] == f"{warning}: {audits[0].error}"
    assert "1 pins could not be audited on 2027-03-04" in err[1]
    assert out[-1].endswith("0 vulnerable, 0 held back, 1 not audited")

    out, err, rc = ad.report(audits, ad.parse_held_back(_HELD), today=day)
    assert rc == 0 and err == []
    assert out[0].startswith(
        "audit-deps: held back, not audited: held==2.0: 3.0 needs a newer Python"
    )
    assert "HTTP 404" in out[0]
    assert out[-1].endswith("0 vulnerable, 1 held back, 0 not audited")

    # --strict (EDGESEAL_AUDIT_STRICT=1) excuses nothing.
    for held in ({}, ad.parse_held_back(_HELD)):
        out, err, rc = ad.report(audits, held, strict=True, today=day)
        assert rc == 1 and err[0].startswith("audit-deps: NOT AUDITED held==2.0 (on 2027-03-04)")


def test_a_bumped_pin_is_not_excused_by_its_old_held_back_entry(index, monkeypatch):
    monkeypatch.setattr(_FakeIndex, "release_json", False)
    audits = ad.audit(_pins("held==2.1", "fresh==2.0"), index)
    day = date(2027, 3, 4)
    out, err, rc = ad.report(audits, ad.parse_held_back(_HELD), today=day)
    assert rc == 1
    assert err[:2] == [
        f"audit-deps: warning: not audited held==2.1 (on 2027-03-04): {audits[0].error}",
        "audit-deps: STALE held-back entry held==2.0: the pin is now held==2.1; review the entry",
    ]
    assert out[-1].endswith("1 not audited, 1 stale held-back entries")
    # Stale even when every pin is audited: the entry no longer describes the pin.
    (fresh,) = ad.audit(_pins("fresh==2.0"), index)
    assert ad.report([fresh], ad.parse_held_back(_HELD))[2] == 1


def test_an_unreachable_index_is_a_warning_unless_strict(tmp_path):
    (a,) = ad.audit(_pins("fresh==2.0"), "http://127.0.0.1:9")
    assert not a.audited and "release JSON" in (a.error or "")
    assert ad.report([a], {})[2] == 0
    assert ad.report([a], {}, strict=True)[2] == 1


def test_main_reads_the_constraints_and_sets_the_exit_code(index, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_FakeIndex, "release_json", False)
    c = tmp_path / "constraints.txt"
    h = tmp_path / "held-back.toml"
    h.write_text(_HELD)
    args = ["--constraints", str(c), "--held-back", str(h), "--index-url", index]
    c.write_text("fresh==2.0\nheld==2.0\n")
    assert ad.main(args) == 0
    assert "held back, not audited: held==2.0" in capsys.readouterr().out
    assert ad.main([*args, "--strict"]) == 1
    assert "NOT AUDITED held==2.0" in capsys.readouterr().err
    h.write_text("")
    assert ad.main(args) == 0
    assert "warning: not audited held==2.0" in capsys.readouterr().err
    assert ad.main([*args, "--strict"]) == 1
    h.write_text(_HELD)
    c.write_text("fresh==2.0\nbad==1.5\n")
    assert ad.main(args) == 1
    captured = capsys.readouterr()
    assert "VULNERABLE bad==1.5" in captured.out
    assert "STALE held-back entry held==2.0: held is not pinned" in captured.err
    c.write_text("fresh>=2.0\n")
    assert ad.main(args) == 2
    c.write_text("fresh==2.0\n")
    h.write_text("[[held-back]]\n")
    assert ad.main(args) == 2
    assert ad.main([*args[:2], "--held-back", str(tmp_path / "missing.toml")]) == 2
