"""The agent end to end: store, integrity checks, the unix-socket API, ACL, the daemon."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.api import TENSORS, ApiServer, encode_tensors
from edgeseal.agent.audit import AuditLog, verify_log
from edgeseal.agent.client import AgentError, Client
from edgeseal.agent.device import DeviceHome
from edgeseal.agent.guard import IntegrityError
from edgeseal.agent.service import Agent
from edgeseal.core.config import AccessRule, load_config
from edgeseal.core.errors import InputError, RollbackError
from edgeseal.hardware.floors import FileFloors
from edgeseal.packager import pack as pack_module
from edgeseal.packager.pack import PackOptions
from edgeseal.packager.samples import make_trained_classifier
from helpers import run, start_agent
from ota_world import wait_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent-models")
    for seed in (1, 2):
        model, ds = make_trained_classifier(seed=seed, hidden=64)
        (d / f"m{seed}.onnx").write_bytes(model)
    np.savez(d / "calib.npz", input=ds.x_train[:200], labels=ds.y_train[:200])
    np.save(d / "x.npy", ds.x_test[:4])
    return d


@pytest.fixture
def device(fleet, tmp_path):
    """A provisioned device home whose key the fleet registry knows as dev-home."""
    home = DeviceHome(tmp_path / "device")
    info = home.init(root_public_keys=[fleet.ring.root_pub_path.read_bytes()])
    fleet.ring.add_device("dev-home", _pub(info), target=None, key_store="software")
    return home


def _pub(info):
    from edgeseal.core.keys import load_public_key

    return load_public_key(info["public_key"].encode(), "device")


def _bundle(fleet, trained, version, model="m1", **kw):
    out, _ = fleet.pack(
        trained / f"{model}.onnx",
        name="clf",
        version=version,
        to=("dev-home",),
        options=PackOptions(calibration=trained / "calib.npz"),
        **kw,
    )
    return out


def _agent(device, text=""):
    cfg = load_config(text=text)
    return Agent(device, cfg)


def _x(trained):
    return np.load(trained / "x.npy").astype(np.float32)


def test_install_stages_checks_commits_and_keeps_a_fallback(fleet, trained, device):
    agent = _agent(device)
    try:
        r1 = agent.install(_bundle(fleet, trained, 1))
        r2 = agent.install(_bundle(fleet, trained, 2, model="m2"))
        assert (r1["slot"], r2["slot"], r2["fallback"]) == ("a", "b", "a")
        result = agent.infer("clf", {"input": _x(trained)})
        assert result.model["version"] == 2 and result.outputs["probs"].shape == (4, 4)
        assert agent.store.floors.get("clf") == 1
        agent.install(_bundle(fleet, trained, 3))
        assert agent.store.floors.get("clf") == 2
        with pytest.raises(RollbackError):
            agent.install(_bundle(fleet, trained, 1))
        assert agent.infer("clf", {"input": _x(trained)}).model["version"] == 3
    finally:
        agent.close()


def test_a_bundle_whose_golden_vectors_fail_is_refused_and_serving_is_unchanged(
    fleet, trained, device, monkeypatch
):
    agent = _agent(device)
    try:
        agent.install(_bundle(fleet, trained, 1))
        real = pack_module.make_golden

        def wrong(*a, **kw):
            golden = real(*a, **kw)
            golden["tolerances"]["probs"]["atol"] = -1.0  # nothing can reproduce it
            return golden

        monkeypatch.setattr(pack_module, "make_golden", wrong)
        # the packager's own device check would refuse to seal it: skip it to make one
        monkeypatch.setattr(pack_module, "check_split_onnx", lambda *a, **kw: None)
        bad = _bundle(fleet, trained, 2, model="m2")
        monkeypatch.undo()
        with pytest.raises(IntegrityError, match="golden"):
            agent.install(bad)
        j = agent.store.journal("clf")
        assert j.active == "a" and j.staged is None and j.slots["b"].state.startswith("failed")
        assert agent.infer("clf", {"input": _x(trained)}).model["version"] == 1
    finally:
        agent.close()


def test_guarded_calls_count_ood_rows_refuse_bad_values_anywhere_and_take_strided_inputs(
    fleet, trained, device
):
    """Through ``Agent.infer`` on a real bundle: a row whose last value is far out
    (range check off, so the OOD score alone sees it) is the one row counted; a NaN or an
    out-of-range value in the last element of a batch is refused and counted as
    rejected; a strided view answers as its contiguous copy does."""
    agent = _agent(device, "[agent]\nrange_margin = 0.0\n")
    ranged = _agent(device)
    try:
        agent.install(_bundle(fleet, trained, 1))
        ranged.load_all()
        x = np.repeat(_x(trained), 8, axis=0)  # 32 rows
        base = agent.infer("clf", {"input": x})
        assert base.ood is not None and len(base.ood) == 32
        shifted = x.copy()
        shifted[17, -1] += 1e3
        r = agent.infer("clf", {"input": shifted})
        assert r.ood is not None and r.ood[17] > 1.0
        assert r.ood_rows == base.ood_rows + (base.ood[17] <= 1.0)
        assert agent.model("clf").counters.ood_rows == base.ood_rows + r.ood_rows
        for model, bad in ((agent, np.nan), (ranged, 1e6)):
            broken = x.copy()
            broken[-1, -1] = bad
            with pytest.raises(InputError):
                model.infer("clf", {"input": broken})
            assert model.model("clf").counters.rejected == 1
        wide = np.repeat(x, 2, axis=1)
        strided = wide[:, ::2]
        assert not strided.flags.c_contiguous
        got = agent.infer("clf", {"input": strided})
        want = agent.infer("clf", {"input": np.ascontiguousarray(strided)})
        np.testing.assert_array_equal(got.outputs["probs"], want.outputs["probs"])
        assert got.ood == want.ood
    finally:
        agent.close()
        ranged.close()


def test_a_model_corrupted_in_memory_is_quarantined_and_falls_back(fleet, trained, device):
    agent = _agent(device)
    try:
        agent.install(_bundle(fleet, trained, 1))
        agent.install(_bundle(fleet, trained, 2, model="m2"))
        sm = agent.model("clf")
        sm.opened.buffers["weights"].view[4096] ^= 0xFF
        problems = sm.self_check()
        assert problems and "weights" in problems[0]
        deadline = time.monotonic() + 10
        while agent.model("clf").identity["version"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.infer("clf", {"input": _x(trained)}).model["version"] == 1
        assert agent.store.journal("clf").slots["b"].state.startswith("failed")
        assert [e["event"] for e in agent.events][-2:] == ["quarantined", "fell_back"]
    finally:
        agent.close()


def test_scheduled_checks_run_on_their_own_thread_on_the_request_schedule(fleet, trained, device):
    """Timeline: golden vectors are due every 3 requests; v2 serves over v1, and its
    weights' signs flip in memory (answers stay finite, so calls go on); calls 1-3 answer
    from v2, the third without running the check itself; the check runs on a thread of its
    own, finds the golden vectors broken, quarantines v2, and the store falls back to v1."""
    agent = _agent(device, "[agent]\ngolden_every_requests = 3\n")
    try:
        agent.install(_bundle(fleet, trained, 1))
        agent.install(_bundle(fleet, trained, 2, model="m2"))
        sm = agent.model("clf")
        ran_on: list[str] = []
        check_golden = sm._golden_problems

        def recorded() -> list[str]:
            ran_on.append(threading.current_thread().name)
            return check_golden()

        sm._golden_problems = recorded  # type: ignore[method-assign]
        view = sm.opened.buffers["weights"].view
        for i in range(3, len(view), 4):  # the sign bit of every float32 weight
            view[i] ^= 0x80
        for _ in range(3):
            assert agent.infer("clf", {"input": _x(trained)}).model["version"] == 2
        assert wait_for(lambda: agent.model("clf").identity["version"] == 1, timeout=20)
        assert ran_on == ["edgeseal-check-clf"]
        assert sm.quarantined and "golden" in sm.quarantined
        assert [e["event"] for e in agent.events][-2:] == ["quarantined", "fell_back"]
        assert agent.infer("clf", {"input": _x(trained)}).model["version"] == 1
    finally:
        agent.close()


def _weights_offset(tflite: bytes) -> int:
    """Where the largest buffer of a TFLite flatbuffer (the dense layer's weights) starts."""
    import ai_edge_litert.schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite, 0)
    buffers = (model.Buffers(i).DataAsNumpy() for i in range(model.BuffersLength()))
    weights = max((b for b in buffers if isinstance(b, np.ndarray)), key=np.size)
    offset = tflite.find(weights.tobytes())
    assert offset > 0 and tflite.count(weights.tobytes()) == 1
    return offset


