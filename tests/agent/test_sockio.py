"""The local API's socket I/O: kernel-enforced timeouts and scatter/gather sends, on
real socket pairs; and the server's reuse of a connection's body buffer."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.acl import Caller
from edgeseal.agent.api import REUSED_BODY_BYTES, _Handler, decode_tensors
from edgeseal.agent.client import Client
from edgeseal.agent.sockio import kernel_timeouts, send_all


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_kernel_timeouts_bound_a_recv_on_a_blocking_socket(pair):
    a, _ = pair
    assert kernel_timeouts(a, recv=0.3, send=5.0)
    assert a.gettimeout() is None  # one system call per recv: no poll first
    start = time.monotonic()
    with pytest.raises(BlockingIOError):
        a.recv(10)
    assert 0.2 < time.monotonic() - start < 3.0


def test_a_recv_timeout_of_zero_is_not_taken_as_wait_for_ever(pair):
    """To the kernel a zero timeval means no timeout at all: a deadline already reached
    must still end the wait."""
    a, _ = pair
    assert kernel_timeouts(a, recv=0.0, send=60.0)
    start = time.monotonic()
    with pytest.raises(BlockingIOError):
        a.recv(10)
    assert time.monotonic() - start < 2.0


def test_send_all_delivers_every_part_in_order_through_partial_sends(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rng = np.random.default_rng(0)
    parts: list[bytes | memoryview] = [
        rng.bytes(100),
        memoryview(rng.standard_normal(300_000).astype(np.float32)).cast("B"),
        b"",
        rng.bytes(5000),
    ]
    want = b"".join(bytes(p) for p in parts)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(want):
            got.extend(b.recv(7000))
            time.sleep(0.0005)

    t = threading.Thread(target=drain)
    t.start()
    send_all(a, parts, time.monotonic() + 30)
    t.join(30)
    assert bytes(got) == want


def test_send_all_to_a_peer_that_never_reads_times_out(pair):
    a, _ = pair
    kernel_timeouts(a, recv=5.0, send=0.3)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        send_all(a, [bytes(8 << 20)], time.monotonic() + 0.5)
    assert time.monotonic() - start < 5.0


def test_send_all_to_a_peer_reading_slowly_ends_at_its_deadline(pair):
    """A peer taking a little before each single send would time out must not stretch
    a send with a deadline past it."""
    a, b = pair
    kernel_timeouts(a, recv=5.0, send=0.5)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            b.recv(50_000)
            time.sleep(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    start = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            send_all(a, [bytes(20 << 20)], time.monotonic() + 1.0)
        assert time.monotonic() - start < 4.0
    finally:
        stop.set()
        a.close()
        t.join(5)


def test_the_client_times_out_on_an_agent_that_never_answers(tmp_path):
    path = Path(f"/tmp/es-sockio-{os.getpid()}-{time.monotonic_ns()}.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        with Client(str(path), timeout=0.5) as c:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                c.health()
            assert time.monotonic() - start < 5.0
    finally:
        listener.close()
        path.unlink()


class _NoApi:
    pass


def test_a_connection_reuses_its_body_buffer_only_when_nothing_still_refers_to_it(pair):
    a, _ = pair
    h = _Handler(a, _NoApi(), Caller(uid=0, gid=0, pid=0))  # type: ignore[arg-type]
    first = h._body_buffer(1000)
    first_id = id(first.obj)
    del first
    again = h._body_buffer(800)
    assert id(again.obj) == first_id  # reused: nothing from the last request holds it
    kept = np.frombuffer(again, np.uint8)  # an array of the last request, still alive
    del again
    fresh = h._body_buffer(800)
    assert id(fresh.obj) != first_id
    kept[:] = 7
    assert not np.any(np.frombuffer(fresh, np.uint8) == 7)


def test_a_body_larger_than_the_reuse_limit_gets_its_own_buffer(pair):
    a, _ = pair
    h = _Handler(a, _NoApi(), Caller(uid=0, gid=0, pid=0))  # type: ignore[arg-type]
    big = h._body_buffer(REUSED_BODY_BYTES + 1)
    assert len(big) == REUSED_BODY_BYTES + 1
    assert h._body_buf is None  # not kept by the connection


def _wire(message) -> bytes:
    return b"".join(bytes(p) for p in message)


@pytest.mark.parametrize(
    "arrays",
    [
        [np.arange(10, dtype=np.float32).reshape(2, 5), np.ones((2, 5), np.float32)],
        [np.zeros((1, 7), np.int8), np.zeros((3, 7), np.int8)],  # another shape
        [np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float64)],  # another dtype
        [np.arange(4, dtype=">f4").reshape(1, 4), np.arange(4, dtype=">f4").reshape(1, 4)],
        [np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]] * 2,  # not contiguous
    ],
)
def test_a_kept_request_head_sends_the_same_bytes_as_a_fresh_encoding(arrays):
    """The client keeps what goes before an array's bytes for a repeated (model, name,
    dtype, shape); every call must still put on the wire exactly the fresh encoding."""
    c = Client("/nonexistent.sock")
    for a in arrays * 2:
        kept = _wire(c._tensor_message("m", {"x": a}))
        fresh = _wire(Client("/nonexistent.sock")._tensor_message("m", {"x": a}))
        assert kept == fresh
        head, _, body = kept.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        np.testing.assert_array_equal(decode_tensors(body)["x"], a)


def test_a_kept_request_head_is_not_used_for_another_model_or_input_name():
    c = Client("/nonexistent.sock")
    a = np.ones((1, 3), np.float32)
    first = _wire(c._tensor_message("m", {"x": a}))
    assert _wire(c._tensor_message("n", {"x": a})) != first
    assert _wire(c._tensor_message("m", {"y": a})) != first
    assert _wire(c._tensor_message("m", {"x": a})) == first


def test_a_client_without_a_timeout_waits_as_long_as_it_takes():
    """``timeout=None`` means no bound at all (as for a Python socket), not an error."""
    path = Path(f"/tmp/es-sockio-{os.getpid()}-{time.monotonic_ns()}.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def answer_late() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            time.sleep(0.5)
            body = b'{"ok": true, "models": 0, "failing": {}}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    t = threading.Thread(target=answer_late, daemon=True)
    t.start()
    try:
        with Client(str(path), timeout=None) as c:
            assert c.health()["ok"] is True
    finally:
        t.join(5)
        listener.close()
        path.unlink()
