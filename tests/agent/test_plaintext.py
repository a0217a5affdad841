"""Where a model's plaintext lives once the agent opens it: counted in memory, never on disk.

The memory and disk tests use a marker model: 1 MiB of seeded random float32 weights.
Its marker is the 64-byte run in the middle of the model file; it occurs once in the
model, so each copy found elsewhere is a copy of the weights. A copy packed for the CPU
does not keep the file's layout: it is found by :func:`column_run`, 8 floats down a
column of the weight matrix, a run the model file does not hold.

* Memory: a child process opens the bundle, runs one inference, then reads its own
  memory through ``/proc/self/maps`` and ``/proc/self/mem`` and counts the marker and
  the column run.
  ``memfd_secret`` pages and ``[vvar]`` cannot be read that way (for the secret pages,
  that is the point), so the count is the number of plaintext copies that ordinary
  memory access (a debugger, a core dump, a same-uid reader) would find. The test
  process is not scanned: it built the model and holds its own copy.
* Disk: the agent opens the bundle in this process and serves 20 inferences while
  fanotify (where permitted: it needs CAP_SYS_ADMIN) reports every file this process
  writes, with a descriptor to read it through even if it was deleted at once; a
  before/after scan of the test's tree, the temp dirs, ``/dev/shm`` and the working dir
  covers the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config, DeviceConfig
from edgeseal.core.keys import write_private_key
from edgeseal.packager.samples import (
    make_onnx_weighted,
    make_tflite_dense,
    reference_tflite_dense,
)
from helpers import NOW

WIDTH = 512  # 512 x 512 float32 weights: 1 MiB
MARKER_BYTES = 64
SEED = 7

#: Readable plaintext copies besides the locked buffer while the model is open, keyed by
#: the claim the runtime's status makes: (copies in the model file's layout, copies
#: packed for the CPU). A change to either side (a new copy, or a new claim) must show
#: up here.
#: The claim at graph_optimization levels above basic: ONNX Runtime's copy is ordinary
#: heap memory (dumped, not wiped).
ORT_OWN_COPY = (
    "into the graph, for ONNX Runtime's optimizers: it keeps its own copy, outside the "
    "locked buffer"
)
RUNTIME_COPIES = {
    "OrtValue views of the locked buffer (no copy)": (0, 0),
    ORT_OWN_COPY: (1, 0),
    "as bytes in locked MADV_DONTDUMP pages, wiped on close; XNNPACK packs its own copy "
    "of the weights into the ordinary heap": (1, 1),
    "as bytes in locked MADV_DONTDUMP pages, wiped on close; XNNPACK off: no packed copy "
    "of the weights": (1, 0),
}
# Measured on x86_64 Linux (glibc 2.36, ONNX Runtime 1.32, LiteRT 2.3): ONNX Runtime makes
# no copy. LiteRT keeps the model as bytes, which the agent puts in locked MADV_DONTDUMP
# pages (edgeseal.agent.memory.LockedBytes) and wipes on close; its XNNPACK delegate packs
# the weights into blocks of output channels in memory of its own, which the agent cannot
# reach: freed on close, not wiped. Whether freed memory stays readable is malloc's
# choice, so after close the test allows up to the packed copies, and no copy in the
# file's layout. With [runtime] tflite_xnnpack = false, LiteRT's builtin kernels read the
# weights in place from the model bytes: no packed copy.

#: The cases of the memory and core-dump tests: (format, XNNPACK on, weights buffer).
#: Each format with both buffer kinds; LiteRT without XNNPACK once, with the buffer kind
#: whose copy is readable (the kind does not change what XNNPACK does).
RUNTIME_CASES = [
    *(
        pytest.param(fmt, True, memory, "basic", id=f"{fmt}-{memory}")
        for fmt in ("onnx", "tflite")
        for memory in ("memfd_secret", "anonymous")
    ),
    pytest.param("tflite", False, "anonymous", "basic", id="tflite-no_xnnpack-anonymous"),
    # Above basic ONNX Runtime's optimizers get the weights in the graph, and copy them.
    pytest.param("onnx", True, "anonymous", "all", id="onnx-anonymous-optimization_all"),
]

#: Floats in :func:`column_run`.
COLUMN_FLOATS = 8

#: The section whose locked buffer holds the weights.
WEIGHTS_SECTION = {"onnx": "weights", "tflite": "graph"}


@dataclass(frozen=True)
class MarkerModel:
    path: Path
    marker: bytes
    x: np.ndarray
    expected: np.ndarray
    #: The weight matrix as the model file stores it: ONNX ``[in, out]``, TFLite
    #: ``[out, in]``.
    weights: np.ndarray


def _marker_model(directory: Path, fmt: str) -> MarkerModel:
    """The model file, its marker (checked to lie in the weights), an input and the answer."""
    directory.mkdir(parents=True, exist_ok=True)
    x = np.linspace(-1.0, 1.0, WIDTH, dtype=np.float32).reshape(1, WIDTH)
    if fmt == "onnx":
        data = make_onnx_weighted(total_weight_bytes=WIDTH * WIDTH * 4, seed=SEED, width=WIDTH)
        (initializer,) = onnx.load_model_from_string(data).graph.initializer
        weights = numpy_helper.to_array(initializer)
        expected = x @ weights
    else:
        import ai_edge_litert.schema_py_generated as schema

        data = make_tflite_dense(seed=SEED, n_in=WIDTH, n_out=WIDTH)
        flatbuffer = schema.Model.GetRootAs(data, 0)
        weights = max(
            (flatbuffer.Buffers(i).DataAsNumpy() for i in range(flatbuffer.BuffersLength())),
            key=np.size,
        )
        expected = reference_tflite_dense(x, seed=SEED, n_in=WIDTH, n_out=WIDTH)
    assert weights.nbytes == WIDTH * WIDTH * 4
    weights = np.frombuffer(weights.tobytes(), np.float32).reshape(WIDTH, WIDTH)
    middle = len(data) // 2
    marker = data[middle : middle + MARKER_BYTES]
    assert data.count(marker) == 1 and marker in weights.tobytes()
    assert len(set(marker)) > MARKER_BYTES // 2, "the marker must look random"
    path = directory / f"marker.{fmt}"
    path.write_bytes(data)
    return MarkerModel(path, marker, x, expected, weights)


def column_run(model: MarkerModel) -> bytes:
    """8 floats down a column of the weight matrix: not a run in the model file, but one
    in XNNPACK's packing of a fully connected layer (blocks of 8 or 16 output channels,
    one input at a time; measured on x86_64). A packing without such runs would show up
    as a count below the expected one, failing the tests, never passing them."""
    run = model.weights[:COLUMN_FLOATS, WIDTH // 3].tobytes()
    assert run not in model.path.read_bytes()
    return run


# --- memory: a child process counts the marker in its own readable memory -----------

_CHILD = r'''
import json, mmap, os, sys
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
# Each run is held as two halves, never as one, so the scanner's needle is no copy.
NEEDLES = {
    "copies": (bytes.fromhex(args["head"]), bytes.fromhex(args["tail"])),
    "packed": (bytes.fromhex(args["column_head"]), bytes.fromhex(args["column_tail"])),
}
SPAN = max(len(head) + len(tail) for head, tail in NEEDLES.values())
UNREADABLE = {"[vvar]", "[vvar_vclock]", "[vsyscall]"}
WINDOW = 4 << 20
# /proc/self/mem is read into this one mapping, which the scan skips: reading never makes
# a copy that a later region would count.
window = mmap.mmap(-1, WINDOW)
window_view = memoryview(window)
window_lo = int(np.frombuffer(window, np.uint8).ctypes.data)
window_hi = window_lo + WINDOW


def count_range(fd, lo, hi, found):
    pos = lo
    while pos < hi:
        try:
            got = os.preadv(fd, [window_view[: min(WINDOW, hi - pos)]], pos)
        except OSError:
            return hi - pos
        if got <= 0:
            return hi - pos
        last = pos + got >= hi
        limit = got if last else max(got - SPAN + 1, 1)  # later starts: next window
        for name, (head, tail) in NEEDLES.items():
            end = len(head) + len(tail)
            i = window.find(head, 0, got)
            while 0 <= i < limit:
                found[name] += window.find(tail, i + len(head), i + end) == i + len(head)
                i = window.find(head, i + 1, got)
        pos += limit
    return 0


def scan():
    """Copies of the marker and of the column run in readable memory; bytes of memory
    that could not be read."""
    with open("/proc/self/maps") as f:
        regions = f.read().splitlines()
    found = dict.fromkeys(NEEDLES, 0)
    secret, unreadable = 0, 0
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        for line in regions:
            fields = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if name.startswith("/secretmem"):
                secret += hi - lo
                continue
            if "r" not in fields[1] or name in UNREADABLE:
                unreadable += hi - lo
                continue
            for a, b in ((lo, min(hi, window_lo)), (max(lo, window_hi), hi)):
                if a < b:
                    unreadable += count_range(fd, a, b, found)
    finally:
        os.close(fd)
    return {**found, "secret_bytes": secret, "unreadable_bytes": unreadable}


key = InMemoryKey(load_private_key(Path(args["key"]), passphrase=None))
policy = VerifyPolicy(
    anchor=Keyring(Path(args["keyring"])).anchor(), now=datetime.fromisoformat(args["now"])
)
report = {"before": scan()}
config = Config(
    runtime=RuntimeConfig(tflite_xnnpack=args["xnnpack"], graph_optimization=args["level"])
)
model = open_bundle(Path(args["bundle"]), key_store=key, policy=policy, config=config)
(output,) = model.run({"input": np.asarray(args["x"], np.float32)}).values()
report["output"] = output.tolist()
report["status"] = model.status()
report["open"] = scan()
model.close()
report["closed"] = scan()
print(json.dumps(report))
'''


def child_setup(
    fleet: Any,
    bundle: Path,
    model: MarkerModel,
    *,
    memfd_secret: bool,
    xnnpack: bool = True,
    level: str = "basic",
) -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON arguments and environment of a child that opens ``bundle`` as dev-a: the
    device key written to a file, the marker in two halves (so the child's arguments do
    not hold it whole), memfd_secret on or off, ``[runtime] tflite_xnnpack``."""
    key = fleet.tmp / "dev-a.key"
    if not key.exists():
        write_private_key(key, fleet.devices["dev-a"].private_key, passphrase=None)
    half = MARKER_BYTES // 2
    args = {
        "bundle": str(bundle),
        "key": str(key),
        "keyring": str(fleet.ring.path),
        "now": NOW.isoformat(),
        "x": model.x.tolist(),
        "head": model.marker[:half].hex(),
        "tail": model.marker[half:].hex(),
        "xnnpack": xnnpack,
        "level": level,
    }
    env = {k: v for k, v in os.environ.items() if k != "EDGESEAL_NO_MEMFD_SECRET"}
    if not memfd_secret:
        env["EDGESEAL_NO_MEMFD_SECRET"] = "1"
    return args, env


