"""What a core dump of the agent holds of a model's weights (issue 9, "Memory promises").

A child process opens a bundle of the marker model (tests/agent/test_plaintext.py, ONNX
or TFLite) and runs it once, holding a control: the same 64-byte marker in an ordinary
bytes object. With the model open, the test

1. finds, in the child's readable memory (``/proc/PID/maps``, ``/proc/PID/mem``, and
   ``smaps`` for the ``dd`` flag ``MADV_DONTDUMP`` sets; ``memfd_secret`` pages cannot
   be read), two runs of the weights the child was never given: 64 bytes of a row as
   the model file stores them, and :func:`~test_plaintext.column_run`, which only a
   copy packed for the CPU (LiteRT's XNNPACK delegate) holds;
2. dumps it with ``gcore`` (gdb's, which honours ``MADV_DONTDUMP``).

The dump must hold the control exactly once (so the scan works), each run exactly as
often as it lies in readable memory outside ``MADV_DONTDUMP`` mappings (so the dump
and the live scan agree), no run in the file's layout (every readable copy of those,
the anonymous locked buffer and LiteRT's model bytes, is ``MADV_DONTDUMP``), and exactly
the packed copies the runtime's status admits (``RUNTIME_COPIES``): none for ONNX
Runtime, XNNPACK's one for LiteRT, which is in the ordinary heap and so in the dump, and
none for LiteRT with ``[runtime] tflite_xnnpack = false``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plaintext import (
    MARKER_BYTES,
    RUNTIME_CASES,
    RUNTIME_COPIES,
    WEIGHTS_SECTION,
    _marker_model,
    child_setup,
    column_run,
)

pytestmark = pytest.mark.slow

_CHILD = r"""
import json, sys
from datetime import datetime
from pathlib import Path

import numpy as np

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config, RuntimeConfig
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
config = Config(runtime=RuntimeConfig(tflite_xnnpack=args["xnnpack"]))
model = open_bundle(Path(args["bundle"]), key_store=key, policy=policy, config=config)
(output,) = model.run({"input": np.asarray(args["x"], np.float32)}).values()
print(json.dumps({"status": model.status(), "output": output.tolist()}), flush=True)
sys.stdin.read()  # scanned and dumped here, with the model open
model.close()
print(len(control))
"""

_REGION = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+)(?: \S+){3}\s*(.*)$")
_UNREADABLE = {"[vvar]", "[vvar_vclock]", "[vsyscall]"}
_CHUNK = 16 << 20


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


def _find_in_process(pid: int, needles: dict[str, bytes]) -> dict[str, list[dict[str, object]]]:
    """Where each needle lies in ``pid``'s readable memory: address, mapping, and whether
    that mapping is excluded from core dumps (``dd`` in smaps' VmFlags)."""
    dontdump: set[str] = set()
    region = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _REGION.match(line)
        if m:
            region = f"{m[1]}-{m[2]}"
        elif line.startswith("VmFlags:") and "dd" in line.split()[1:]:
            dontdump.add(region)
    span = max(map(len, needles.values())) - 1
    hits: dict[str, list[dict[str, object]]] = {name: [] for name in needles}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            m = _REGION.match(line)
            assert m, line
            lo, hi, perms, name = int(m[1], 16), int(m[2], 16), m[3], m[4]
            if "r" not in perms or name in _UNREADABLE or name.startswith("/secretmem"):
                continue
            pos = lo
            while pos < hi:
                try:
                    chunk = os.pread(fd, min(_CHUNK + span, hi - pos), pos)
                except OSError:
                    break
                if not chunk:
                    break
                for needle_name, needle in needles.items():
                    i = chunk.find(needle)
                    while 0 <= i < _CHUNK:  # a start past _CHUNK is the next chunk's
                        hits[needle_name].append(
                            {
                                "address": hex(pos + i),
                                "mapping": f"{m[1]}-{m[2]} {name}",
                                "dontdump": f"{m[1]}-{m[2]}" in dontdump,
                            }
                        )
                        i = chunk.find(needle, i + 1)
                pos += _CHUNK
    finally:
        os.close(fd)
    return hits


@pytest.mark.parametrize(
    ("fmt", "xnnpack", "memory", "level"),
    # Above basic ONNX Runtime's own copy is ordinary heap, in any dump: nothing to find.
    [case for case in RUNTIME_CASES if case.values[3] == "basic"],
)
def test_a_core_dump_of_the_agent_holds_only_the_weight_copies_its_runtime_admits(
    fleet, tmp_path, fmt, xnnpack, memory, level
):
    """ONNX Runtime: no run of the weights in the dump. LiteRT: none in the
    model file's layout (its model bytes are in locked MADV_DONTDUMP pages), and the one
    copy its XNNPACK delegate packs; with ``tflite_xnnpack = false``, none at all. Each
    checked against where the runs lie in the process."""
    gcore = _gcore()
    model = _marker_model(tmp_path / "model", fmt)
    data = model.path.read_bytes()
    quarter = len(data) // 4
    # Runs of the weights the child never held: one as the file stores them, one only a
    # packed copy holds.
    needles = {
        "control": model.marker,
        "row": data[quarter : quarter + MARKER_BYTES],
        "column": column_run(model),
    }
    assert needles["row"] in model.weights.tobytes() and needles["row"] != model.marker
    assert data.count(needles["row"]) == 1
    bundle, _ = fleet.pack(model.path, name=f"marker-{fmt}")
    args, env = child_setup(
        fleet, bundle, model, memfd_secret=memory == "memfd_secret", xnnpack=xnnpack, level=level
    )
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
        status = report["status"]
        if fmt == "tflite":
            assert status["xnnpack"] is xnnpack
        kind = status["memory"][WEIGHTS_SECTION[fmt]]["kind"]
        if memory == "anonymous":
            assert kind == "anonymous"
        live = _find_in_process(child.pid, needles)
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
        dumped = {name: _count(core, needle) for name, needle in needles.items()}
        print(
            f"\n[{fmt}, xnnpack {xnnpack}, weights buffer is {kind}] core of"
            f" {core.stat().st_size >> 20} MiB holds: the control {dumped['control']}x, a run"
            f" of a row of the weights {dumped['row']}x, a run down a column"
            f" {dumped['column']}x; in the live process: {json.dumps(live)}"
        )
        assert dumped["control"] == 1, "the control is missing (scan broken) or the weights leaked"
        for name in needles:
            outside = [w for w in live[name] if not w["dontdump"]]
            assert dumped[name] == len(outside), f"{name}: the dump and the live scan disagree"
        claim = status["weights_handed_over"]
        assert claim in RUNTIME_COPIES, f"status changed ({claim!r}): recount the copies"
        file_layout, packed = RUNTIME_COPIES[claim]
        buffer_copies = 0 if kind == "memfd_secret" else 1
        assert len(live["row"]) == buffer_copies + file_layout
        assert all(w["dontdump"] for w in live["row"]), "a copy in the file's layout is dumped"
        assert dumped["row"] == 0
        assert len(live["column"]) == dumped["column"] == packed
    finally:
        child.kill()
        child.wait(10)
        Path(f"{tmp_path / 'core'}.{child.pid}").unlink(missing_ok=True)