@pytest.mark.parametrize("xnnpack", [True, False], ids=["xnnpack", "no-xnnpack"])
def test_a_tflite_model_corrupted_in_the_bytes_litert_reads_is_quarantined_and_falls_back(
    fleet, tflite_model, device, xnnpack
):
    """LiteRT reads its own LockedBytes copy of the graph section, not the locked buffer it
    was copied from: a byte flipped in that copy fails the digest check (golden vectors
    not run), which names the section and quarantines; the store falls back to v1.
    Without XNNPACK the flip changes the answer (LiteRT computes from these bytes); with
    it the answer is unchanged (XNNPACK computes from its packed copy, which only the
    golden vectors cover), so the digest check is what finds it."""
    agent = _agent(device, f"[runtime]\ntflite_xnnpack = {str(xnnpack).lower()}\n")
    x = np.random.default_rng(7).normal(size=(1, 4)).astype(np.float32)
    try:
        for version in (1, 2):
            bundle, _ = fleet.pack(tflite_model, name="dense", version=version, to=("dev-home",))
            agent.install(bundle)
        sm = agent.model("dense")
        assert sm.status()["xnnpack"] is xnnpack
        before = sm.opened.run({"input": x})["output"]
        litert_reads = sm.opened.session.own_sections()["graph"]
        address = np.frombuffer(litert_reads, np.uint8).ctypes.data
        offset = _weights_offset(tflite_model.read_bytes()) + 3  # a float's exponent byte
        ctypes.c_ubyte.from_address(address + offset).value ^= 0x40
        after = sm.opened.run({"input": x})["output"]
        assert np.array_equal(before, after) is xnnpack
        problems = sm.self_check(golden=False, digest=True)
        assert problems == ["section graph in memory no longer matches its digest"]
        assert sm.quarantined is not None
        deadline = time.monotonic() + 10
        while agent.model("dense").identity["version"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.infer("dense", {"input": x}).model["version"] == 1
        assert agent.store.journal("dense").slots["b"].state.startswith("failed")
        assert [e["event"] for e in agent.events][-2:] == ["quarantined", "fell_back"]
    finally:
        agent.close()


def test_a_model_replaced_under_a_call_in_flight_is_wiped_only_when_the_call_is_done(
    fleet, trained, device
):
    """v2 replaces v1 while a call still runs v1: v1's memory stays whole until that call
    is done, then is wiped; a check failing on the retired v1 does not roll back v2."""
    agent = _agent(device)
    try:
        agent.install(_bundle(fleet, trained, 1))
        old = agent.model("clf")
        assert old.acquire()  # a call in flight
        agent.install(_bundle(fleet, trained, 2))
        assert agent.model("clf").identity["version"] == 2
        assert old.retired and old.opened.buffers  # not wiped under the call
        assert old.infer({"input": _x(trained)}).model["version"] == 1
        old.opened.buffers["weights"].view[4096] ^= 0xFF
        assert old.self_check(golden=False, digest=True)  # found, and quarantined
        time.sleep(0.3)  # a fall-back, were one started, runs on its own thread
        assert agent.model("clf").identity["version"] == 2
        journal = agent.store.journal("clf")
        assert journal.slots[journal.active].state == "good"
        assert journal.slots[journal.active].version == 2
        assert "fell_back" not in [e["event"] for e in agent.events]
        old.release()
        assert not old.opened.buffers  # wiped once the call is done
        assert not old.acquire()
    finally:
        agent.close()


@contextlib.contextmanager
def _serving(fleet, trained, device, tmp_path, cfg: str = "", flush_every: int = 1):
    """v1 installed and served on a unix socket, with an audit log; (agent, api, sock,
    audit), all stopped after."""
    agent = _agent(device, cfg) if cfg else _agent(device)
    agent.install(_bundle(fleet, trained, 1))
    audit = AuditLog(
        tmp_path / "audit.log", FileFloors(tmp_path / "audit-counter.json"), flush_every=flush_every
    )
    sock = Path(f"/tmp/es-{os.getpid()}-{time.monotonic_ns()}.sock")
    api = ApiServer(agent, sock, audit=audit)
    api.start()
    try:
        yield agent, api, sock, audit
    finally:
        api.stop()
        agent.close()
        audit.close()


@pytest.fixture
def served(fleet, trained, device, tmp_path):
    cfg = """
[agent]
socket_mode = "0666"
[access."clf"]
uids = [65534]
rate_per_minute = 5
top_k = 2
round_digits = 3
"""
    with _serving(fleet, trained, device, tmp_path, cfg) as parts:
        yield parts


def test_the_socket_api_serves_with_identity_and_ood_and_keeps_serving_after_bad_requests(
    served, trained
):
    _, _, sock, audit = served
    with Client(str(sock)) as c:
        assert [m["model"] for m in c.models()] == ["clf"]
        info = c.info("clf")
        assert info["inputs"][0]["name"] == "input" and info["golden_vectors"] == 8
        r = c.infer("clf", {"input": _x(trained)})
        assert r.model["version"] == 1 and len(r.model["bundle_id"]) == 32
        assert r.outputs["probs"].shape == (4, 4) and r.ood is not None and len(r.ood) == 4
        with pytest.raises(AgentError) as e:
            c.infer("nope", {"input": _x(trained)})
        assert e.value.status == 404
        with pytest.raises(AgentError) as e:
            c.infer("clf", {"input": _x(trained).astype(np.float64)})
        assert e.value.status == 400 and "dtype" in str(e.value)
        with pytest.raises(AgentError) as e:
            c.infer("clf", {"input": np.full((1, 16), np.nan, np.float32)})
        assert e.value.status == 400
        with pytest.raises(AgentError) as e:
            c._request(
                "POST", "/v1/models/clf/infer", b"garbage", {"Content-Type": "application/x-npz"}
            )
        assert e.value.status == 400
        assert c.health()["ok"] is True
        assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
        metrics = c.metrics()
        assert 'edgeseal_requests_total{model="clf"} 2' in metrics
        assert 'edgeseal_http_errors_total{code="400"}' in metrics
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(sock))
    raw.sendall(b"POST /v1/models/clf/infer HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n")
    assert b" 413 " in raw.recv(4096)
    raw.close()
    audit.flush()
    report = verify_log(audit.path, FileFloors(audit.path.parent / "audit-counter.json"))
    assert report.ok and report.records >= 4


