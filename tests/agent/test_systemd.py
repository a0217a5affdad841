"""The agent as systemd runs it: the unit file the repository ships passes
``systemd-analyze verify`` and says what the daemon needs, and the daemon's log lines
leave the time stamp to journald when its stderr is journald's stream."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseal.agent.daemon import watchdog_interval
from edgeseal.agent.device import DeviceHome
from edgeseal.core.logs import LogFormat, configure_logging
from helpers import run, start_agent

UNIT = Path(__file__).parents[2] / "packaging" / "systemd" / "edgeseal-agent.service"
SHIPPED_EXEC = "/usr/local/bin/edgeseal"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}")


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        what = "systemd-analyze is not installed (scripts/bootstrap installs systemd)"
        if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
            pytest.fail(f"{what}, but CI requires the unit check")
        pytest.skip(what)
    return tool


def _settings(text: str) -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines, every value of a key in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on a copy of the unit whose ExecStart names this venv's
    edgeseal (verify refuses a command that does not exist)."""
    edgeseal = Path(sys.executable).with_name("edgeseal")
    assert edgeseal.is_file(), edgeseal
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(SHIPPED_EXEC, str(edgeseal)))
    return subprocess.run(
        [_systemd_analyze(), "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_shipped_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    proc = _verify(tmp_path, UNIT.read_text())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # an unknown key or a bad value is only a warning


def test_the_verify_check_catches_a_misspelt_setting_and_a_bad_value(tmp_path):
    """The harness itself: systemd ignores both with a warning, which the check fails on."""
    text = UNIT.read_text()
    broken = text.replace("ProtectHome=", "ProtectHomes=").replace(
        "WatchdogSec=60s", "WatchdogSec=soon"
    )
    proc = _verify(tmp_path, broken)
    assert "ProtectHomes" in proc.stderr
    assert "soon" in proc.stderr


def test_the_unit_is_notify_with_a_watchdog_its_directories_and_the_hardening():
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["60s"] and s["Restart"] == ["on-failure"]
    assert s["RuntimeDirectory"] == ["edgeseal"] and s["StateDirectory"] == ["edgeseal"]
    argv = s["ExecStart"][0].split()
    assert argv[:3] == [SHIPPED_EXEC, "agent", "run"]
    options = dict(zip(argv[3::2], argv[4::2], strict=True))
    # The socket in the RuntimeDirectory, the home in the StateDirectory.
    assert Path(options["--socket"]).parent == Path("/run/edgeseal")
    assert options["--home"] == "/var/lib/edgeseal"
    help_text = run("agent", "run", "--help", env=dict(os.environ)).stdout
    assert all(option in help_text for option in options)
    assert s["LimitMEMLOCK"] == ["infinity"]  # the decrypted models are mlock'ed
    for on in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[on] == ["yes"], on
    assert s["ProtectSystem"] == ["strict"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert s["DevicePolicy"] == ["closed"]
    assert "/dev/tpmrm0 rw" in s["DeviceAllow"]


@pytest.fixture
def empty_home(fleet, tmp_path) -> Path:
    """A provisioned device home with no model installed: the daemon starts fast."""
    home = DeviceHome(tmp_path / "device")
    home.init(root_public_keys=[fleet.ring.root_pub_path.read_bytes()])
    return home.path


def _daemon_stderr(home: Path, tmp_path: Path, log_format: str, journal: str) -> list[str]:
    """Run the real daemon until READY=1, stop it with SIGTERM, return its stderr lines.
    ``journal`` is how $JOURNAL_STREAM names a stream: "stderr" (the daemon's own, as
    systemd sets it), "other" (inherited from a parent: another inode) or "" (unset)."""
    err_path = tmp_path / "stderr.log"
    notify_path = tmp_path / "notify.sock"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with (
        err_path.open("w") as err,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify.bind(str(notify_path))
        notify.settimeout(60)
        st = os.fstat(err.fileno())
        if journal == "stderr":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal == "other":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        daemon = start_agent(
            home,
            tmp_path / "agent.sock",
            "--log-format",
            log_format,
            env={**env, "NOTIFY_SOCKET": str(notify_path)},
            stderr=err,
        )
        try:
            assert notify.recv(4096).startswith(b"READY=1")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    lines = err_path.read_text().splitlines()
    assert lines, "the daemon logged nothing"
    return lines


def test_text_logs_leave_the_timestamp_to_journald_when_stderr_is_its_stream(empty_home, tmp_path):
    lines = _daemon_stderr(empty_home, tmp_path, "text", journal="stderr")
    assert not any(TIMESTAMP.match(line) for line in lines), lines
    assert any(line.startswith("INFO edgeseal.agent.daemon: agent stopped") for line in lines)


def test_json_logs_leave_the_timestamp_to_journald_when_stderr_is_its_stream(empty_home, tmp_path):
    entries = [json.loads(line) for line in _daemon_stderr(empty_home, tmp_path, "json", "stderr")]
    assert all("time" not in e for e in entries), entries
    assert {"level": "INFO", "logger": "edgeseal.agent.daemon", "message": "agent stopped"} in (
        entries
    )


def test_a_journal_stream_inherited_for_another_stream_keeps_the_timestamps(empty_home, tmp_path):
    """A child of a service inherits $JOURNAL_STREAM with a stderr of its own (a pipe, a
    file): its lines do not go to journald, so they keep their time."""
    lines = _daemon_stderr(empty_home, tmp_path, "text", journal="other")
    assert all(TIMESTAMP.match(line) for line in lines), lines


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4242"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_pings_at_half_watchdog_usec_and_only_when_meant_for_this_process(
    environ, expected
):
    assert watchdog_interval(environ, pid=4242) == expected


@pytest.fixture
def root_logger():
    """The root logger, given back afterwards with pytest's own handlers and level."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_a_json_log_line_carries_the_exception_text_when_there_is_one(root_logger):
    stream = io.StringIO()
    configure_logging(stream, log_format=LogFormat.JSON, environ={})
    try:
        raise KeyError("slot-b")
    except KeyError:
        logging.getLogger("edgeseal.test").exception("reload failed for %s", "clf")
    assert len(root_logger.handlers) == 1  # replaced, not added to
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "ERROR" and entry["message"] == "reload failed for clf"
    assert entry["exception"].startswith("Traceback") and "KeyError: 'slot-b'" in entry["exception"]
    assert TIMESTAMP.match(entry["time"])  # a StringIO is no journald stream
