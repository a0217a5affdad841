"""Attacks on the local API from processes on the device: callers outside the ACL, floods
against rate limits and budgets, and malformed or stalled requests. After each, a good
request still gets the right answer: the daemon never goes down for a caller's bytes.

Callers are identified by SO_PEERCRED on a real unix socket. The suite runs as one uid
(it cannot switch: the venv is not executable by others), so "a uid not in the ACL" is
this uid with root and the agent's uid untrusted and a rule naming only another uid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.api import ApiServer
from edgeseal.agent.client import AgentError, Client
from edgeseal.core.config import AccessRule
from security.conftest import MODEL, probe_input

ME = os.getuid()


@pytest.fixture
def api(serving):
    sock = Path(f"/tmp/es-sec-{os.getpid()}-{time.monotonic_ns()}.sock")
    server = ApiServer(serving.agent, sock)
    server.start()
    server.acl.trusted_uids = ()  # the test's uid is an ordinary caller
    yield serving, server, sock
    server.stop()


def _allow(server, **rule):
    server.acl.rules = ((MODEL, AccessRule(uids=(ME,), **rule)),)


def _good_request_works(sock, expected):
    with Client(str(sock), timeout=30) as c:
        r = c.infer(MODEL, {"input": probe_input()})
    assert r.model == expected[0]
    for k, v in expected[1].items():
        np.testing.assert_allclose(r.outputs[k], v, rtol=1e-6)


def _raw(sock, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, half-close, read the answer until the server closes or goes quiet."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    out = b""
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: read the answer
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        s.close()
    return out


def _status(answer: bytes) -> int:
    """The answer's status code; 0 when the server closed without answering."""
    if not answer:
        return 0
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1])


def test_a_uid_not_in_the_acl_gets_403_and_sees_no_model(api):
    serving, server, sock = api
    before = serving.snapshot()
    server.acl.rules = ((MODEL, AccessRule(uids=(ME + 1,), groups=())),)
    with Client(str(sock)) as c:
        with pytest.raises(AgentError) as e:
            c.infer(MODEL, {"input": probe_input()})
        assert e.value.status == 403 and f"uid {ME}" in str(e.value)
        with pytest.raises(AgentError) as e:
            c.info(MODEL)
        assert e.value.status == 403
        assert c.models() == []
    server.acl.rules = ()  # no rule at all: nobody but the trusted uids
    with Client(str(sock)) as c, pytest.raises(AgentError) as e:
        c.infer(MODEL, {"input": probe_input()})
    assert e.value.status == 403
    serving.assert_unchanged(before)