def _curl(sock: Path, path: str, *args: str) -> tuple[int, bytes]:
    """(status, body) of ``curl --unix-socket`` as docs/agent.md shows it."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--unix-socket",
            str(sock),
            "-w",
            "\\n%{http_code}",
            *args,
            f"http://localhost{path}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    body, _, code = out.rpartition(b"\n")
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_calls_the_socket_as_the_docs_show(served, trained):
    """The docs' curl examples (docs/agent.md, Local API) against a real ApiServer."""
    _, _, sock, _ = served
    code, body = _curl(sock, "/v1/models")
    assert code == 200 and [m["model"] for m in json.loads(body)["models"]] == ["clf"]
    code, body = _curl(sock, "/v1/health")
    assert code == 200 and json.loads(body)["ok"] is True
    code, body = _curl(sock, "/v1/models/clf")
    assert code == 200 and json.loads(body)["inputs"][0]["name"] == "input"
    x = _x(trained)[:1]
    request = {"inputs": {"input": {"dtype": "float32", "shape": [1, 16], "data": x.tolist()}}}
    code, body = _curl(
        sock,
        "/v1/models/clf/infer",
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
        "--data-binary",
        json.dumps(request),
    )
    answer = json.loads(body)
    assert code == 200 and answer["model"] == "clf" and answer["version"] == 1
    assert answer["outputs"]["probs"]["shape"] == [1, 4] and len(answer["ood"]) == 1
    with Client(str(sock)) as c:  # the same answer as the client's
        want = c.infer("clf", {"input": x}).outputs["probs"]
    np.testing.assert_allclose(np.array(answer["outputs"]["probs"]["data"]), want, rtol=1e-6)
    code, body = _curl(sock, "/v1/models/nope/infer", "--data-binary", "x")
    assert code == 404 and json.loads(body)["error"] == "NoSuchModelError"
    code, body = _curl(sock, "/metrics")
    assert code == 200 and b'edgeseal_requests_total{model="clf"} 2' in body


