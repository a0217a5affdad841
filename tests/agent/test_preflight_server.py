"""The pre-flight server: started once, a forked child per check, and a child's crash,
hang or death never takes the server (or the agent) with it.

Each test drives a real :class:`Preflight` and its real server process; a "hostile
runtime" is the real server with ONNX Runtime's session constructor replaced, as a
crafted graph would trigger a runtime bug.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeseal.agent.preflight import ModelRejectedError, Preflight, RuntimeCrashError
from edgeseal.core.config import Limits, RuntimeConfig
from edgeseal.packager.samples import make_onnx_classifier


def _server_with_runtime(session: str) -> list[str]:
    """The real server, ONNX Runtime's ``InferenceSession`` replaced by ``session``."""
    return [
        sys.executable,
        "-c",
        "import ctypes, os, time, onnxruntime\n"
        f"onnxruntime.InferenceSession = {session}\n"
        "from edgeseal.agent.preflight import main\n"
        "main()\n",
    ]


def _check(pf: Preflight, graph: bytes | None = None) -> None:
    pf.check(
        model_format="onnx",
        graph=graph if graph is not None else make_onnx_classifier(seed=1),
        weights=[],
        limits=Limits(),
        runtime=RuntimeConfig(),
    )


def _server_pid(pf: Preflight) -> int:
    server = pf._server
    assert server is not None and server.alive()
    return server.proc.pid


@pytest.fixture
def preflight() -> Iterator[Preflight]:
    pf = Preflight()
    yield pf
    pf.close()


def test_checks_share_one_server_that_forks_a_child_for_each(preflight):
    _check(preflight)
    pid = _server_pid(preflight)
    _check(preflight)
    _check(preflight)
    assert _server_pid(preflight) == pid


def test_the_server_is_single_threaded_so_forking_it_is_safe(preflight):
    _check(preflight)
    tasks = list(Path(f"/proc/{_server_pid(preflight)}/task").iterdir())
    assert len(tasks) == 1


def test_a_refused_model_leaves_the_server_serving(preflight):
    with pytest.raises(ModelRejectedError, match="does not parse"):
        _check(preflight, b"\xff" * 64)
    pid = _server_pid(preflight)
    _check(preflight)
    assert _server_pid(preflight) == pid


@pytest.mark.parametrize(
    ("session", "signal_name"),
    [("lambda *a, **k: ctypes.string_at(0)", "SIGSEGV"), ("lambda *a, **k: os.abort()", "SIGABRT")],
)
def test_a_child_crash_fails_that_check_and_the_server_survives_it(session, signal_name):
    pf = Preflight(command=_server_with_runtime(session))
    try:
        with pytest.raises(RuntimeCrashError, match=signal_name):
            _check(pf)
        pid = _server_pid(pf)
        with pytest.raises(RuntimeCrashError, match=signal_name):
            _check(pf)
        assert _server_pid(pf) == pid
    finally:
        pf.close()


def test_a_hanging_child_is_killed_at_the_deadline_and_the_server_survives_it():
    pf = Preflight(command=_server_with_runtime("lambda *a, **k: time.sleep(60)"), timeout=5.0)
    try:
        with pytest.raises(ModelRejectedError):  # refused before any session: starts it
            _check(pf, b"\xff")
        pid = _server_pid(pf)
        pf.timeout = 1.0
        with pytest.raises(RuntimeCrashError, match="did not finish within 1 s"):
            _check(pf)
        assert _server_pid(pf) == pid
    finally:
        pf.close()


def test_a_child_that_exhausts_its_memory_ends_alone():
    """A runtime that allocates without bound: the child hits its address-space limit
    (set here, as the OOM killer would end it) and the server lives on."""
    pf = Preflight(
        command=_server_with_runtime(
            "lambda *a, **k: (__import__('resource').setrlimit("
            "__import__('resource').RLIMIT_AS, (1 << 30, 1 << 30)), bytearray(1 << 32))"
        )
    )
    try:
        with pytest.raises(ModelRejectedError, match="ONNX Runtime refuses it"):
            _check(pf)
        pid = _server_pid(pf)
        with pytest.raises(ModelRejectedError, match="ONNX Runtime refuses it"):
            _check(pf)
        assert _server_pid(pf) == pid
    finally:
        pf.close()


def test_a_dead_server_is_restarted_by_the_next_check(preflight):
    _check(preflight)
    pid = _server_pid(preflight)
    os.kill(pid, signal.SIGKILL)
    assert preflight._server is not None
    preflight._server.proc.wait()
    _check(preflight)
    assert _server_pid(preflight) != pid


def test_a_server_that_never_answers_is_killed_at_the_deadline():
    pf = Preflight(command=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=1.0)
    try:
        with pytest.raises(RuntimeCrashError, match="did not finish"):
            _check(pf)
        assert pf._server is None  # killed, not left behind
    finally:
        pf.close()


def test_a_process_forked_from_the_agent_starts_its_own_server_and_leaves_the_parents(
    preflight,
):
    """multiprocessing's fork start method copies the agent's Preflight into the child:
    the child must not use the parent's control socket, nor kill the parent's server."""
    _check(preflight)
    pid = _server_pid(preflight)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        code = 1
        try:
            _check(preflight)
            code = 0 if _server_pid(preflight) != pid else 2
            preflight.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _server_pid(preflight) == pid
    _check(preflight)
