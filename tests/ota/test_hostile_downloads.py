"""Hostile and interrupted HTTP downloads (issue 9, "Faults, with nothing lost").

The device serves v1 (installed over MQTT), then is offered v2 with a ``url`` that a
local, misbehaving HTTP server answers. Whatever the server does, the device keeps
serving v1 with its slots and floor unchanged, writes nothing that does not match the
signed offer's digests, and commits v2 once a good download is whole.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import mount_tmpfs
from ota_world import InProcessDevice, copy_home, wait_for

pytestmark = pytest.mark.mqtt

CHUNK = 4096


class _Hostile(http.server.BaseHTTPRequestHandler):
    """Answers Range requests for files under ``root``; ``behave(handler, data, start,
    end)`` decides how (returning False lets the good answer go out)."""

    root: Path
    behave: Callable[[Any, bytes, int, int], bool]
    requests: list[str]

    def do_GET(self) -> None:
        data = (self.root / self.path.lstrip("/")).read_bytes()
        start, end = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
        self.requests.append(self.headers["Range"])
        if not self.behave(self, data, start, end):
            self.answer(data[start : end + 1], start)

    def answer(self, piece: bytes, start: int, total: int | None = None) -> None:
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(piece) - 1}/*")
        self.send_header("Content-Length", str(len(piece) if total is None else total))
        self.end_headers()
        self.wfile.write(piece)

    def log_message(self, *args: object) -> None:
        pass


class Server:
    def __init__(self, root: Path, port: int = 0) -> None:
        self.behave: Callable[[Any, bytes, int, int], bool] = lambda *a: False
        self.requests: list[str] = []
        outer = self
        handler = type(
            "H",
            (_Hostile,),
            {"root": root, "requests": self.requests, "behave": staticmethod(outer._behave)},
        )
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _behave(self, h: Any, data: bytes, start: int, end: int) -> bool:
        return self.behave(h, data, start, end)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile(ws) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(port: int = 0) -> Server:
        s = Server(ws.root, port)
        servers.append(s)
        return s

    yield start
    for s in servers:
        with contextlib.suppress(Exception):
            s.close()


def _serving(dev: InProcessDevice) -> int | None:
    sm = dev.agent.serving.get("clf")
    return sm.identity["version"] if sm else None


def _snapshot(dev: InProcessDevice) -> tuple[object, ...]:
    store = dev.agent.store
    j = store.journal("clf")
    return (j.active, j.fallback, j.slots, store.floors.get("clf"), _serving(dev))


def _state(dev: InProcessDevice) -> dict[str, Any]:
    return dev.channel.status()["models"].get("clf", {})


def _counters(dev: InProcessDevice) -> Any:
    assert dev.channel.updater is not None
    return dev.channel.updater.counters


def _serving_v1(fleet_side, device, **ota: Any) -> tuple[InProcessDevice, tuple[object, ...]]:
    dev = device(**ota)
    fleet_side.offer("v1")
    wait_for(lambda: _serving(dev) == 1 and _state(dev).get("state") == "committed", what="v1")
    return dev, _snapshot(dev)


def _offer_v2(fleet_side, dev: InProcessDevice, url: str) -> None:
    fleet_side.offer("v2", url=url)
    wait_for(lambda: _state(dev).get("offered") == 2, what="the v2 offer taken")


def _committed_v2(dev: InProcessDevice, timeout: float = 30.0) -> None:
    wait_for(
        lambda: _state(dev).get("offered") == 2 and _state(dev).get("state") == "committed",
        timeout=timeout,
        what="v2 committed",
        detail=lambda: _state(dev),
    )
    assert _serving(dev) == 2


def _unchanged(dev: InProcessDevice, before: tuple[object, ...]) -> None:
    assert _snapshot(dev) == before
    assert _state(dev).get("state") == "downloading"


def _chunks(fleet_side) -> int:
    return len(fleet_side.offers["v2"].chunks)


def _whole_file(h: Any, data: bytes, start: int, end: int) -> bool:
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
    return True


def _wrong_range(h: Any, data: bytes, start: int, end: int) -> bool:
    h.answer(data[start + 1 : end + 2], start + 1)
    return True


def _short_body(h: Any, data: bytes, start: int, end: int) -> bool:
    h.answer(data[start : start + 100], start)
    return True


def _lying_length(h: Any, data: bytes, start: int, end: int) -> bool:
    h.answer(data[start : start + 100], start, total=end - start + 1)  # then hangs up
    h.close_connection = True
    return True


@pytest.mark.parametrize(
    "broken", [_whole_file, _wrong_range, _short_body, _lying_length], ids=lambda f: f.__name__
)
def test_broken_ranges_are_retried_never_written_then_commit(fleet_side, device, hostile, broken):
    dev, before = _serving_v1(fleet_side, device)
    received = _counters(dev).chunks_received
    server = hostile()
    server.behave = broken
    _offer_v2(fleet_side, dev, server.url("v2.esb"))
    wait_for(lambda: len(server.requests) >= 3, timeout=15, what="three broken answers")
    assert _counters(dev).chunks_received == received, "a broken answer was written"
    _unchanged(dev, before)
    server.behave = lambda *a: False
    _committed_v2(dev)
    assert _counters(dev).chunks_received == received + _chunks(fleet_side)


def test_garbled_chunks_are_dropped_and_fetched_again(fleet_side, device, hostile):
    dev, _ = _serving_v1(fleet_side, device)
    counters = _counters(dev)
    dropped, received = counters.chunks_dropped, counters.chunks_received
    server = hostile()
    garbled: list[int] = []

    def garble(h: Any, data: bytes, start: int, end: int) -> bool:
        piece = bytearray(data[start : end + 1])
        for index in (1, 3):  # the second and fourth chunk of the run, once each
            at = index * CHUNK + 17
            if at < len(piece) and index not in garbled:
                piece[at] ^= 0x5A
                garbled.append(index)
                break  # the run stops at the first dropped chunk: one garble per answer
        h.answer(bytes(piece), start)
        return True

    server.behave = garble
    _offer_v2(fleet_side, dev, server.url("v2.esb"))
    _committed_v2(dev)  # (no snapshot check here: the good chunks go straight on)
    assert garbled == [1, 3]
    assert counters.chunks_dropped - dropped == 2
    assert counters.chunks_received - received == _chunks(fleet_side)


def test_a_server_down_then_up_resumes_and_commits(fleet_side, device, hostile):
    dev, before = _serving_v1(fleet_side, device)
    received = _counters(dev).chunks_received
    server = hostile()
    port = server.port

    def three_chunks_then_die(h: Any, data: bytes, start: int, end: int) -> bool:
        if not died.is_set():  # later requests, until the socket closes: hang up at once
            died.set()
            h.answer(data[start : start + 3 * CHUNK], start)
            threading.Thread(target=server.httpd.shutdown, daemon=True).start()
        return True

    died = threading.Event()

    server.behave = three_chunks_then_die
    _offer_v2(fleet_side, dev, server.url("v2.esb"))
    wait_for(lambda: _counters(dev).chunks_received == received + 3, timeout=15, what="3 chunks")
    server.httpd.server_close()
    time.sleep(3.0)  # connection refused for a few seconds: retried on every tick
    _unchanged(dev, before)
    assert _counters(dev).chunks_received == received + 3
    again = hostile(port)
    _committed_v2(dev)
    assert again.requests[0] == f"bytes={3 * CHUNK}-{fleet_side.offers['v2'].size - 1}"
    assert _counters(dev).chunks_received == received + _chunks(fleet_side), "refetched"


def test_a_trickle_completes_and_a_stall_is_retried_while_the_device_serves(
    fleet_side, device, hostile, ws
):
    dev, before = _serving_v1(fleet_side, device, chunk_timeout=1.0)
    server = hostile()
    stalled: list[int] = []

    def trickle(h: Any, data: bytes, start: int, end: int) -> bool:
        piece = data[start : end + 1]
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(len(piece)))
        h.end_headers()
        if not stalled:  # the first answer stalls after one chunk: longer than chunk_timeout
            stalled.append(start)
            h.wfile.write(piece[:CHUNK])
            h.wfile.flush()
            time.sleep(2.5)
            return True
        for i in range(0, len(piece), 512):  # then ~5 KB/s
            h.wfile.write(piece[i : i + 512])
            h.wfile.flush()
            time.sleep(0.1)
        return True

    server.behave = trickle
    _offer_v2(fleet_side, dev, server.url("v2.esb"))
    t0 = time.monotonic()
    slowest = 0.0
    while time.monotonic() - t0 < 45 and _state(dev).get("state") == "downloading":
        t = time.monotonic()
        result = dev.agent.infer("clf", {"input": ws.x})
        slowest = max(slowest, time.monotonic() - t)
        assert result.model["version"] == 1
        assert _snapshot(dev) == before
        time.sleep(0.2)
    _committed_v2(dev)
    assert len(server.requests) >= 2, "the stalled request was not retried"
    assert slowest < 2.0, f"inference waited {slowest:.1f} s behind the download"


@pytest.fixture
def tiny_incoming(ws, tmp_path) -> Iterator[Path]:
    """A device home whose ``ota/incoming`` is a 16 KiB tmpfs (smaller than any bundle)."""
    home = copy_home(ws, "dev-a", tmp_path / "home")
    incoming = home / "ota" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
    yield home
    if os.path.ismount(incoming):
        subprocess.run(["umount", "-l", str(incoming)], check=False)


def _mount_tiny(incoming: Path) -> None:
    mount_tmpfs(incoming, "16k")


def test_a_full_disk_fails_the_download_and_keeps_serving(
    fleet_side, device, hostile, tiny_incoming
):
    dev, before = _serving_v1(fleet_side, device, home=tiny_incoming)
    incoming = tiny_incoming / "ota" / "incoming"
    _mount_tiny(incoming)
    assert fleet_side.offers["v1"].size > 16 * 1024
    server = hostile()
    fleet_side.offer("v2", url=server.url("v2.esb"))
    wait_for(
        lambda: _state(dev).get("offered") == 2 and _state(dev).get("state") == "failed",
        timeout=15,
        what="v2 failed",
        detail=lambda: _state(dev),
    )
    assert "no space" in _state(dev).get("reason", "")
    assert _snapshot(dev) == before
    assert server.requests == []
    assert list(incoming.iterdir()) == []


def test_a_drip_feed_does_not_hold_up_a_newer_offer(fleet_side, device, hostile):
    dev, _ = _serving_v1(fleet_side, device, chunk_timeout=1.0)
    server = hostile()
    release = threading.Event()

    def drip(h: Any, data: bytes, start: int, end: int) -> bool:
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.send_header("Content-Length", str(end - start + 1))
        h.end_headers()
        for b in data[start : end + 1]:  # one byte every 0.3 s: never a 1 s silence
            if release.wait(0.3):
                break
            h.wfile.write(bytes([b]))
            h.wfile.flush()
        h.close_connection = True
        return True

    server.behave = drip
    try:
        _offer_v2(fleet_side, dev, server.url("v2.esb"))
        wait_for(lambda: server.requests, timeout=10, what="the drip started")
        fleet_side.offer("v3")  # over MQTT: the device should take it within a few seconds
        wait_for(lambda: _state(dev).get("offered") == 3, timeout=6, what="v3 taken")
    finally:
        release.set()