def test_the_clients_quick_read_of_an_infer_answer_matches_the_general_one(
    served, trained, monkeypatch
):
    """The client reads the agent's own infer answers with one match and any other
    answer with the general parse: both must give the same response, OOD and all."""
    import re

    import edgeseal.agent.client as client_module

    _, _, sock, _ = served
    x = _x(trained)
    with Client(str(sock)) as c:
        quick = [c.infer("clf", {"input": x}), c.infer("clf", {"input": x[:1]})]
        assert all(r.ood is not None for r in quick)
        resp, _ = c._call(c._tensor_message("clf", {"input": x}), infer=True)
        assert resp.fields is not None  # the quick read took it
    monkeypatch.setattr(client_module, "_INFER_ANSWER", re.compile(rb"(?!)"))
    with Client(str(sock)) as c:
        general = [c.infer("clf", {"input": x}), c.infer("clf", {"input": x[:1]})]
    for q, g in zip(quick, general, strict=True):
        assert q.model == g.model and q.ood == g.ood
        assert isinstance(q.infer_ms, float) and isinstance(g.infer_ms, float)
        assert q.outputs.keys() == g.outputs.keys()
        for k in q.outputs:
            np.testing.assert_array_equal(q.outputs[k], g.outputs[k])


class _DiskUnder:
    """The disk under an open log filling up and freeing again: the log's descriptor is
    pointed at /dev/full (every write fails with ENOSPC) and back."""

    def __init__(self, path: Path) -> None:
        self.fd = next(
            int(e.name)
            for e in Path("/proc/self/fd").iterdir()
            if _link(e) == path  # the descriptor this process holds open on ``path``
        )
        self.saved = os.dup(self.fd)
        self.full = os.open("/dev/full", os.O_WRONLY)

    def fill(self) -> None:
        os.dup2(self.full, self.fd)

    def free(self) -> None:
        os.dup2(self.saved, self.fd)

    def close(self) -> None:
        self.free()
        os.close(self.full)
        os.close(self.saved)