def _flood(sock, threads: int, each: int, rows: int = 4) -> list[int]:
    codes: list[int] = []
    lock = threading.Lock()
    x = np.repeat(probe_input(), rows // 4 or 1, axis=0)[:rows]

    def worker():
        with Client(str(sock), timeout=60) as c:
            for _ in range(each):
                try:
                    c.infer(MODEL, {"input": x})
                    code = 200
                except AgentError as err:
                    code = err.status
                with lock:
                    codes.append(code)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert len(codes) == threads * each, "a flooding caller got no answer"
    return codes


def test_the_rate_limit_holds_under_a_flood_of_threads(api):
    """8 threads x 6 requests at once against 10 a minute: at most 10 (plus what refills
    while the flood lasts) get through, the rest get 429, none gets a 5xx."""
    serving, server, sock = api
    expected = serving.snapshot().served[MODEL]
    _allow(server, rate_per_minute=10)
    start = time.monotonic()
    codes = _flood(sock, threads=8, each=6)
    refilled = int((time.monotonic() - start) * 10 / 60) + 1
    assert set(codes) <= {200, 429}
    assert 10 <= codes.count(200) <= 10 + refilled
    server.acl.rules = ()
    server.acl.trusted_uids = None
    _good_request_works(sock, expected)


def test_the_daily_budget_holds_exactly_under_a_flood_of_threads(api):
    """A budget of 20 rows a day, 8 threads sending 4-row requests: exactly 5 succeed."""
    _, server, sock = api
    _allow(server, daily_budget=20)
    codes = _flood(sock, threads=8, each=4, rows=4)
    assert codes.count(200) == 5 and codes.count(429) == len(codes) - 5


def _post(body: bytes, *, ctype: str = "application/x-npz", length: str | None = None) -> bytes:
    n = str(len(body)) if length is None else length
    return (
        f"POST /v1/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {n}\r\n\r\n"
    ).encode("latin-1") + body


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


MALFORMED = {
    "garbage": (b"\x00\xff\xfe garbage \x13\x37\r\n\r\n", {400}),
    "no request line": (b"\r\n\r\n", {400}),
    "binary request line": (bytes(range(256)) + b"\r\n\r\n", {400}),
    "huge content-length": (_post(b"", length="999999999999999999999"), {413}),
    "content-length of 5,000 digits": (_post(b"x", length="9" * 5000), {413}),
    "content-length of 5,000 digits on a get": (  # answered, then the body is not read
        b"GET /v1/health HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        {200},
    ),
    "negative content-length": (_post(b"x", length="-1"), {400, 411}),
    "content-length not ascii digits": (_post(b"x", length="\xb2"), {400, 411}),
    "no content-length": (
        f"POST /v1/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        {411},
    ),
    "chunked upload": (
        f"POST /v1/models/{MODEL}/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n".encode(),
        {400, 411},
    ),
    "header flood": (  # the server may close mid-send, before its answer is read: 0
        b"GET /v1/health HTTP/1.1\r\n" + b"X-A: " + b"a" * 200_000 + b"\r\n\r\n",
        {0, 400, 431},
    ),
    "bad json": (_post(b'{"inputs": ', ctype="application/json"), {400}),
    "json of the wrong shape": (
        _post(
            b'{"inputs": {"input": {"dtype": "float32", "shape": [2, 2], "data": [1]}}}',
            ctype="application/json",
        ),
        {400},
    ),
    "json object dtype": (
        _post(
            b'{"inputs": {"input": {"dtype": "object", "shape": [1], "data": [1]}}}',
            ctype="application/json",
        ),
        {400},
    ),
    "json nested 50,000 deep": (  # RecursionError, once answered 500
        _post(b'{"inputs": ' + b"[" * 50_000, ctype="application/json"),
        {400},
    ),
    "tensor index nested 50,000 deep": (
        _post(
            b"EST1" + struct.pack("<I", 50_000) + b"[" * 50_000,
            ctype="application/x-edgeseal-tensors",
        ),
        {400},
    ),
    "bad npz": (_post(b"PK\x03\x04" + b"\x00" * 64), {400}),
    "npz with a pickled object array": (
        _post(_npz(input=np.array([{"a": 1}], dtype=object))),
        {400},
    ),
    "wrong dtype": (_post(_npz(input=probe_input().astype(np.float64))), {400}),
    "wrong shape": (_post(_npz(input=np.zeros((4, 9), np.float32))), {400}),
    "wrong rank": (_post(_npz(input=np.zeros((2, 2, 8), np.float32))), {400}),
    "wrong input name": (_post(_npz(other=probe_input())), {400}),
    "nan inputs": (_post(_npz(input=np.full((1, 8), np.nan, np.float32))), {400}),
    "zero rows": (_post(_npz(input=np.zeros((0, 8), np.float32))), {400, 200}),
    "too many rows": (_post(_npz(input=np.zeros((5000, 8), np.float32))), {400, 413}),
    "unknown method": (b"BREW /v1/health HTTP/1.1\r\n\r\n", {400, 405, 501}),
    "path traversal": (b"GET /v1/models/../../etc/passwd HTTP/1.1\r\n\r\n", {400, 403, 404}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_gets_a_4xx_and_the_daemon_keeps_serving(api, name):
    serving, server, sock = api
    server.acl.trusted_uids = None  # root may call: only the bytes are wrong
    data, codes = MALFORMED[name]
    expected = serving.snapshot().served[MODEL]
    answer = _raw(sock, data)
    assert _status(answer) in codes, answer[:300]
    assert 500 not in server.errors, server.errors
    _good_request_works(sock, expected)


def test_a_body_shorter_than_its_content_length_costs_only_its_own_connection(api):
    """A caller declares 1 MB, sends 10 bytes and stalls; meanwhile others are served."""
    serving, server, sock = api
    server.acl.trusted_uids = None
    expected = serving.snapshot().served[MODEL]
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(sock))
    stalled.sendall(_post(b"", length="1000000") + b"0123456789")
    try:
        start = time.monotonic()
        _good_request_works(sock, expected)
        assert time.monotonic() - start < 30
    finally:
        stalled.close()
    _good_request_works(sock, expected)


def test_many_stalled_partial_requests_do_not_block_other_callers(api):
    """Slowloris: 100 connections each send half a request line and stall."""
    serving, server, sock = api
    server.acl.trusted_uids = None
    expected = serving.snapshot().served[MODEL]
    held = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.sendall(b"POST /v1/models/clf/in")
            held.append(s)
        time.sleep(1.0)  # let the server accept them all (its listen backlog is small)
        start = time.monotonic()
        _good_request_works(sock, expected)
        with Client(str(sock), timeout=30) as c:
            assert c.health()["ok"] is True
        assert time.monotonic() - start < 30
    finally:
        for s in held:
            s.close()


@pytest.mark.slow
def test_a_stalled_partial_request_is_dropped_after_a_timeout(api):
    """A connection that never completes its request must not hold a server thread (and
    its memory) forever: thousands of them would exhaust the daemon. The server should
    close it after a request timeout (10 s here at most)."""
    _, _, sock = api
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(12)
    s.connect(str(sock))
    s.sendall(b"GET /v1/heal")
    start = time.monotonic()
    try:
        data = s.recv(4096)  # b"" (closed) or an error answer, before our own timeout
    except TimeoutError:
        data = None
    finally:
        s.close()
    assert data is not None, "the server kept a stalled request open for 12 s"
    assert time.monotonic() - start <= 12


def _drip(sock: Path, head: bytes, drip: bytes, every: float, give_up: float) -> float:
    """Send ``head`` then ``drip`` a byte at a time, one every ``every`` seconds; the
    seconds until the server closed the connection (``give_up`` if it never did)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    start = time.monotonic()
    try:
        s.sendall(head)
        for b in drip:
            if time.monotonic() - start > give_up:
                break
            s.sendall(bytes([b]))
            time.sleep(every)
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - start
    finally:
        s.close()
    return give_up


@pytest.mark.parametrize("where", ["head", "body", "pipelined body"])
def test_a_request_dripping_a_byte_at_a_time_is_dropped_at_its_deadline(api, where, monkeypatch):
    """Each byte comes well within any single wait; the whole request must still be in
    by its deadline (slowloris): in the head, in an infer body, and in the body of a
    request whose head came in with the one before it."""
    import edgeseal.agent.api as api_module

    monkeypatch.setattr(api_module, "REQUEST_TIMEOUT", 1.0)
    _, server, sock = api
    _allow(server)  # the body is read by infer itself, not discarded after a 403
    infer = f"POST /v1/models/{MODEL}/infer HTTP/1.1\r\nContent-Length: 200\r\n\r\n".encode()
    drip = b"\0" * 200
    if where == "head":
        head, drip = b"GET /v1/health HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200
    elif where == "body":
        head = infer
    else:
        head = b"GET /v1/health HTTP/1.1\r\n\r\n" + infer
    closed_after = _drip(sock, head, drip, every=0.1, give_up=8.0)
    assert closed_after < 4.0, f"a dripping request held its connection {closed_after:.1f} s"


def test_an_idle_connection_costs_nothing_until_its_idle_timeout(api, monkeypatch):
    """Between requests a kept-alive connection may wait the idle timeout, not the
    (shorter) request timeout; past it, the server closes it."""
    import edgeseal.agent.api as api_module

    monkeypatch.setattr(api_module, "REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(api_module, "IDLE_TIMEOUT", 3.0)
    _, _, sock = api
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 ")
        time.sleep(1.0)  # longer than the request timeout, within the idle one
        s.sendall(b"GET /v1/health HTTP/1.1\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 "), "closed before its idle timeout"
        start = time.monotonic()
        assert s.recv(1) == b""  # closed by the server
        assert 1.5 < time.monotonic() - start < 10.0
    finally:
        s.close()


def test_a_caller_reading_a_large_answer_slowly_is_cut_off_at_the_send_deadline(api, monkeypatch):
    """Taking a little of a large answer before each send would time out must not hold
    a server thread past the deadline for the whole answer."""
    import edgeseal.agent.api as api_module

    monkeypatch.setattr(api_module, "REQUEST_TIMEOUT", 1.0)
    serving, server, sock = api
    server.acl.trusted_uids = None
    # Any large answer will do (a big batch's JSON outputs, say): here the metrics'.
    monkeypatch.setattr(server, "metrics", lambda caller: "# " + "x" * 4_000_000 + "\n")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(sock))
    got, start = 0, time.monotonic()
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        while chunk := s.recv(32 * 1024):
            got += len(chunk)
            if time.monotonic() - start > 20:
                break
            time.sleep(0.2)  # well within any single wait of the server's
    except ConnectionResetError:
        pass
    finally:
        s.close()
    held = time.monotonic() - start
    assert got < 4_000_000, "the whole answer went out to a reader this slow"
    assert held < 8.0, f"a slow reader held its connection {held:.1f} s"
    _good_request_works(sock, serving.snapshot().served[MODEL])


def test_groups_cannot_be_borrowed_through_a_recycled_pid(api, monkeypatch):
    """A caller connects from a child that exits; by the time the caller sends its
    request, the child's pid names a process in the model's group (/proc says so). The
    groups are the ones the kernel fixed at connect (SO_PEERGROUPS), not the pid's now."""
    import pathlib

    _, server, sock = api
    privileged = 4242  # a group this test process is not in
    assert privileged not in os.getgroups()
    server.acl.rules = ((MODEL, AccessRule(uids=(), groups=("members",))),)
    server.acl.group_ids = lambda name: privileged if name == "members" else None
    parent, child_end = socket.socketpair(socket.AF_UNIX)
    pid = os.fork()
    if pid == 0:  # the child: connect, hand the socket over, exit
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            socket.send_fds(child_end, [b"x"], [s.fileno()])
        finally:
            os._exit(0)
    _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    os.waitpid(pid, 0)
    real_read_text = pathlib.Path.read_text

    def recycled(self, *a, **kw):  # the child's pid now belongs to a member's process
        if str(self) == f"/proc/{pid}/status":
            return f"Name:\tmember\nGroups:\t{privileged}\n"
        return real_read_text(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "read_text", recycled)
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(10)
    try:
        body = _npz(input=probe_input())
        conn.sendall(_post(body))
        answer = conn.recv(65536)
    finally:
        conn.close()
        parent.close()
        child_end.close()
    assert _status(answer) == 403, answer[:200]


def _held_open(sock: Path, n: int) -> tuple[list[socket.socket], int]:
    """Open ``n`` idle connections; the ones the server still holds open a moment later,
    and how many it answered with 503 and closed."""
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        conns.append(s)
    time.sleep(0.5)
    kept, refused = [], 0
    for s in conns:
        s.setblocking(False)
        try:
            data = s.recv(4096)
        except BlockingIOError:
            kept.append(s)
            continue
        refused += _status(data) == 503
        s.close()
    return kept, refused


def test_idle_connections_of_an_unlisted_uid_cannot_lock_listed_callers_out(api, monkeypatch):
    """A uid no rule lists opens many idle connections: the server keeps at most its
    per-uid share open (answering the rest 503 at once), and the places kept for listed
    callers stay free, so a listed app is still served. (One uid runs the suite: the
    flood's connections are credited to a uid no rule lists.)"""
    import edgeseal.agent.api as api_module

    serving, server, sock = api
    expected = serving.snapshot().served[MODEL]
    _allow(server)
    server._server.max_total, server._server.max_per_uid, server._server.reserved = 12, 4, 6
    real = api_module.peer_credentials
    stranger = ME + 1000
    monkeypatch.setattr(
        api_module, "peer_credentials", lambda s: dataclasses.replace(real(s), uid=stranger)
    )
    flood, refused = _held_open(sock, 40)
    try:
        assert len(flood) == 4 and refused == 36
        # Other unlisted uids fill the rest but the reserved places.
        others = []
        for i in range(3):
            monkeypatch.setattr(
                api_module,
                "peer_credentials",
                lambda s, u=stranger + 1 + i: dataclasses.replace(real(s), uid=u),
            )
            kept, _ = _held_open(sock, 4)
            others += kept
        assert len(flood) + len(others) == 12 - 6
        monkeypatch.setattr(api_module, "peer_credentials", real)
        _good_request_works(sock, expected)  # a listed caller takes a reserved place
    finally:
        for s in flood:
            s.close()
    assert 500 not in server.errors


def test_a_huge_json_body_is_refused_from_its_head_before_it_is_read(api):
    """A listed caller declares a 58 MiB JSON body: the model's inputs can never need
    that many bytes, so the answer is 413 at once, from the head alone; the body is never
    read or decoded (it is not even sent here)."""
    serving, server, sock = api
    _allow(server)
    head = _post(b"", ctype="application/json", length=str(58 << 20))
    answer = _raw(sock, head, timeout=5.0)
    assert _status(answer) == 413, answer[:200]
    _good_request_works(sock, serving.snapshot().served[MODEL])


def test_a_compressed_npz_bomb_is_refused_from_its_array_headers(api):
    """A small deflated .npz declaring millions of elements is refused (413) from its
    .npy headers, before numpy inflates it."""
    import io

    _, server, sock = api
    _allow(server)
    buf = io.BytesIO()
    np.savez_compressed(buf, input=np.zeros(32 << 20, np.uint8))
    assert len(buf.getvalue()) < 1 << 20  # within the body bound: only its content is big
    answer = _raw(sock, _post(buf.getvalue()))
    assert _status(answer) == 413, answer[:200]


def test_the_rate_limit_is_applied_before_the_body_is_read(api):
    """Past its rate limit, a caller is answered 429 from the head alone: its body is not
    read (here it is never sent)."""
    _, server, sock = api
    _allow(server, rate_per_minute=1)
    assert _status(_raw(sock, _post(_npz(input=probe_input())))) == 200
    answer = _raw(sock, _post(b"", length="1000000"), timeout=5.0)
    assert _status(answer) == 429, answer[:200]


def test_inputs_and_outputs_beyond_the_models_size_bounds_are_refused_with_413(api, monkeypatch):
    """The elements a call may carry and the output bytes it may make are bounded per
    model (here made small); beyond either, 413 and the daemon serves on."""
    serving, server, sock = api
    _allow(server)
    expected = serving.snapshot().served[MODEL]
    sm = serving.agent.model(MODEL)
    monkeypatch.setattr(sm._checks, "max_elements", 16)  # two rows of 8
    answer = _raw(sock, _post(_npz(input=probe_input())))  # four rows
    assert _status(answer) == 413, answer[:200]
    monkeypatch.undo()
    monkeypatch.setattr(sm, "config", dataclasses.replace(sm.config, max_output_bytes=8))
    answer = _raw(sock, _post(_npz(input=probe_input())))
    assert _status(answer) == 413, answer[:200]
    monkeypatch.undo()
    _good_request_works(sock, expected)
    assert 500 not in server.errors


def test_metrics_and_health_show_only_the_models_a_caller_may_see(api):
    """A uid no rule lists sees no model's series in /metrics and no model in
    /v1/health, as /v1/models shows it none; a listed caller sees its model."""
    _, server, sock = api
    server.acl.rules = ((MODEL, AccessRule(uids=(ME + 1,), groups=())),)

    def get(path: str) -> bytes:
        answer = _raw(sock, f"GET {path} HTTP/1.1\r\n\r\n".encode())
        assert _status(answer) in (200, 503), answer[:200]
        return answer.split(b"\r\n\r\n", 1)[1]

    assert f'model="{MODEL}"'.encode() not in get("/metrics")
    health = json.loads(get("/v1/health"))
    assert health["models"] == 0 and health["failing"] == {}
    _allow(server)
    assert f'model="{MODEL}"'.encode() in get("/metrics")
    assert json.loads(get("/v1/health"))["models"] == 1


def test_refused_calls_are_audited_and_a_flood_of_them_is_bounded(serving, tmp_path):
    """403, 429, 400 and 413 each leave an audit record (who, what, which code); a flood
    of refusals writes at most the bucket's records, the rest counted in the next one."""
    import edgeseal.agent.api as api_module
    from edgeseal.agent.audit import AuditLog

    log_path = tmp_path / "audit.log"
    audit = AuditLog(log_path)
    sock = Path(f"/tmp/es-sec-{os.getpid()}-{time.monotonic_ns()}.sock")
    server = ApiServer(serving.agent, sock, audit=audit)
    server.start()
    server.acl.trusted_uids = ()
    try:
        server.acl.rules = ((MODEL, AccessRule(uids=(ME + 1,), groups=())),)
        assert _status(_raw(sock, _post(_npz(input=probe_input())))) == 403
        _allow(server, rate_per_minute=1)
        assert _status(_raw(sock, _post(_npz(input=probe_input())))) == 200
        assert _status(_raw(sock, _post(_npz(input=probe_input())))) == 429
        _allow(server)
        assert _status(_raw(sock, _post(_npz(other=probe_input())))) == 400
        big = _post(b"", ctype="application/json", length=str(58 << 20))
        assert _status(_raw(sock, big)) == 413
        audit.close()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        refused = [(r["code"], r["model"], r["uid"]) for r in records if r["result"] == "refused"]
        assert refused == [(c, MODEL, ME) for c in (403, 429, 400, 413)]
        # A flood: the bucket's worth of records, then counts.
        audit = AuditLog(log_path)
        server.audit = audit
        server.acl.rules = ()
        with Client(str(sock)) as c:
            for _ in range(api_module.REFUSALS_PER_MINUTE + 40):
                with pytest.raises(AgentError):
                    c.info(MODEL)
        audit.close()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        flood = [r for r in records if r["result"] == "refused"][4:]
        assert len(flood) <= api_module.REFUSALS_PER_MINUTE + 1
    finally:
        server.stop()


def test_without_so_peergroups_the_groups_of_a_gone_or_newer_process_are_not_used(monkeypatch):
    """The fallback for kernels before 4.13 reads /proc at accept, and keeps the groups
    only of a process that started before the read and is the same one after it."""
    import edgeseal.agent.api as api_module

    mine = api_module._proc_groups(os.getpid())
    assert set(mine) == set(os.getgroups())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert api_module._proc_groups(pid) == ()  # gone
    real = api_module._start_ticks
    ticks = iter([real(os.getpid()), (real(os.getpid()) or 0) + 1])
    monkeypatch.setattr(api_module, "_start_ticks", lambda p: next(ticks))
    assert api_module._proc_groups(os.getpid()) == ()  # replaced while it was read
