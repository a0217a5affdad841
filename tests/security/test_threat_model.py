"""docs/threat-model.md names real tests and real commands.

Every ``tests/...py::test_name`` in a table row must be a test function in that file
(rows marked "pending: OTA" name tests the OTA work adds, and are skipped). Every
backticked ``edgeseal ...`` command in the incident-response section must be a command
the installed ``edgeseal`` has.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "threat-model.md"
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
PENDING = "pending: OTA"


def _rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if line.startswith("|")]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }


def test_every_test_the_threat_table_names_exists():
    named = [(row, m) for row in _rows() for m in TEST_REF.finditer(row)]
    checked, missing = 0, []
    for row, m in named:
        if PENDING in row:
            continue
        path = ROOT / m.group(1)
        if not path.is_file() or m.group(2) not in _test_functions(path):
            missing.append(m.group(0))
        checked += 1
    assert not missing, f"docs/threat-model.md names tests that do not exist: {missing}"
    assert checked >= 50, f"only {checked} tests named: did the table format change?"


def test_every_threat_row_names_a_test_or_is_pending_for_ota():
    threat_rows = [r for r in _rows() if re.match(r"\| [BMADO]\d+ \|", r)]
    assert len(threat_rows) >= 60
    bad = [
        r.split("|")[1].strip()
        for r in threat_rows
        if not TEST_REF.search(r)
        and not (PENDING in r and "tests/security/test_ota_attacks.py" in r)
    ]
    assert not bad, f"threat rows with neither a test nor a pending OTA test: {bad}"


_COMMANDS = """
import json, typer
from edgeseal.core import cli
cli._register_parts()
root = typer.main.get_command(cli.app)
out = {}
def walk(cmd, path):
    subs = getattr(cmd, "commands", None)
    out[" ".join(path)] = sorted(subs) if subs else None
    for name, sub in (subs or {}).items():
        walk(sub, [*path, name])
walk(root, [])
print(json.dumps(out))
"""


def test_every_incident_response_command_exists():
    text = DOC.read_text()
    section = text[text.index("## Incident response") : text.index("## Outcome")]
    commands = re.findall(r"`(edgeseal [^`]+)`", section)
    assert len(commands) >= 10
    proc = subprocess.run(
        [sys.executable, "-c", _COMMANDS], capture_output=True, text=True, check=True, timeout=120
    )
    tree: dict[str, list[str] | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = []
    for command in commands:
        path: list[str] = []
        for word in command.split()[1:]:
            if " ".join([*path, word]) not in tree:
                break
            path.append(word)
        if not path or tree[" ".join(path)] is not None:  # nothing, or a group, not a command
            wrong.append(command)
    assert not wrong, f"incident response names commands edgeseal does not have: {wrong}"
