"""Exit 3 means a bug and nothing else (docs/cli.md): every command, run against an
environment that is wrong (a missing file, a directory where a file belongs, no agent, a
stale socket, an output it cannot write, a bad config), exits 1 or 2 and names the path
or the limit; with --json the error is one JSON document on stdout with the same code."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from edgeseal.core.console import reports_errors
from edgeseal.packager.samples import make_onnx_classifier
from helpers import run

#: Stands for the per-test paths in the table below.
T = "{tmp}"
MISSING_SOCK = "{missing_sock}"
STALE_SOCK = "{stale_sock}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, str]]:
    """A keyring with a signer, a provisioned device, a model, a directory, a plain file,
    a socket file nobody listens on, and a few broken configs."""
    tmp = tmp_path_factory.mktemp("env")
    env = {
        **os.environ,
        "EDGESEAL_KEYS": str(tmp / "keys"),
        "EDGESEAL_ADVISORIES": "off",
        "EDGESEAL_CA_PASSPHRASE": "",
        "COLUMNS": "200",
    }
    for name in ("EDGESEAL_PASSPHRASE", "EDGESEAL_SIGNER_PASSPHRASE", "EDGESEAL_CONFIG"):
        env.pop(name, None)
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--models", "cls-*", "--no-passphrase", env=env)
    home = tmp / "dev"
    run(
        "agent",
        "provision",
        "--home",
        str(home),
        "--root",
        str(tmp / "keys/root.pub"),
        "--device-id",
        "cam-01",
        env=env,
    )
    run("keys", "add-device", "cam-01", str(home / "device.pub.json"), env=env)
    run("ota", "ca-init", env=env)
    (tmp / "m.onnx").write_bytes(make_onnx_classifier(seed=3))
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "unknown-table.toml").write_text("[agnet]\nsocket = '/tmp/x.sock'\n")
    (tmp / "unknown-key.toml").write_text("[agent]\nsockett = '/tmp/x.sock'\n")
    (tmp / "bad.toml").write_text("[agent\n")
    stale = Path(f"/tmp/es-stale-{os.getpid()}.sock")
    stale.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nothing listens: connect() is refused
    paths = {
        "tmp": str(tmp),
        "missing_sock": f"/tmp/es-missing-{os.getpid()}.sock",
        "stale_sock": str(stale),
    }
    yield env, paths
    stale.unlink(missing_ok=True)


def _pack(*extra: str) -> tuple[str, ...]:
    return (
        "pack",
        f"{T}/m.onnx",
        "--name",
        "cls-a",
        "--version",
        "1",
        "--signer",
        "release",
        "--to",
        "cam-01",
        *extra,
    )


_OUT = ("-o", f"{T}/m.esb")

#: id -> (command, exit code, text the error must name, takes --json)
CASES: dict[str, tuple[tuple[str, ...], int, str, bool]] = {
    # no agent running: the socket does not exist
    "agent status, no daemon": (
        ("agent", "status", "--socket", MISSING_SOCK),
        1,
        MISSING_SOCK,
        True,
    ),
    "agent infer MODEL, no daemon": (
        ("agent", "infer", "cls-a", "--socket", MISSING_SOCK),
        1,
        MISSING_SOCK,
        True,
    ),
    # a socket file left behind by an agent that stopped
    "agent status, stale socket": (
        ("agent", "status", "--socket", STALE_SOCK),
        1,
        STALE_SOCK,
        True,
    ),
    "agent infer MODEL, stale socket": (
        ("agent", "infer", "cls-a", "--socket", STALE_SOCK),
        1,
        STALE_SOCK,
        True,
    ),
    # bundle paths that are not bundle files
    "agent infer, missing bundle": (
        ("agent", "infer", f"{T}/missing.esb", "--home", f"{T}/dev"),
        2,
        f"{T}/missing.esb",
        True,
    ),
    "agent infer, a directory": (("agent", "infer", f"{T}/adir"), 2, f"{T}/adir", True),
    "agent infer, a path through a file": (
        ("agent", "infer", f"{T}/afile/m.esb"),
        2,
        f"{T}/afile/m.esb",
        True,
    ),
    "agent install, a directory": (
        ("agent", "install", f"{T}/adir", "--home", f"{T}/dev"),
        2,
        f"{T}/adir",
        True,
    ),
    "inspect, missing bundle": (("inspect", f"{T}/missing.esb"), 2, "missing.esb", True),
    # a socket the daemon cannot listen on
    "agent run, socket in /proc": (
        ("agent", "run", "--home", f"{T}/dev", "--socket", "/proc/edgeseal.sock"),
        2,
        "/proc/edgeseal.sock",
        False,
    ),
    # outputs that cannot be written
    "pack -o a directory": (_pack("-o", f"{T}/adir"), 2, f"{T}/adir", True),
    "pack -o in a missing directory": (
        _pack("-o", f"{T}/no/such/m.esb"),
        2,
        f"{T}/no/such",
        True,
    ),
    "pack -o through a file": (_pack("-o", f"{T}/afile/m.esb"), 2, f"{T}/afile", True),
    "pack -o on a file system that holds no files": (
        _pack("-o", "/proc/m.esb"),
        2,
        "/proc/m.esb",
        True,
    ),
    "keys init-root --keys-dir in /proc": (
        ("keys", "init-root", "--no-passphrase", "--keys-dir", "/proc/edgeseal-keys"),
        2,
        "/proc/edgeseal-keys",
        True,
    ),
    "agent provision --home in /proc": (
        ("agent", "provision", "--home", "/proc/edgeseal-home", "--root", f"{T}/keys/root.pub"),
        2,
        "/proc/edgeseal-home",
        True,
    ),
    "ota ca-init --keys-dir in /proc": (
        ("ota", "ca-init", "--keys-dir", "/proc/edgeseal-keys"),
        2,
        "/proc/edgeseal-keys",
        True,
    ),
    "ota csr --out in /proc": (
        ("ota", "csr", "--home", f"{T}/dev", "--force", "--out", "/proc/cam-01.csr"),
        2,
        "/proc/cam-01.csr",
        True,
    ),
    "ota broker-config --out in /proc": (
        ("ota", "broker-config", "--out", "/proc/edgeseal-broker"),
        2,
        "/proc/edgeseal-broker",
        True,
    ),
    # usage errors: names, options and files given on the command line
    "pack --signer nobody": (
        ("pack", f"{T}/m.onnx", "--name", "cls-a", "--version", "1", "--signer", "nobody", *_OUT),
        2,
        "nobody",
        True,
    ),
    "pack --quantize static-int8 without --calibration": (
        _pack("--quantize", "static-int8", *_OUT),
        2,
        "--calibration",
        True,
    ),
    "pack, missing --signer-passphrase-file": (
        _pack("--signer-passphrase-file", f"{T}/no.pass", *_OUT),
        2,
        f"{T}/no.pass",
        True,
    ),
    "pack --to an unregistered device": (_pack("--to", "cam-99", *_OUT), 2, "cam-99", True),
    "pack, missing model file": (
        ("pack", f"{T}/no.onnx", "--name", "a", "--version", "1", "--signer", "release", *_OUT),
        2,
        "no.onnx",
        True,
    ),
    "keys init-root, missing --passphrase-file": (
        ("keys", "init-root", "--keys-dir", f"{T}/k2", "--passphrase-file", f"{T}/no.pass"),
        2,
        f"{T}/no.pass",
        True,
    ),
    "keys add-device, a directory": (
        ("keys", "add-device", "cam-02", f"{T}/adir"),
        2,
        "adir",
        True,
    ),
    # config files
    "pack --config missing": (_pack("--config", f"{T}/no.toml", *_OUT), 2, f"{T}/no.toml", True),
    "pack --config a directory": (_pack("--config", f"{T}/adir", *_OUT), 2, f"{T}/adir", True),
    "agent status, config with an unknown table": (
        ("agent", "status", "--config", f"{T}/unknown-table.toml"),
        2,
        "[agnet]",
        True,
    ),
    "agent status, config with an unknown key": (
        ("agent", "status", "--config", f"{T}/unknown-key.toml"),
        2,
        "sockett",
        True,
    ),
    "agent status, config that is not TOML": (
        ("agent", "status", "--config", f"{T}/bad.toml"),
        2,
        f"{T}/bad.toml",
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_environment_failure_exits_1_or_2_naming_what_is_wrong_never_3(world, case):
    env, paths = world
    command, code, named, takes_json = CASES[case]
    args = [a.format(**paths) for a in command]
    named = named.format(**paths)
    proc = run(*args, env=env, check=None)
    assert proc.returncode == code, f"{case}: exit {proc.returncode}\n{proc.stderr}"
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert named in said, f"{case}: {named!r} not named in:\n{proc.stderr}"
    assert "internal error" not in said and "Traceback" not in said
    if takes_json:
        proc = run(*args, "--json", env=env, check=None)
        assert proc.returncode == code
        doc = json.loads(proc.stdout)
        assert doc["ok"] is False and doc["exit_code"] == code
        assert doc["error"] and named in doc["message"], doc


@pytest.mark.parametrize(
    "command",
    [
        ("agent", "infer", f"{T}/unreadable.esb", "--home", f"{T}/dev"),
        _pack("--config", f"{T}/unreadable.toml", *_OUT),
        _pack("--signer-passphrase-file", f"{T}/unreadable.pass", *_OUT),
    ],
    ids=["agent infer", "pack --config", "pack --signer-passphrase-file"],
)
def test_an_unreadable_file_exits_1_or_2_naming_it(world, command):
    """A path that exists but cannot be read, also by root: a unix socket (open() fails
    with ENXIO), where a mode-0 file would be read by root."""
    env, paths = world
    tmp = Path(paths["tmp"])
    sockets = []
    for name in ("unreadable.esb", "unreadable.toml", "unreadable.pass"):
        (tmp / name).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp / name))
        sockets.append(sock)
    try:
        proc = run(*(a.format(**paths) for a in command), env=env, check=None)
    finally:
        for sock in sockets:
            sock.close()
    assert proc.returncode in (1, 2), proc.stderr
    assert "unreadable." in " ".join(proc.stderr.split())


def test_an_option_click_refuses_is_exit_2_and_json_with_json(world):
    env, _ = world
    proc = run("verify", "x.esb", "--root", "y.pub", "--json", env=env, check=None)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "y.pub" in doc["message"]


def test_a_bug_is_exit_3_and_a_json_error_with_json(capsys):
    """The one case exit 3 is for: an exception nobody meant."""

    @reports_errors
    def command(as_json: bool = False) -> None:
        raise KeyError("oops")

    with pytest.raises(typer.Exit) as e:
        command(as_json=True)
    assert e.value.exit_code == 3
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "ok": False,
        "error": "KeyError",
        "message": "'oops'",
        "exit_code": 3,
    }
    assert "this is a bug in edgeseal" in err


@pytest.mark.parametrize(
    ("architecture", "target", "code"),
    [("x86_64", "rpi4", 2), ("aarch64", "rpi4", 0), ("x86_64", "generic", 0)],
)
def test_add_device_refuses_a_target_the_device_json_says_it_is_not(
    world, tmp_path, architecture, target, code
):
    """The provisioning JSON names the device's CPU: a target for another is a usage error
    naming both and the targets that fit, before anything is registered."""
    env, paths = world
    tmp = Path(paths["tmp"])
    info = json.loads((tmp / "dev" / "device.pub.json").read_text())
    pub = tmp_path / "device.pub.json"
    pub.write_text(json.dumps({**info, "architecture": architecture}))
    keys = tmp_path / "keys"
    shutil.copytree(tmp / "keys", keys)
    proc = run(
        "keys", "add-device", "cam-01", str(pub), "--target", target, "--keys-dir", str(keys),
        env=env, check=None,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    if code:
        text = " ".join(proc.stderr.split())
        assert (
            architecture in text
            and repr(target) in text
            and "targets that fit: generic, x86_64" in text
        )


def test_a_pack_out_of_the_signers_scope_hints_at_the_signer_not_at_the_device(world):
    """The workstation's scope check says what the packer can do (another name, another
    signer); the device-side trust hint ("the root this device pins") does not apply."""
    env, paths = world
    args = [a.format(**paths) for a in _pack(*_OUT)]
    args[args.index("cls-a")] = "other"
    proc = run(*args, "--json", env=env, check=None)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["error"] == "TrustError" and "cls-*" in doc["message"], doc
    assert "new-signer" in doc["hint"] and "--models 'other'" in doc["hint"], doc
    assert "device" not in doc["hint"], doc


def test_a_second_agent_on_the_same_home_is_told_another_agent_runs(world):
    """Another process holds the audit log's writer lock, as a running agent does: the
    error names the lock and the hint says another agent runs, not that the log is broken."""
    env, paths = world
    lock = Path(paths["tmp"]) / "dev" / "audit.log.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run(
            "agent",
            "run",
            "--home",
            f"{paths['tmp']}/dev",
            "--socket",
            f"{paths['tmp']}/second.sock",
            env=env,
            check=None,
        )
    finally:
        os.close(fd)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr
    assert str(lock) in said and "another edgeseal agent runs on this home" in said
    assert "audit verify" not in said and "aside" not in said


def test_a_bundle_that_does_not_fit_on_the_disk_leaves_the_old_one_and_names_the_path(world):
    """The disk fills while the bundle is written (a file-size limit stands in for a full
    disk: the write fails part way, EFBIG where a full disk gives ENOSPC). pack exits 1
    or 2 naming the output, and the bundle that was there is still there, whole."""
    env, paths = world
    out = Path(paths["tmp"]) / "kept.esb"
    args = [a.format(**paths) for a in _pack("-o", str(out))]
    run(*args, env=env)
    good = out.read_bytes()
    assert len(good) > 8192
    args[args.index("1")] = "2"  # --version 2: another bundle, as large
    proc = subprocess.run(
        [sys.executable, "-m", "edgeseal.core", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)),
        check=False,
    )
    assert proc.returncode in (1, 2), proc.stderr
    doc = json.loads(proc.stdout)
    assert str(out) in doc["message"] and "too large" in doc["message"].lower(), doc
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert out.read_bytes() == good
    assert sorted(p.name for p in out.parent.glob("kept.esb*")) == ["kept.esb"]