def _count_in_child(
    fleet: Any,
    bundle: Path,
    model: MarkerModel,
    *,
    memfd_secret: bool,
    xnnpack: bool,
    level: str = "basic",
) -> Any:
    args, env = child_setup(
        fleet, bundle, model, memfd_secret=memfd_secret, xnnpack=xnnpack, level=level
    )
    column = column_run(model)
    args["column_head"] = column[: len(column) // 2].hex()
    args["column_tail"] = column[len(column) // 2 :].hex()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(("fmt", "xnnpack", "memory", "level"), RUNTIME_CASES)
def test_plaintext_copies_in_process_memory_are_counted(
    fleet, tmp_path, fmt, xnnpack, memory, level
):
    """Timeline, in a child process that never saw the model: 0 copies before opening;
    open the bundle and run once: the locked buffer (readable only when it is an
    anonymous mapping, not memfd_secret) plus exactly the copies, in the file's layout
    and packed, that the runtime's status admits (LiteRT without XNNPACK: none packed);
    close: none in the file's layout, at most the packed ones (freed by the runtime,
    unwiped)."""
    model = _marker_model(tmp_path / "model", fmt)
    bundle, _ = fleet.pack(model.path, name=f"marker-{fmt}")
    report = _count_in_child(
        fleet, bundle, model, memfd_secret=memory == "memfd_secret", xnnpack=xnnpack, level=level
    )
    status = report["status"]
    if fmt == "tflite":
        assert status["xnnpack"] is xnnpack
    kind = status["memory"][WEIGHTS_SECTION[fmt]]["kind"]
    print(
        f"\n[{fmt}, {memory} requested, weights buffer is {kind}] readable plaintext copies:"
        f" before open {report['before']['copies']}, open {report['open']['copies']},"
        f" closed {report['closed']['copies']}; packed copies: open"
        f" {report['open']['packed']}, closed {report['closed']['packed']};"
        f" memfd_secret bytes while open"
        f" {report['open']['secret_bytes']}; weights handed over"
        f" {status['weights_handed_over']!r}"
    )
    np.testing.assert_allclose(np.asarray(report["output"]), model.expected, rtol=1e-4, atol=1e-4)
    assert report["before"]["copies"] == report["before"]["packed"] == 0, "held before open"
    if memory == "anonymous":
        assert kind == "anonymous"
    if kind == "memfd_secret":
        assert report["open"]["secret_bytes"] >= WIDTH * WIDTH * 4
    assert status["weights_handed_over"] in RUNTIME_COPIES, "status changed: recount copies"
    buffer_copies = 0 if kind == "memfd_secret" else 1
    file_layout, packed = RUNTIME_COPIES[status["weights_handed_over"]]
    assert report["open"]["copies"] == buffer_copies + file_layout
    assert report["open"]["packed"] == packed
    # The agent wipes what it holds; nothing wipes a runtime's own copies (packed, or
    # ONNX Runtime's above basic): after close they may linger in freed memory.
    lingers = file_layout if status["weights_handed_over"] == ORT_OWN_COPY else 0
    assert report["closed"]["copies"] <= lingers
    assert report["closed"]["packed"] <= packed
    assert report["closed"]["secret_bytes"] == 0, "a memfd_secret buffer outlived close()"


_LOCKED_BYTES_CHILD = r"""
import json, mmap, sys
from pathlib import Path

import numpy as np

from edgeseal.agent.memory import LockedBytes


def vm_flags(page):
    address, inside = page * mmap.PAGESIZE, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if not first.endswith(":"):
            lo, hi = (int(a, 16) for a in first.split("-"))
            inside = lo <= address < hi
        elif first == "VmFlags:" and inside:
            return set(line.split()[1:])
    raise AssertionError(f"{address:#x} is not mapped")


def pages(data):
    start = int(np.frombuffer(data, np.uint8).ctypes.data)
    return set(range(start // mmap.PAGESIZE, -(-(start + len(data)) // mmap.PAGESIZE)))


def protected(page):
    return {"lo", "dd"} <= vm_flags(page)


rng = np.random.default_rng(int(sys.argv[1]))
sources = [rng.bytes(3000 + 700 * i) for i in range(8)]  # small: heap neighbours
held = [LockedBytes(memoryview(bytearray(s))) for s in sources]
statuses = [b.status().to_obj() for b in held]
same = [b.data for b in held] == sources
unprotected_while_open = sum(not protected(p) for b in held for p in pages(b.data))
closing, staying = held[::2], held[1::2]
contents = [b.data for b in closing]
open_pages = set().union(*(pages(b.data) for b in staying))
closed_pages = set().union(*(pages(d) for d in contents))
for b in closing:
    b.close()
print(json.dumps({
    "statuses": statuses,
    "same": same,
    "unprotected_while_open": unprotected_while_open,
    "wiped": all(d == bytes(len(d)) for d in contents),
    "shared_pages": len(open_pages & closed_pages),
    "shared_pages_unprotected": sum(not protected(p) for p in open_pages & closed_pages),
    "released_pages": len(closed_pages - open_pages),
    "released_pages_still_locked_or_dontdump": sum(
        bool({"lo", "dd"} & vm_flags(p)) for p in closed_pages - open_pages
    ),
}))
"""


def test_locked_bytes_are_locked_out_of_core_dumps_and_wiped_on_close():
    """LockedBytes (the model bytes LiteRT keeps), in a fresh process whose heap puts
    small ones side by side: every page locked (``lo``) and MADV_DONTDUMP (``dd``) while
    open; close wipes it in place and gives back its pages, except those an open
    neighbour shares."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOCKED_BYTES_CHILD, str(SEED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"\n{report}")
    assert (
        report["statuses"]
        == [{"kind": "heap", "locked": True, "excluded_from_core_dumps": True, "note": ""}] * 8
    )
    assert report["same"] and report["wiped"]
    assert report["unprotected_while_open"] == 0
    assert report["shared_pages"] > 0, "no shared page: the test proves nothing"
    assert report["shared_pages_unprotected"] == 0
    assert report["released_pages"] > 0
    assert report["released_pages_still_locked_or_dontdump"] == 0


# --- disk: nothing this process writes, nothing under the watched trees, holds it -----

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_FAN_CLOEXEC, _FAN_NONBLOCK, _FAN_UNLIMITED_QUEUE = 0x1, 0x2, 0x10
_FAN_MARK_ADD, _FAN_MARK_MOUNT = 0x1, 0x10
_FAN_MODIFY, _FAN_CLOSE_WRITE, _FAN_Q_OVERFLOW = 0x2, 0x8, 0x4000
_FAN_EVENT = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_AT_FDCWD = -100
MAX_SCANNED_FILE = 512 * 1024 * 1024


def _contains(fd: int, marker: bytes) -> bool:
    size = os.fstat(fd).st_size
    if not 0 < size <= MAX_SCANNED_FILE:
        return False
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
        return mm.find(marker) >= 0


def _file_contains(path: Path, marker: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone, a socket, a FIFO or unreadable: nothing to scan
        return False
    try:
        return _contains(fd, marker)
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


class FileWriteWatch:
    """fanotify on the mounts holding ``roots``: files this process wrote, read through
    the descriptor each event carries (so a file deleted at once is still read)."""

    def __init__(self, roots: list[Path], marker: bytes) -> None:
        self.marker = marker
        self.written: set[str] = set()
        self.holding_marker: set[str] = set()
        self.overflowed = False
        _libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.fd = _libc.fanotify_init(
            _FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_UNLIMITED_QUEUE, os.O_RDONLY | os.O_LARGEFILE
        )
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        for root in roots:
            mask = _FAN_MODIFY | _FAN_CLOSE_WRITE
            flags = _FAN_MARK_ADD | _FAN_MARK_MOUNT
            if _libc.fanotify_mark(self.fd, flags, mask, _AT_FDCWD, bytes(root)) != 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, f"fanotify_mark {root}")

    def drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return
            offset = 0
            while offset + _FAN_EVENT.size <= len(data):
                length, _, _, _, mask, fd, pid = _FAN_EVENT.unpack_from(data, offset)
                offset += length
                if mask & _FAN_Q_OVERFLOW:
                    self.overflowed = True
                if fd < 0:
                    continue
                try:
                    if pid == os.getpid():
                        name = str(Path(f"/proc/self/fd/{fd}").readlink())
                        self.written.add(name)
                        with contextlib.suppress(OSError, ValueError):
                            if _contains(fd, self.marker):
                                self.holding_marker.add(name)
                finally:
                    os.close(fd)

    def close(self) -> None:
        self.drain()
        os.close(self.fd)


def _snapshot(roots: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every regular file under ``roots`` (symlinks not followed) and its identity."""
    seen: dict[str, tuple[int, ...]] = {}
    for root in roots:
        for dirpath, _, files in os.walk(root, followlinks=False):
            for f in files:
                p = os.path.join(dirpath, f)  # noqa: PTH118 - os.walk yields str paths
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if st.st_mode & 0o170000 == 0o100000:
                        seen[p] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return seen


@contextlib.contextmanager
def _watch_writes(roots: list[Path], marker: bytes) -> Iterator[FileWriteWatch | None]:
    try:
        watch = FileWriteWatch(roots, marker)
    except OSError as e:
        print(f"\nfanotify unavailable ({e}); relying on the before/after scan")
        yield None
        return
    try:
        yield watch
    finally:
        watch.close()


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_no_plaintext_model_reaches_the_disk(fleet, tmp_path, fmt):
    """Timeline: pack the marker model and delete its source; watch; open the bundle,
    serve 20 inferences, close; no file written by this process, and no file new or
    changed under the test's tree, the temp dirs, /dev/shm or the working dir, holds
    the marker."""
    model = _marker_model(tmp_path / "source", fmt)
    bundle, _ = fleet.pack(model.path, name=f"marker-{fmt}")
    model.path.unlink()
    home = tmp_path / "home"
    home.mkdir()
    config = Config(device=DeviceConfig(home=str(home)))
    candidates = [tmp_path, Path(tempfile.gettempdir()), Path("/tmp"), Path("/dev/shm")]
    candidates.append(Path.cwd())
    roots = sorted({p.resolve() for p in candidates if p.is_dir()})
    before = _snapshot(roots)
    with _watch_writes(roots, model.marker) as watch:
        with open_bundle(
            bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
        ) as opened:
            for _ in range(20):
                (output,) = opened.run({"input": model.x}).values()
                if watch:
                    watch.drain()
        np.testing.assert_allclose(output, model.expected, rtol=1e-4, atol=1e-4)
    after = _snapshot(roots)
    changed = sorted(p for p, ident in after.items() if before.get(p) != ident)
    under_test = [p for p in after if Path(p).is_relative_to(tmp_path)]
    scanned = sorted(set(changed) | set(under_test))
    found = [p for p in scanned if _file_contains(Path(p), model.marker)]
    method = "fanotify + before/after scan" if watch else "before/after scan"
    written = sorted(watch.written) if watch else []
    print(
        f"\n[{fmt}] {method}: {len(written)} files written by this process {written},"
        f" {len(changed)} files new or changed under {[str(r) for r in roots]},"
        f" {len(scanned)} scanned"
    )
    assert found == []
    if watch:
        assert not watch.overflowed, "fanotify lost events"
        assert sorted(watch.holding_marker) == []
