"""What `ota status` shows an operator: counts that fit an 80-column terminal, verdicts
in words (not rule codes), and JSON whose times are RFC 3339 like every edgeseal
document's."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgeseal.core import cli
from edgeseal.core.errors import EdgesealError, UsageError
from edgeseal.ota.controller import RolloutError
from edgeseal.ota.rollout import Policy
from edgeseal.ota.rollout_store import RolloutRecord, RolloutStoreError, open_store
from helpers import NOW


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A rollout of clf v2 to 3 devices: wave 1 passed, wave 2 halted on a failure."""
    where = str(tmp_path / "rollouts.sqlite")
    st = open_store(where)
    t0 = NOW.timestamp()
    st.create_rollout(
        RolloutRecord(
            id="r-42", created=t0, model="clf", version=2, bundle_id="ab" * 16,
            bundle_path="/b.esb", target="lab", signer="deployer",
            policy=Policy(waves=(0.34, 1.0)), chunk_bytes=4096,
        ),
        [["cam-01"], ["cam-02", "cam-03"]],
    )  # fmt: skip
    st.open_wave("r-42", 0, t0 + 1)
    st.set_phases("r-42", {"cam-01": ("committed", "", None)}, t0 + 2)
    st.close_wave("r-42", 0, "pass: R3: 1 of 1 committed", t0 + 3)
    st.open_wave("r-42", 1, t0 + 4)
    st.set_phases(
        "r-42",
        {
            "cam-02": ("failed", "health: golden vectors differ", None),
            "cam-03": ("testing", "", None),
        },
        t0 + 5,
    )
    reason = "R1: 1 of 2 devices failed (50%, over 0%)"
    st.close_wave("r-42", 1, f"halt: {reason}", t0 + 6)
    st.update_rollout("r-42", now=t0 + 6, state="halted", reason=reason)
    st.close()
    return where


def _status(store: str, *extra: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", None)
    root = typer.main.get_command(cli.app)
    if "ota" not in getattr(root, "commands", {}):
        cli._register_parts()
    result = CliRunner().invoke(
        cli.app, ["ota", "status", "r-42", "--store", store, *extra], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_status_at_80_columns_shows_whole_headings_and_verdicts_in_words(store, monkeypatch):
    out = _status(store, monkeypatch=monkeypatch)
    assert max(map(len, out.splitlines())) <= 80, out
    headings = "wave devices offered downloading testing committed failed fallen back"
    assert headings in " ".join(out.split()), out
    assert "…" not in out
    assert "wave 1: passed: 1 of 1 committed" in out
    assert "wave 2: halted: 1 of 2 devices failed (50%, over 0%)" in out
    assert "r-42: halted (1 of 2 devices failed" in out
    assert not re.search(r"\bR\d+:", out), out


def test_status_json_gives_times_as_rfc_3339(store, monkeypatch):
    doc = json.loads(_status(store, "--json", monkeypatch=monkeypatch))
    assert doc["ok"] is True and doc["state"] == "halted"
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    times = [doc["created"], doc["updated"]]
    times += [w[k] for w in doc["waves"] for k in ("opened_at", "closed_at")]
    assert all(stamp.match(t) for t in times), times
    opened = datetime.fromisoformat(doc["waves"][0]["opened_at"].replace("Z", "+00:00"))
    assert opened == datetime.fromtimestamp(NOW.timestamp() + 1, timezone.utc)
    # the machine-readable verdict keeps its rule, for tools that match on it
    assert doc["waves"][1]["verdict"].startswith("halt: R1:")


def test_an_unknown_rollout_is_a_usage_error_that_exits_2(store, monkeypatch):
    """RolloutError is in the error tree as a usage mistake (the operator names another
    rollout): ``--json`` names its type and the CLI exits 2, as it did when it was a
    ValueError; a store that cannot be opened stays a rejection (exit 1)."""
    assert issubclass(RolloutError, UsageError) and not issubclass(RolloutError, ValueError)
    assert issubclass(RolloutStoreError, EdgesealError)
    assert not issubclass(RolloutStoreError, UsageError)
    root = typer.main.get_command(cli.app)
    if "ota" not in getattr(root, "commands", {}):
        cli._register_parts()
    result = CliRunner().invoke(
        cli.app, ["ota", "status", "r-nope", "--store", store, "--json"], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 2, result.output
    doc = json.loads(result.stdout)
    assert doc["error"] == "RolloutError" and doc["exit_code"] == 2
    assert "no rollout 'r-nope'" in doc["message"]
