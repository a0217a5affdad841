"""Metrics Prometheus can scrape: the opt-in TCP listener of ``agent run`` (GET /metrics
only) and what it exports, against a real daemon serving a real bundle."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from edgeseal.agent.client import Client
from edgeseal.agent.daemon import Daemon
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.metrics_http import MetricsListener
from edgeseal.agent.promtext import Exposition, Histogram
from edgeseal.agent.service import Agent
from edgeseal.core.config import load_config
from edgeseal.core.errors import ConfigError
from edgeseal.core.listen import ListenAddress
from edgeseal.packager.pack import PackOptions
from edgeseal.packager.samples import make_trained_classifier
from helpers import run, start_agent
from ota_world import wait_for

if TYPE_CHECKING:
    from conftest import Fleet  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("metrics-models")
    model, ds = make_trained_classifier(seed=1, hidden=64)
    (d / "m1.onnx").write_bytes(model)
    np.savez(d / "calib.npz", input=ds.x_train[:200], labels=ds.y_train[:200])
    np.save(d / "x.npy", ds.x_test[:4].astype(np.float32))
    return d


@pytest.fixture
def device(fleet: Fleet, trained: Path, tmp_path: Path) -> DeviceHome:
    """A provisioned device home with model clf v1 installed."""
    from edgeseal.core.keys import load_public_key

    home = DeviceHome(tmp_path / "device")
    info = home.init(root_public_keys=[fleet.ring.root_pub_path.read_bytes()])
    pub = load_public_key(info["public_key"].encode(), "device")
    fleet.ring.add_device("dev-home", pub, target=None, key_store="software")
    bundle, _ = fleet.pack(
        trained / "m1.onnx",
        name="clf",
        version=1,
        to=("dev-home",),
        options=PackOptions(calibration=trained / "calib.npz"),
    )
    agent = Agent(home, load_config())
    try:
        agent.install(bundle)
    finally:
        agent.close()
    return home


def _scrape(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request over TCP to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _daemon(device: DeviceHome, config_text: str) -> Iterator[tuple[Daemon, Path]]:
    """A real Daemon running on a thread until the block ends; (daemon, its socket)."""
    sock = Path(f"/tmp/es-m-{os.getpid()}-{time.monotonic_ns()}.sock")
    daemon = Daemon(device, load_config(text=config_text), socket_path=sock)
    failed: list[BaseException] = []

    def go() -> None:
        try:
            daemon.run(install_signals=False, tick=0.05)
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    try:
        wait_for(lambda: sock.exists() or failed, 60, "the daemon's socket")
        assert not failed, failed
        yield daemon, sock
    finally:
        daemon.request_stop()
        t.join(30)
        assert not t.is_alive()


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of each sample of ``name`` (exactly that name) in ``text``."""
    found = re.findall(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    return [(labels, float(value)) for labels, value in found]


def test_prometheus_scrapes_latency_histograms_and_build_info_over_loopback_tcp_until_stop(
    device: DeviceHome, trained: Path
) -> None:
    """Timeline: the daemon starts with metrics_listen on 127.0.0.1 port 0; three calls
    over the unix socket; a scrape over TCP counts exactly three in clf's histogram, with
    rising buckets, the old counters, build info, OTA and audit gauges; other paths are
    404 over TCP; once the daemon stops, the port refuses connections."""
    config = '[agent]\nmetrics_listen = "127.0.0.1:0"\n'
    with _daemon(device, config) as (daemon, sock):
        assert daemon.metrics is not None
        port = daemon.metrics.bound.port
        x = np.load(trained / "x.npy")
        with Client(str(sock)) as c:
            for _ in range(3):
                assert c.infer("clf", {"input": x}).model["version"] == 1
        status, ctype, text = _scrape(port)
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        assert "# TYPE edgeseal_inference_seconds histogram" in text
        assert "# HELP edgeseal_inference_seconds " in text
        assert _samples(text, "edgeseal_inference_seconds_count") == [('{model="clf"}', 3.0)]
        (_, total), *_ = _samples(text, "edgeseal_inference_seconds_sum")
        assert total > 0
        buckets = _samples(text, "edgeseal_inference_seconds_bucket")
        bounds = [re.search(r'le="([^"]+)"', labels).group(1) for labels, _ in buckets]  # type: ignore[union-attr]
        counts = [v for _, v in buckets]
        assert bounds[-1] == "+Inf" and counts[-1] == 3
        assert [float(b) for b in bounds[:-1]] == sorted(float(b) for b in bounds[:-1])
        assert counts == sorted(counts)  # cumulative: never falls
        assert 'edgeseal_requests_total{model="clf"} 3' in text  # the old names still work
        assert 'edgeseal_model_version{model="clf"} 1' in text
        (labels, value), *_ = _samples(text, "edgeseal_build_info")
        assert value == 1 and 'version="0.1.0"' in labels
        assert 'edgeseal_ota_staged_version{model="clf"} 0' in text
        assert 'edgeseal_ota_state{model="clf",state="idle"} 1' in text
        assert 'edgeseal_ota_version_floor{model="clf"} 1' in text
        assert _samples(text, "edgeseal_audit_records_written_total")[0][1] >= 3
        assert _samples(text, "edgeseal_audit_last_record_timestamp_seconds")[0][1] > 0
        assert "edgeseal_audit_failing 0" in text
        for path in ("/v1/models", "/v1/status", "/v1/models/clf", "/metricsx", "/"):
            assert _scrape(port, path)[0] == 404, path
        assert _scrape(port, "/v1/models/clf/infer", "POST")[0] == 404
        assert _scrape(port, "/metrics", "POST")[0] == 404
    assert _refuses(port)


def test_agent_run_metrics_listen_serves_tcp_and_sigterm_leaves_nothing_listening(
    device: DeviceHome,
) -> None:
    """``agent run --metrics-listen`` overrides the config (off there); the daemon
    answers a scrape, exits 0 on SIGTERM, and the port is closed after."""
    port = _free_port()
    sock = Path(f"/tmp/es-m-{os.getpid()}-{time.monotonic_ns()}.sock")
    daemon = start_agent(
        device.path, sock, "--metrics-listen", f"127.0.0.1:{port}", stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: sock.exists() or daemon.poll() is not None, 60, "the daemon")
        status, _, text = _scrape(port)
        assert status == 200 and 'edgeseal_model_version{model="clf"} 1' in text
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert _refuses(port)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


def test_a_metrics_port_in_use_exits_1_naming_the_address_without_a_traceback(
    device: DeviceHome,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = run(
            "agent",
            "run",
            "--home",
            str(device.path),
            "--socket",
            f"/tmp/es-m-{os.getpid()}-{time.monotonic_ns()}.sock",
            "--metrics-listen",
            address,
            env=dict(os.environ),
            check=1,
        )
    assert address in proc.stderr and "already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "value", ["localhost:http", "127.0.0.1:65536", "metrics.example:9464", "::1:9464", "1.2.3:9"]
)
def test_an_invalid_metrics_listen_is_refused_naming_its_value(value: str, tmp_path: Path) -> None:
    """In the config: a ConfigError naming the key and the value. On the command line:
    exit 2 (usage) naming the value, before anything starts."""
    with pytest.raises(ConfigError) as e:
        load_config(text=f'[agent]\nmetrics_listen = "{value}"\n')
    assert "agent.metrics_listen" in str(e.value) and repr(value) in str(e.value)
    proc = run(
        "agent",
        "run",
        "--home",
        str(tmp_path / "nowhere"),
        "--metrics-listen",
        value,
        env=dict(os.environ),
        check=2,
    )
    assert "--metrics-listen" in proc.stderr and value in proc.stderr


def test_a_bare_port_means_loopback_and_a_network_host_must_be_written_out_and_is_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ListenAddress.parse("9464") == ListenAddress("127.0.0.1", 9464)
    assert ListenAddress.parse(":9464").loopback
    assert ListenAddress.parse("localhost:9464").loopback
    assert ListenAddress.parse("[::1]:9464").loopback
    assert str(ListenAddress.parse("[::1]:9464")) == "[::1]:9464"
    wide = ListenAddress.parse("0.0.0.0:0")
    assert not wide.loopback
    listener = MetricsListener(wide, lambda: "")
    with caplog.at_level(logging.WARNING, logger="edgeseal.agent.metrics_http"):
        listener.start()
    try:
        assert "served to the network on 0.0.0.0:0" in caplog.text
    finally:
        listener.stop()


def test_the_text_format_escapes_label_values_and_writes_help_and_type_once() -> None:
    out = Exposition()
    out.family("edgeseal_x", "gauge", "A gauge\nwith a back\\slash.")
    out.sample("edgeseal_x", {"model": 'a"b\\c\nd'}, 1)
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    out.family("edgeseal_h", "histogram", "H.")
    out.histogram("edgeseal_h", {"model": "m"}, h.snapshot())
    assert out.text().splitlines() == [
        "# HELP edgeseal_x A gauge\\nwith a back\\\\slash.",
        "# TYPE edgeseal_x gauge",
        'edgeseal_x{model="a\\"b\\\\c\\nd"} 1',
        "# HELP edgeseal_h H.",
        "# TYPE edgeseal_h histogram",
        'edgeseal_h_bucket{model="m",le="0.1"} 2',  # le is inclusive
        'edgeseal_h_bucket{model="m",le="1.0"} 3',
        'edgeseal_h_bucket{model="m",le="+Inf"} 4',
        'edgeseal_h_sum{model="m"} 3.65',
        'edgeseal_h_count{model="m"} 4',
    ]


def test_the_tcp_listener_closes_a_request_head_over_its_bound_unanswered() -> None:
    """A head over 8 KiB gets no answer and no more reading (bounded input); a scrape
    after it is answered as usual."""
    listener = MetricsListener(ListenAddress.parse("127.0.0.1:0"), lambda: "edgeseal_up 1\n")
    listener.start()
    try:
        port = listener.bound.port
        answer = b""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as s,
            contextlib.suppress(BrokenPipeError, ConnectionResetError),
        ):
            s.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (64 * 1024) + b"\r\n\r\n")
            answer = s.recv(4096)
        assert answer == b""
        assert _scrape(port) == (200, "text/plain; version=0.0.4; charset=utf-8", "edgeseal_up 1\n")
    finally:
        listener.stop()
    assert _refuses(port)
