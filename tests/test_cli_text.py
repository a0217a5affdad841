"""What the CLI prints is what its source says: rich reads ``[word]`` as markup and drops
it, so help texts, docstrings and error messages that mean the brackets must escape them
(issue 20). Also ``--version`` and shell completion."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.errors import StyleSyntaxError
from rich.style import Style
from typer.core import TyperGroup
from typer.testing import CliRunner

from edgeseal.core import cli
from edgeseal.core.console import report_error
from edgeseal.core.errors import ConfigError
from helpers import run

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


@pytest.fixture(scope="module")
def root() -> TyperGroup:
    """The whole command tree, every installed part registered in ``cli.app``."""
    command = typer.main.get_command(cli.app)
    assert isinstance(command, TyperGroup)
    if "agent" not in command.commands:
        cli._register_parts()
        command = typer.main.get_command(cli.app)
    assert isinstance(command, TyperGroup)
    return command


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, TyperGroup):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


def _command_at(root: TyperGroup, path: tuple[str, ...]) -> Any:
    command: Any = root
    for name in path:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    return command


def _meant(text: str) -> str:
    """``text`` as it should read: tags that are rich styles (``[bold]``, ``[/]``) are
    markup on purpose and go; escaped brackets (``\\[config]``) stay, unescaped."""

    def tag(m: re.Match[str]) -> str:
        body = m.group(1)
        if body.startswith("/"):
            return ""
        try:
            Style.parse(body)
        except StyleSyntaxError:
            return m.group(0)
        return ""

    return re.sub(r"(?<!\\)\[([a-z#/@][^\[\]]*)\]", tag, text).replace("\\[", "[")


def _flat(text: str) -> str:
    """Rendered help as one line: box edges gone, wrapped lines joined."""
    return " ".join(text.replace("│", " ").split())


def _source_texts(command: Any) -> list[str]:
    texts = [command.help or ""]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return [t for t in texts if t]


def test_every_help_keeps_the_bracketed_text_its_source_has(root: TyperGroup) -> None:
    runner = CliRunner()
    checked: set[str] = set()
    lost = []
    for path in _walk(root):
        result = runner.invoke(cli.app, [*path, "--help"], env=WIDE, prog_name="edgeseal")
        assert result.exit_code == 0, (path, result.output)
        shown = _flat(result.output)
        for text in _source_texts(_command_at(root, path)):
            for bracketed in re.findall(r"\[[^\[\]]*\]", _meant(text)):
                checked.add(bracketed)
                if _flat(bracketed) not in shown:
                    lost.append((" ".join(path), bracketed))
    assert not lost, f"bracketed help text rich dropped: {lost}"
    # The walk saw the texts issue 20 was about (else it proves nothing).
    assert {"[device]", "[config]"} <= checked


def test_no_help_ends_in_a_stray_space_where_text_went_missing(root: TyperGroup) -> None:
    runner = CliRunner()
    for path in _walk(root):
        shown = _flat(runner.invoke(cli.app, [*path, "--help"], env=WIDE).output)
        assert not re.search(r"\w \.(\s|$)", shown), (path, shown)


def test_the_options_issue_20_named_have_help(root: TyperGroup) -> None:
    for path, option in [
        (("pack",), "config"),
        (("pack",), "keys_dir"),
        (("pack",), "as_json"),
        (("pack",), "signer_passphrase_file"),
        (("keys", "init-root"), "force"),
        (("agent", "provision"), "config"),
    ]:
        params = {p.name: p for p in _command_at(root, path).params}
        assert getattr(params[option], "help", None), (path, option)


def test_pack_help_names_its_values_not_their_python_types(root: TyperGroup) -> None:
    out = CliRunner().invoke(cli.app, ["pack", "--help"], env={"COLUMNS": "80"}).output
    for python_type in ("{model}", "<list[str]>"):
        assert python_type not in out
    assert "MODEL" in out
    assert "DEVICE" in out


def test_a_config_with_an_unknown_table_names_it(root: TyperGroup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agnet]\nsocket = '/tmp/x.sock'\n")
    anyfile = tmp_path / "f"
    anyfile.write_bytes(b"x")
    runner = CliRunner()
    args = ["verify", "--config", str(bad), "--root", str(anyfile), str(anyfile)]
    result = runner.invoke(cli.app, args, env=WIDE)
    assert result.exit_code == 2
    assert "unknown table [agnet] (known:" in _flat(result.stderr)
    result = runner.invoke(cli.app, [*args, "--json"], env=WIDE)
    assert "[agnet]" in json.loads(result.stdout)["message"]


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("unknown table [agnet] (known: agent)"),
        ValueError("--root [root.pub] is not a key"),
        RuntimeError("[bold]state[/] went wrong [x]"),
    ],
)
def test_errors_print_their_brackets_as_written(
    error: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    report_error(error, as_json=False)
    assert str(error) in _flat(capsys.readouterr().err)


def test_version_lists_each_installed_part(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    out = run("--version", env=env).stdout
    lines = set(out.splitlines())
    for dist in ("edgeseal-core", "edgeseal-agent"):
        assert f"{dist} {version(dist)}" in lines


def test_shell_completion_is_shown_and_answers_without_touching_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "SHELL": "/bin/bash"}
    script = run("--show-completion", "bash", env=env).stdout
    assert "_EDGESEAL_COMPLETE=complete_bash" in script
    assert "complete -o default -F _edgeseal_completion edgeseal" in script
    answer = run(
        env={
            **env,
            "_EDGESEAL_COMPLETE": "complete_bash",
            "COMP_WORDS": "edgeseal keys ini",
            "COMP_CWORD": "2",
        }
    ).stdout
    assert answer.split() == ["init-root"]
    assert list(home.iterdir()) == []


def test_every_help_at_80_columns_shows_whole_option_names_and_plain_value_names(
    root: TyperGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an 80-column terminal no option name is cut ("--max-accuracy…"), and values are
    named as command lines name them (TEXT, PATH, QUANTIZE), never by Python's types."""
    # typer reads TERMINAL_WIDTH once, when it is imported (the other tests here set 200).
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", None)
    runner = CliRunner()
    cut, typed = [], []
    for path in _walk(root):
        result = runner.invoke(cli.app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        lines = result.output.splitlines()
        assert max(map(len, lines)) <= 80, (path, result.output)
        names = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?:…)?", result.output)
        cut += [(" ".join(path), n) for n in names if n.endswith("…")]
        typed += [
            (" ".join(path), t)
            for t in re.findall(
                r"<(?:bool|str|int|float|path|file|dir|list\[[^\]]*\])>|\{[A-Za-z]+\}",
                result.output,
            )
        ]
    assert not cut, f"option names cut at 80 columns: {cut}"
    assert not typed, f"values named by Python types: {typed}"


def test_the_accuracy_report_keeps_bracketed_names_notes_and_gate_reasons() -> None:
    """Output names come from the model and notes from the quantizer: rich must print
    "[probs]" as written, and the gate's reasons with it."""
    from rich.console import Console

    from edgeseal.packager.cli import _report_table
    from edgeseal.packager.evaluate import AccuracyReport, OutputStats

    report = AccuracyReport(
        mode="dynamic-int8",
        size_before=1000,
        size_after=400,
        rows=8,
        outputs=(OutputStats("[probs]", 0.5, 0.1, 0.9),),
        top1_agreement=None,
        accuracy_before=None,
        accuracy_after=None,
        latency_ms_before=1.0,
        latency_ms_after=0.5,
        notes=("per-tensor [weights] kept",),
    )
    console = Console(width=200, record=True)
    console.print(_report_table(report, ("[probs] max abs error 0.5 > 0.05",), None))
    shown = _flat(console.export_text())
    for text in ("[probs]: max/mean abs err", "[probs]: cosine", "per-tensor [weights] kept"):
        assert text in shown, shown
    assert "[probs] max abs error 0.5 > 0.05" in shown, shown
