"""The snap's install and configure hooks against a fake snapctl: what they accept, what
they refuse and why, and that a refusal leaves the running config alone."""

from __future__ import annotations

import socket
import subprocess

import pytest

from edgeseal.core.config import load_config

pytestmark = pytest.mark.snap


def test_install_makes_a_private_device_home_and_seeds_the_main_choices(hooks):
    proc = hooks.run("install")
    assert proc.returncode == 0, proc.stderr
    home = hooks.common / "home"
    assert home.is_dir()
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert ["set", "device.key-store=auto", "ota.broker=", "ota.topic-prefix=edgeseal/v1"] in (
        hooks.calls()
    )


def test_configure_with_defaults_writes_a_config_the_agent_loads(hooks):
    assert hooks.run("install").returncode == 0
    proc = hooks.run("configure")
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(hooks.config)
    assert cfg.device.home == str(hooks.common / "home")
    assert cfg.device.key_store == "auto"
    assert cfg.agent.socket == "/run/snap.edgeseal/agent.sock"
    assert cfg.agent.channels == ()
    assert oct(hooks.config.stat().st_mode & 0o777) == "0o600"


def test_configure_accepts_valid_settings_and_maps_them_onto_the_schema(hooks):
    ca = hooks.common / "fleet-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    hooks.settings(
        device__id="cam-01",
        device__key_store="pkcs11",
        device__pkcs11_module="/usr/lib/aarch64-linux-gnu/libckteec.so.0",
        agent__socket_group="root",
        agent__max_rows=64,
        limits__max_sections=16,
        limits__max_manifest_bytes="1048576",
        ota__broker="mqtts://broker.example.com:8883",
        ota__groups="line-1,cams",
        ota__topic_prefix="fleet/v2",
        ota__ca_file=str(ca),
        ota__probation_seconds=600,
        runtime__intra_op_threads=2,
    )
    proc = hooks.run("configure")
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(hooks.config)
    assert cfg.device.id == "cam-01"
    assert cfg.device.key_store == "pkcs11"
    assert cfg.agent.socket_group == "root"
    assert cfg.agent.max_rows == 64
    assert cfg.limits.max_sections == 16
    assert cfg.limits.max_manifest_bytes == 1048576
    assert cfg.ota.broker == "mqtts://broker.example.com:8883"
    assert cfg.ota.groups == ("line-1", "cams")
    assert cfg.ota.topic_prefix == "fleet/v2"
    assert cfg.ota.ca_file == str(ca)
    assert cfg.ota.probation_seconds == 600
    assert cfg.runtime.intra_op_threads == 2
    # a broker turns the MQTT update channel on; no broker turns it off again
    assert cfg.agent.channels == ("mqtt",)
    hooks.settings(ota__broker="")
    assert hooks.run("configure").returncode == 0
    assert load_config(hooks.config).agent.channels == ()


REFUSED = [
    ({"device__id": "Cam_01"}, "device.id"),
    ({"device__id": "-cam"}, "device.id"),
    ({"device__key_store": "hsm"}, "device.key-store must be one of auto, tpm, pkcs11, software"),
    ({"device__pkcs11_module": "libckteec.so"}, "device.pkcs11-module"),
    ({"device__home": "/tmp/elsewhere"}, "device.home is set by the snap"),
    ({"device__idd": "cam-01"}, "unknown setting device.idd"),
    ({"agent__socket_group": "no-such-group-here"}, "no group named 'no-such-group-here'"),
    ({"agent__socket_group": "Bad Group"}, "not a valid group name"),
    ({"agent__socket": "/tmp/agent.sock"}, "agent.socket is set by the snap"),
    ({"limits__max_sections": 0}, "limits.max-sections must be a positive integer"),
    ({"limits__max_chunk_bytes": -4096}, "limits.max-chunk-bytes must be a positive integer"),
    ({"limits__max_recipients": "many"}, "limits.max-recipients must be an integer"),
    ({"limits__max_sections": 1.5}, "limits.max-sections must be an integer"),
    ({"ota__broker": "http://broker.example.com:1883"}, "must start with mqtts://"),
    ({"ota__broker": "mqtts://user:secret@broker:8883"}, "must not carry credentials"),
    ({"ota__broker": "mqtts://broker:99999"}, "valid port"),
    ({"ota__broker": "mqtts://:8883"}, "names no host"),
    ({"ota__broker": "mqtts://broker:8883/path"}, "scheme://host:port only"),
    ({"ota__groups": "line-1,Line 2"}, "ota.groups entry"),
    ({"ota__topic_prefix": "edgeseal/#"}, "must not contain MQTT wildcards"),
    ({"ota__topic_prefix": "/edgeseal"}, "non-empty levels"),
    ({"ota__ca_file": "/etc/ssl/certs/ca.pem"}, "ota.ca-file must be a file under"),
    ({"ota__cert_file": "", "ota__key_file": "KEY"}, "ota.key-file must be a file under"),
    ({"runtime__graph_optimization": "max"}, "runtime.graph_optimization must be"),
]


@pytest.mark.parametrize(("settings", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_configure_refuses_a_bad_value_with_a_message_and_keeps_the_old_config(
    hooks, settings, message
):
    assert hooks.run("configure").returncode == 0
    before = hooks.config.read_text()
    hooks.settings(**settings)
    proc = hooks.run("configure")
    assert proc.returncode == 1
    assert "edgeseal: refused:" in proc.stderr
    assert message in proc.stderr
    assert hooks.config.read_text() == before


def test_configure_refuses_a_client_certificate_without_its_key(hooks):
    cert = hooks.common / "device.crt"
    cert.write_text("cert")
    hooks.settings(ota__broker="mqtts://broker:8883", ota__cert_file=str(cert))
    proc = hooks.run("configure")
    assert proc.returncode == 1
    assert "ota.cert-file and ota.key-file go together" in proc.stderr


def test_configure_reports_every_problem_at_once(hooks):
    hooks.settings(device__id="BAD", limits__max_sections=0, ota__broker="ftp://x")
    proc = hooks.run("configure")
    assert proc.returncode == 1
    assert proc.stderr.count("edgeseal: refused:") == 3


def test_configure_restarts_a_running_agent_only_when_the_config_changed(hooks):
    assert hooks.run("configure", active=True).returncode == 0
    assert ["restart", "edgeseal.agent"] in hooks.calls()
    hooks.log.unlink()
    assert hooks.run("configure", active=True).returncode == 0
    assert ["restart", "edgeseal.agent"] not in hooks.calls()
    hooks.settings(device__id="cam-02")
    assert hooks.run("configure", active=False).returncode == 0
    assert ["restart", "edgeseal.agent"] not in hooks.calls()


def test_the_daemon_before_provisioning_says_what_to_do_tells_systemd_and_exits_cleanly(
    hooks, tmp_path
):
    """The app is a notify daemon: without READY=1 before its exit systemd would count a
    failure and restart it in a loop, so the launcher's own process sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(60)
        proc = subprocess.run(
            [str(hooks.prime / "bin" / "edgeseal-launch"), "agent", "run"],
            env={**hooks.env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert notify.recv(4096) == b"READY=1\nSTATUS=not provisioned"
    assert proc.returncode == 0
    assert "not provisioned" in proc.stderr
    assert "sudo edgeseal agent provision" in proc.stderr
    assert not (hooks.common / "home" / "device.json").exists()
