"""TFLite runtimes: LiteRT, and tflite-runtime where LiteRT has no wheel.

The fallback test runs the real thing: a separate virtualenv with ``tflite-runtime``
2.14 and ``numpy<2`` and without ``ai-edge-litert`` (cached under
``~/.cache/edgeseal/venvs``, keyed on the Python, the pins and the workspace's package
metadata), which opens a bundle packed here, checks its golden vectors and serves one
inference. Timeline:

1. here (LiteRT): pack a TFLite bundle for dev-a, run the model on LiteRT;
2. in the fallback venv: open the bundle with dev-a's key, ``ServingModel.start`` (the
   golden vectors must reproduce), infer the same input, report status and outputs;
3. here: the venv used tflite-runtime, not LiteRT, and its outputs match LiteRT's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeseal.agent.runtimes import TfliteSession, find_tflite_interpreter
from edgeseal.core.config import Limits, RuntimeConfig
from edgeseal.core.errors import MissingExtraError
from edgeseal.core.keys import write_private_key
from helpers import NOW

REPO = Path(__file__).resolve().parents[2]
#: What the fallback venv installs from PyPI: the last tflite-runtime and what the
#: workspace's core/hardware/agent import on a TFLite-only device.
FALLBACK_REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2", "cryptography>=50")
WORKSPACE_PACKAGES = ("core", "hardware", "agent")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeseal" / "venvs"


def test_litert_is_preferred_and_named_in_status(tflite_model: Path) -> None:
    found = find_tflite_interpreter()
    assert (found.runtime, found.distribution, found.fallback_reason) == (
        "litert",
        "ai-edge-litert",
        "",
    )
    session = TfliteSession(tflite_model.read_bytes(), RuntimeConfig())
    try:
        status = session.status()
        assert status["runtime"] == "litert"
        assert status["tflite_runtime"].startswith("ai-edge-litert ")
        assert "tflite_fallback" not in status
    finally:
        session.close()


def test_neither_runtime_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as on a device without the package.
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(MissingExtraError, match="pip install ai-edge-litert"):
        find_tflite_interpreter()


def test_the_preflight_child_loads_a_tflite_model_with_xnnpack_as_configured(
    tflite_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child that loads a new model first must load it as the session will: with
    ``tflite_xnnpack = false``, LiteRT's builtin ops without their default delegates."""
    from edgeseal.agent import preflight, runtimes

    real = find_tflite_interpreter()
    resolvers: list[Any] = []

    def recording(**kwargs: Any) -> Any:  # the real interpreter, its options noted
        resolvers.append(kwargs.get("experimental_op_resolver_type"))
        return real.cls(**kwargs)

    monkeypatch.setattr(
        runtimes, "find_tflite_interpreter", lambda: dataclasses.replace(real, cls=recording)
    )
    model = tflite_model.read_bytes()
    preflight._load_tflite(model, {"tflite_xnnpack": False})
    preflight._load_tflite(model, {"tflite_xnnpack": True})
    assert resolvers == [real.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES, None]
    monkeypatch.undo()
    # and the real child, handed the option, passes the model
    preflight.Preflight().check(
        model_format="tflite",
        graph=model,
        weights=[],
        limits=Limits(),
        runtime=RuntimeConfig(tflite_xnnpack=False),
    )


def _venv_key(python: str) -> str:
    h = hashlib.sha256()
    h.update(f"{python}\0{sys.version}\0{platform.machine()}\0{REPO}\0".encode())
    h.update("\0".join(FALLBACK_REQUIREMENTS).encode())
    for pkg in WORKSPACE_PACKAGES:
        h.update((REPO / pkg / "pyproject.toml").read_bytes())
    return h.hexdigest()[:16]


def _pip(venv: Path, *args: str) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def fallback_venv() -> Path:
    """The cached venv with tflite-runtime and without LiteRT; built once per key."""
    python = getattr(sys, "_base_executable", sys.executable)
    venv = CACHE_ROOT / f"tflite-runtime-{_venv_key(python)}"
    done = venv / ".edgeseal-complete"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with (CACHE_ROOT / f"{venv.name}.lock").open("a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one builder at a time (xdist, CI jobs)
        if done.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a build cut off half-way
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
        _pip(venv, "install", "--only-binary=:all:", *FALLBACK_REQUIREMENTS)
        editable = [a for pkg in WORKSPACE_PACKAGES for a in ("-e", f"./{pkg}")]
        _pip(venv, "install", "--no-deps", *editable)
        done.write_text(" ".join(FALLBACK_REQUIREMENTS) + "\n")
    return venv


DEVICE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from datetime import datetime
    from pathlib import Path

    import numpy as np

    from edgeseal.agent.guard import ServingModel
    from edgeseal.agent.opener import open_bundle
    from edgeseal.core.config import Config
    from edgeseal.core.keys import load_private_key
    from edgeseal.core.keystore import InMemoryKey
    from edgeseal.core.reader import VerifyPolicy
    from edgeseal.core.trust import TrustAnchor

    args = json.loads(sys.argv[1])
    key = InMemoryKey(load_private_key(Path(args["key"]), passphrase=None))
    policy = VerifyPolicy(
        anchor=TrustAnchor.from_pem_files([Path(args["root"]).read_bytes()]),
        now=datetime.fromisoformat(args["now"]),
    )
    config = Config()
    opened = open_bundle(Path(args["bundle"]), key_store=key, policy=policy, config=config)
    serving = ServingModel.start(opened, config.agent)  # refuses unless golden vectors pass
    x = np.load(args["input"])
    result = serving.infer({"input": x})
    np.savez(args["output"], **result.outputs)
    report = {
        "litert_importable": importlib.util.find_spec("ai_edge_litert") is not None,
        "numpy": np.__version__,
        "golden_vectors": serving.info()["golden_vectors"],
        "status": serving.status(),
    }
    serving.close()
    print(json.dumps(report, default=str))
    """
)


@pytest.mark.slow
def test_tflite_runtime_fallback_serves_a_bundle(
    fleet: Any, tflite_model: Path, tmp_path: Path
) -> None:
    """A device without LiteRT opens a bundle packed here on tflite-runtime 2.14."""
    venv = fallback_venv()
    bundle, _ = fleet.pack(tflite_model, name="dense")
    key_path = tmp_path / "dev-a.key"
    write_private_key(key_path, fleet.devices["dev-a"].private_key, passphrase=None)
    x = np.random.default_rng(7).normal(size=(1, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    reference = TfliteSession(tflite_model.read_bytes(), RuntimeConfig())
    try:
        assert reference.runtime == "litert"
        expected = reference.run({"input": x})["output"]
    finally:
        reference.close()

    args = {
        "key": str(key_path),
        "root": str(fleet.ring.root_pub_path),
        "now": NOW.isoformat(),
        "bundle": str(bundle),
        "input": str(tmp_path / "x.npy"),
        "output": str(tmp_path / "out.npz"),
    }
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", DEVICE_SCRIPT, json.dumps(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["litert_importable"] is False
    assert report["numpy"].startswith("1.")
    assert report["golden_vectors"] >= 1  # start() checked them: they reproduced
    status = report["status"]
    assert status["runtime"] == "tflite-runtime"
    assert status["tflite_runtime"] == "tflite-runtime 2.14.0"
    assert "ai-edge-litert does not import" in status["tflite_fallback"]
    with np.load(tmp_path / "out.npz") as out:
        got = out["output"]
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with contextlib.suppress(OSError):
        key_path.unlink()