def _link(entry: Path) -> Path | None:
    try:
        return entry.readlink()
    except OSError:
        return None


def _records(audit: AuditLog) -> int:
    return audit.path.read_bytes().count(b"\n")


def test_a_batched_audit_is_written_after_the_answer_and_a_failed_write_stops_answers(
    fleet, trained, device, tmp_path
):
    """With a batched log the record is written once the answer is out; when that write
    fails (the disk fills under the log), health says so and the next calls are audited
    before their answer, so none is answered unaudited (503) until the log takes writes."""
    with _serving(fleet, trained, device, tmp_path, flush_every=10) as (_, _, sock, audit):
        disk = _DiskUnder(audit.path)
        try:
            with Client(str(sock)) as c:
                assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
                wait_for(lambda: _records(audit) == 1, what="the record after the answer")
                disk.fill()  # every write to the log now fails with ENOSPC
                assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
                health = c.health()
                assert health["ok"] is False and "No space left" in health["audit"]
                with pytest.raises(AgentError) as e:
                    c.infer("clf", {"input": _x(trained)})
                assert e.value.status == 503 and e.value.kind == "AuditError"
                disk.free()  # space again
                assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
                assert c.health()["ok"] is True
        finally:
            disk.close()
    report = verify_log(audit.path, FileFloors(tmp_path / "audit-counter.json"))
    assert report.ok and report.records == 2  # the two calls whose record could be written


def test_a_call_whose_caller_hangs_up_before_the_answer_is_still_audited(
    fleet, trained, device, tmp_path
):
    """The inference ran and the budget was spent: with a batched log (record after the
    answer) the record is written even when the answer cannot be delivered."""
    with _serving(fleet, trained, device, tmp_path, flush_every=10) as (_, _, sock, audit):
        body = encode_tensors({"input": _x(trained)})
        length = sum(memoryview(p).nbytes for p in body)
        head = (
            "POST /v1/models/clf/infer HTTP/1.1\r\nContent-Type: "
            f"{TENSORS}\r\nAccept: {TENSORS}\r\nContent-Length: {length}\r\n\r\n"
        ).encode()
        for _ in range(3):
            raw = socket.socket(socket.AF_UNIX)
            raw.connect(str(sock))
            raw.sendall(b"".join([head, *(bytes(p) for p in body)]))
            raw.close()  # gone before the answer
        wait_for(lambda: _records(audit) == 3, what="three records")


