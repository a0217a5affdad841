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

from edgeseal.agent.api import REUSED_BODY_BYTES, _Handler
from edgeseal.agent.client import Client
from edgeseal.agent.sockio import kernel_timeouts, send_all, set_recv_timeout


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_kernel_timeouts_bound_a_recv_on_a_blocking_socket(pair):
    a, _ = pair
    assert kernel_timeouts(a, recv=0.3, send=5.0) is not None
    assert a.gettimeout() is None  # one system call per recv: no poll first
    start = time.monotonic()
    with pytest.raises(BlockingIOError):
        a.recv(10)
    assert 0.2 < time.monotonic() - start < 3.0


def test_a_recv_timeout_of_zero_is_not_taken_as_wait_for_ever(pair):
    """To the kernel a zero timeval means no timeout at all: a deadline already reached
    must still end the wait."""
    a, _ = pair
    layout = kernel_timeouts(a, recv=60.0, send=60.0)
    assert layout is not None
    set_recv_timeout(a, layout, 0.0)
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
    h = _Handler(a, _NoApi())  # type: ignore[arg-type]
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
    h = _Handler(a, _NoApi())  # type: ignore[arg-type]
    big = h._body_buffer(REUSED_BODY_BYTES + 1)
    assert len(big) == REUSED_BODY_BYTES + 1
    assert h._body_buf is None  # not kept by the connection
