"""Strings that edgeseal did not write itself (a device's status, an error quoting them)
are printed as text on the operator's console, never as rich markup: ``"[/]"`` crashed
the printer, and other markup could restyle or hide rows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgeseal.core import cli
from edgeseal.core.console import reports_errors
from edgeseal.core.errors import EdgesealError
from edgeseal.ota.rollout_store import open_store

HOSTILE = ("[/]", "[red]x", "[link=file:///etc/passwd]click[/link]", "[bold]bold[/bold]")


def test_ota_devices_prints_what_devices_report_as_written(tmp_path: Path) -> None:
    store = tmp_path / "rollouts.sqlite"
    st = open_store(store)
    st.record_statuses(
        {
            f"dev-{i}": (
                time.time(),
                {
                    "agent_version": text,
                    "key_store": text,
                    "models": {"clf": {"active": 1, "state": text}},
                },
            )
            for i, text in enumerate(HOSTILE)
        }
    )
    if not any(g.name == "ota" for g in cli.app.registered_groups):
        cli._register_parts()
    result = CliRunner().invoke(
        cli.app, ["ota", "devices", "--store", str(store)], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    for text in HOSTILE:
        assert text in result.output


def test_the_error_printer_prints_an_errors_message_as_written(capsys) -> None:
    @reports_errors
    def refuses() -> None:
        raise EdgesealError("device said [/] and [bold]this[/bold]")

    with pytest.raises(typer.Exit) as e:
        refuses()
    assert e.value.exit_code == 1
    assert "device said [/] and [bold]this[/bold]" in capsys.readouterr().err