def test_a_log_synced_per_record_that_cannot_be_written_refuses_answers_and_says_so(
    fleet, trained, device, tmp_path
):
    """The default log (fsync on every record) writes before answering: a full disk is
    a 503 AuditError for the call and a 503 from health naming the audit."""
    with _serving(fleet, trained, device, tmp_path) as (_, _, sock, audit):
        disk = _DiskUnder(audit.path)
        try:
            with Client(str(sock)) as c:
                disk.fill()
                with pytest.raises(AgentError) as e:
                    c.infer("clf", {"input": _x(trained)})
                assert e.value.status == 503 and e.value.kind == "AuditError"
                health = c.health()
                assert health["ok"] is False and "No space left" in health["audit"]
                disk.free()
                assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
                assert c.health()["ok"] is True
        finally:
            disk.close()


def test_callers_are_identified_by_peer_credentials_limited_and_hardened(served, trained):
    """The test runs as root, whom the agent trusts; with no trusted uids its own uid is an
    ordinary caller, identified by SO_PEERCRED on the real socket."""
    _, api, sock, _ = served
    api.acl.trusted_uids = ()
    me = os.getuid()
    with Client(str(sock)) as c:
        with pytest.raises(AgentError) as e:
            c.infer("clf", {"input": _x(trained)})
        assert e.value.status == 403 and f"uid {me}" in str(e.value)
        assert c.models() == []
        api.acl.rules = (
            ("clf", AccessRule(uids=(me,), rate_per_minute=5, top_k=2, round_digits=3)),
        )
        codes = []
        for _ in range(7):
            try:
                probs = c.infer("clf", {"input": _x(trained)}).outputs["probs"]
                codes.append(200)
            except AgentError as err:
                codes.append(err.status)
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
    assert ((probs > 0).sum(axis=1) <= 2).all() and np.allclose(probs, probs.round(3))


def test_ood_scores_separate_shifted_inputs_with_auroc_above_0_9(trained):
    from edgeseal.core.profile import make_profile, ood_scores
    from edgeseal.packager.samples import synthetic_blobs

    _, ds = make_trained_classifier(seed=1, hidden=64)
    profile = make_profile({"input": ds.x_train.astype(np.float32)})
    clean = ds.x_test.astype(np.float32)
    rng = np.random.default_rng(5)
    other = synthetic_blobs(seed=99).x_test.astype(np.float32)
    shifts = {
        "noise": clean + rng.normal(0, clean.std(), clean.shape).astype(np.float32),
        "brightness": clean * 1.5 + clean.std(),
        "another distribution": other[: len(clean)],
    }
    base = ood_scores(profile, {"input": clean})
    figures = {}
    for name, shifted in shifts.items():
        s = ood_scores(profile, {"input": shifted})
        figures[name] = _auroc(base, s)
    print("OOD AUROC:", figures)
    assert all(v >= 0.9 for v in figures.values()), figures
    assert (base > 1).mean() < 0.05


