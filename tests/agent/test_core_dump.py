"""No plaintext weights in a core dump of the agent (issue 9, "Memory promises").

A child process opens a bundle of the marker model (tests/agent/test_plaintext.py) and
runs it once, holding a control: the same 64-byte marker in an ordinary bytes object.
``gcore`` (gdb's, which honours ``MADV_DONTDUMP`` and cannot read ``memfd_secret``
pages) dumps it while the model is open. The dump must hold the control exactly once
(so the scan works, and any copy of the weights would make it two) and none of a second
run of the weights that the child was never given.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plaintext import MARKER_BYTES, _marker_model, child_setup

pytestmark = pytest.mark.slow

_CHILD = r"""
import json, sys
from datetime import datetime
from pathlib import Path

import numpy as np

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.keyring import Keyring
from edgeseal.core.keys import load_private_key
from edgeseal.core.keystore import InMemoryKey
from edgeseal.core.reader import VerifyPolicy

args = json.loads(sys.argv[1])
# The control: the marker, joined once from its two halves, in an ordinary bytes object.
control = bytes.fromhex(args["head"]) + bytes.fromhex(args["tail"])
key = InMemoryKey(load_private_key(Path(args["key"]), passphrase=None))
policy = VerifyPolicy(
    anchor=Keyring(Path(args["keyring"])).anchor(), now=datetime.fromisoformat(args["now"])
)
model = open_bundle(Path(args["bundle"]), key_store=key, policy=policy, config=Config())
(output,) = model.run({"input": np.asarray(args["x"], np.float32)}).values()
print(json.dumps({"status": model.status(), "output": output.tolist()}), flush=True)
sys.stdin.read()  # dumped here, with the model open
model.close()
print(len(control))
"""


def _gcore() -> str:
    path = shutil.which("gcore")
    if path is None:
        why = "gcore is not installed (Debian package: gdb)"
        if os.environ.get("EDGESEAL_REQUIRE_ALL_LANES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def _count(path: Path, needle: bytes) -> int:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        found, i = 0, mm.find(needle)
        while i >= 0:
            found += 1
            i = mm.find(needle, i + 1)
        return found


@pytest.mark.parametrize("memory", ["memfd_secret", "anonymous"])
def test_a_core_dump_of_the_agent_holds_no_plaintext_weights(fleet, tmp_path, memory):
    gcore = _gcore()
    model = _marker_model(tmp_path / "model", "onnx")
    data = model.path.read_bytes()
    quarter = len(data) // 4
    unseen = data[quarter : quarter + MARKER_BYTES]  # a run of the weights the child never held
    assert data.count(unseen) == 1 and unseen != model.marker
    bundle, _ = fleet.pack(model.path, name="marker-onnx")
    args, env = child_setup(fleet, bundle, model, memfd_secret=memory == "memfd_secret")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        assert line, f"the child died (rc {child.wait(10)})"
        report = json.loads(line)
        kind = report["status"]["memory"]["weights"]["kind"]
        if memory == "anonymous":
            assert kind == "anonymous"
        prefix = tmp_path / "core"
        dump = subprocess.run(
            [gcore, "-o", str(prefix), str(child.pid)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        core = Path(f"{prefix}.{child.pid}")
        assert dump.returncode == 0 and core.exists(), dump.stdout + dump.stderr
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(30) == 0
        controls, leaked = _count(core, model.marker), _count(core, unseen)
        print(
            f"\n[weights buffer is {kind}] core of {core.stat().st_size >> 20} MiB: marker"
            f" found {controls}x (the control), an unseen run of the weights {leaked}x"
        )
        assert controls == 1, "the control is missing (scan broken) or the weights leaked"
        assert leaked == 0, "plaintext weights are in the core dump"
    finally:
        child.kill()
        child.wait(10)
        Path(f"{tmp_path / 'core'}.{child.pid}").unlink(missing_ok=True)
