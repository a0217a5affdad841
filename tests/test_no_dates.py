"""No test decides its result by a calendar date written into it.

Tests take "now" from one place (``helpers.NOW``, the session's real start time, or the
clock they inject) and build certificates, bundles and offers relative to it, so the
suite passes on any day; CI runs the time-touching tests again under faketime 400 days
ahead (scripts/test). A literal date is allowed only where it is a documented reference
time of a stored artefact, or data whose date no check compares with the clock; each
such file is listed here with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: An ISO date, or a datetime built from a literal year.
DATE = re.compile(rb"(?<!\d)(?:19|20)\d\d-[01]\d-[0-3]\d(?!\d)|datetime\(\s*\d{4}\s*,")

#: Files (relative to tests/) that may hold literal dates, and why.
ALLOWED = {
    "golden/README.md": "documents when the golden bundles were packed (their reference time)",
    "golden/onnx-classifier-v1.esb": "stored golden bundle, verified at PACKED_AT",
    "golden/onnx-classifier-chacha-v1.esb": "stored golden bundle, verified at PACKED_AT",
    "golden/tflite-dense-v1.esb": "stored golden bundle, verified at PACKED_AT",
    "core/test_golden.py": "PACKED_AT: the golden bundles' reference time, passed explicitly",
    "fuzz/targets.py": "the fuzz corpora's reference time, passed explicitly to the parsers",
    "fuzz/corpus/": "stored fuzz inputs, parsed at fuzz/targets.py's reference time",
    "fuzz/regressions/": "stored fuzz findings, parsed at fuzz/targets.py's reference time",
    "security/test_audit_deps.py": "advisory withdrawal dates (data) and the date injected "
    "into the audit report",
    "packager/test_advisories.py": "advisory withdrawal dates in fake PyPI data",
    "security/test_bundle_attacks.py": "1970-01-01: a device clock set back, before any NOW",
    "test_no_dates.py": "this file's own examples",
}


def _allowed(rel: str) -> bool:
    return any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in ALLOWED)


def test_no_test_or_fixture_holds_a_calendar_date_outside_the_allow_list() -> None:
    found = []
    for path in sorted(TESTS.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(TESTS).as_posix()
        if not _allowed(rel) and DATE.search(path.read_bytes()):
            found.append(rel)
    assert found == [], f"literal calendar dates in {found}: build them from helpers.NOW"


def test_every_allow_list_entry_still_exists() -> None:
    """A stale entry would excuse a file added later under the same name unseen."""
    missing = [a for a in ALLOWED if not (TESTS / a).exists()]
    assert missing == []


def test_the_pattern_finds_what_it_must() -> None:
    assert DATE.search(b'now = "2026-11-01T12:00:00Z"')
    assert DATE.search(b"NOW = datetime(2026, 11, 1)")
    assert not DATE.search(b"rng = random.Random(20261129)")