def _auroc(neg, pos):
    scores = np.concatenate([neg, pos])
    ranks = scores.argsort().argsort() + 1
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class _NotifyListener:
    """systemd's side of ``$NOTIFY_SOCKET``: a unix datagram socket in ``tmp`` that records
    every message the daemon sends, in order, with when it arrived (monotonic seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.arrivals: list[float] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                message = self._sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.arrivals.append(time.monotonic())
            self.messages.append(message)

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 60) -> None:
        wait_for(
            lambda: sum(m.startswith(prefix) for m in self.messages) >= count,
            timeout,
            f"{count} x {prefix} from the daemon (got {self.messages})",
        )

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._sock.close()


def test_the_daemon_notifies_systemd_serves_reloads_on_sighup_and_stops_on_sigterm(
    fleet, trained, device, tmp_path
):
    """Timeline, as systemd would see it with Type=notify and WatchdogSec=1s, and the
    logs as a shipper would read them with --log-format json:
    READY=1 once serving; WATCHDOG=1 every 0.5-0.75 s, always within the 1 s timeout;
    SIGHUP: RELOADING=1, the new version serves, READY=1; SIGTERM: STOPPING=1, exit 0,
    socket gone, audit log intact;
    every stderr line one JSON object with a time, a level, a logger and a message."""
    env = dict(os.environ)
    run("agent", "install", str(_bundle(fleet, trained, 1)), "--home", str(device.path), env=env)
    sock = Path(f"/tmp/es-d-{os.getpid()}.sock")
    notify = _NotifyListener(tmp_path / "notify.sock")
    daemon = start_agent(
        device.path,
        sock,
        "--log-format",
        "json",
        env={**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"},
        stderr=subprocess.PIPE,
    )
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", count=3, timeout=10)
        arrivals = zip(notify.arrivals, notify.messages, strict=True)
        pings = [t for t, m in arrivals if m == "WATCHDOG=1"]
        assert all(b - a < 1.0 for a, b in itertools.pairwise(pings)), pings
        with Client(str(sock)) as c:
            assert c.infer("clf", {"input": _x(trained)}).model["version"] == 1
        run(
            "agent",
            "install",
            str(_bundle(fleet, trained, 2, model="m2")),
            "--home",
            str(device.path),
            env=env,
        )
        daemon.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", count=2)
        with Client(str(sock)) as c:
            assert c.infer("clf", {"input": _x(trained)}).model["version"] == 2
        status = json.loads(run("agent", "status", "--socket", str(sock), "--json", env=env).stdout)
        assert status["models"]["clf"]["version"] == 2
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert not sock.exists()
        audit = run("agent", "audit", "verify", "--home", str(device.path), "--json", env=env)
        assert json.loads(audit.stdout)["ok"] is True
    finally:
        if daemon.poll() is None:
            daemon.kill()
        stderr = daemon.communicate()[1]
        notify.close()
    states = [m.split("\n")[0] for m in notify.messages]
    assert states[0] == "READY=1"
    assert states[-1] == "STOPPING=1"
    reload_at = states.index("RELOADING=1")
    assert states[reload_at + 1] == "READY=1"
    assert states.count("WATCHDOG=1") >= 2
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(e["message"] == "agent stopped" for e in lines)


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _deny_write_execute() -> None:
    """In the child before exec: the kernel's form of the unit's MemoryDenyWriteExecute=
    (no memory both writable and executable, no gaining execute later; kept across exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(97)


def test_a_model_opens_and_answers_under_memory_deny_write_execute(fleet, trained, device):
    """The shipped unit sets MemoryDenyWriteExecute=yes: the agent's whole path (verify,
    unwrap, decrypt into locked memory, ONNX Runtime session, golden vectors) needs no
    writable and executable memory. The first run shows the rule is in force."""
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    probe = subprocess.run(
        [sys.executable, "-c", wx],
        preexec_fn=_deny_write_execute,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode == 97:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert probe.returncode != 0 and "Permission denied" in probe.stderr
    bundle = _bundle(fleet, trained, 1)
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "edgeseal.core", "agent", "infer", str(bundle)),
            *("--home", str(device.path), "--input", str(trained / "x.npy"), "--json"),
        ],
        preexec_fn=_deny_write_execute,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is True and answer["status"]["golden_runs"] >= 1


def test_an_input_over_the_agents_body_limit_is_answered_413_naming_the_limit_not_a_broken_pipe(
    fleet, trained, device, tmp_path
):
    """The agent refuses a body over max_body_bytes from the head alone and closes; the
    client, cut off mid-send, reads that answer instead of reporting a broken pipe."""
    cfg = "[agent]\nmax_body_bytes = 1048576\n"
    with _serving(fleet, trained, device, tmp_path, cfg) as (_, _, sock, _):
        big = np.zeros((1 << 20, 16), np.float32)  # 64 MiB, far over the 1 MiB limit
        with Client(str(sock)) as c, pytest.raises(AgentError) as e:
            c.infer("clf", {"input": big})
    assert e.value.status == 413
    assert "1048576 bytes" in str(e.value)
