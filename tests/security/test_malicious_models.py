"""Malicious model files: refused by the packager's safety gate before sealing, and, when
an attacker seals them anyway with a stolen signer key, refused by the agent's pre-flight
check in a child process after decryption. A runtime that crashes or hangs on a model
costs a failed open; the agent and the model it serves carry on.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeseal.agent.opener import open_bundle
from edgeseal.agent.preflight import (
    MAX_DEPTH,
    ModelRejectedError,
    Preflight,
    RuntimeCrashError,
    UnsafeNoPreflight,
)
from edgeseal.core.manifest import TensorSpec
from edgeseal.core.writer import RecipientKey, seal_bundle
from edgeseal.packager.onnx_model import ModelError
from edgeseal.packager.safety import UnsafeModelError
from edgeseal.packager.samples import make_onnx_classifier, make_tflite_dense
from helpers import NOW
from security.conftest import DEVICE, MODEL

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])


def _model(nodes, *, inputs=(X,), outputs=(Y,), initializers=(), domains=(), functions=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), *(helper.make_opsetid(d, 1) for d in domains)],
        functions=list(functions),
    )
    m.ir_version = 8
    return m


def _external(name, location, length=32, dtype=TensorProto.UINT8):
    t = TensorProto(name=name, data_type=dtype, dims=[length])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _leaky(location):
    """A graph whose only output is an 'initializer' read from ``location``."""
    out = helper.make_tensor_value_info("y", TensorProto.UINT8, [32])
    return _model(
        [helper.make_node("Identity", ["leak"], ["y"])],
        inputs=(),
        outputs=(out,),
        initializers=[_external("leak", location)],
    )


def _nested_if(depth):
    """If nodes nested ``depth`` deep in their then-branches (small enough for protobuf)."""

    def leaf(name):
        return helper.make_graph(
            [helper.make_node("Identity", ["x"], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])],
        )

    g = leaf("t0")
    for d in range(1, depth + 1):
        node = helper.make_node("If", ["c"], [f"t{d}"], then_branch=g, else_branch=leaf(f"e{d}"))
        g = helper.make_graph(
            [node], f"g{d}", [], [helper.make_tensor_value_info(f"t{d}", TensorProto.FLOAT, [1, 4])]
        )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info(f"t{depth}", TensorProto.FLOAT, [1, 4])
    return _model(g.node, inputs=(X, cond), outputs=(out,))


def _raw_nested(depth: int) -> bytes:
    """Protobuf bytes of a ModelProto whose graph nests If subgraphs ``depth`` deep,
    encoded by hand (protobuf's own builders refuse to nest this deep)."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def field(num: int, payload: bytes) -> bytes:
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    graph = field(1, field(4, b"Identity") + field(1, b"x") + field(2, b"y"))
    for _ in range(depth):
        attr = field(1, b"then_branch") + varint(20 << 3) + varint(5) + field(6, graph)
        graph = field(1, field(4, b"If") + field(1, b"c") + field(2, b"y") + field(5, attr))
    return varint(1 << 3) + varint(8) + field(7, graph) + field(8, varint(2 << 3) + varint(13))


def _pickle_bytes(marker: Path, protocol: int) -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload(), protocol=protocol)


def _torch_like_zip(marker: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", _pickle_bytes(marker, 2))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


# --- before sealing: the packager's safety gate ------------------------------------------


def _gate_refuses(fleet, path, error=UnsafeModelError, match=None, **kw):
    out = fleet.tmp / "refused.esb"
    with pytest.raises(error, match=match):
        fleet.pack(path, out=out, **kw)
    assert not out.exists() and not list(fleet.tmp.glob(".refused.esb*"))


def _with_external_weights(folder: Path, location: str) -> Path:
    model = onnx.load_from_string(make_onnx_classifier())
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    nbytes = len(w1.raw_data)
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        e = w1.external_data.add()
        e.key, e.value = k, v
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("how", ["relative", "nested-relative", "absolute", "symlink", "hardlink"])
def test_the_gate_refuses_external_data_leaving_the_model_folder(fleet, tmp_path, how):
    """The file outside holds a secret the sealed bundle would carry away."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 4096)
    folder = tmp_path / "model"
    location = {
        "relative": "../secret.bin",
        "nested-relative": "sub/../../secret.bin",
        "absolute": str(secret),
        "symlink": "link.bin",
        "hardlink": "hard.bin",
    }[how]
    path = _with_external_weights(folder, location)
    if how == "symlink":
        (folder / "link.bin").symlink_to(secret)
    if how == "hardlink":
        os.link(secret, folder / "hard.bin")
    _gate_refuses(fleet, path)


def test_the_gate_refuses_custom_op_domains(fleet, tmp_path):
    path = tmp_path / "custom.onnx"
    m = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], domains=["com.evil"])
    onnx.save(m, str(path))
    _gate_refuses(fleet, path, match=r"com\.evil")


def test_the_gate_refuses_absurd_tensor_dimensions(fleet, tmp_path):
    path = tmp_path / "huge.onnx"
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 31, 1 << 31])
    m = _model([helper.make_node("Relu", ["x"], ["y"])], initializers=[big])
    onnx.save(m, str(path))
    _gate_refuses(fleet, path, match="max_section_bytes")


def test_the_gate_refuses_graphs_nested_past_what_parsers_take(fleet, tmp_path):
    path = tmp_path / "deep.onnx"
    path.write_bytes(_raw_nested(2000))
    _gate_refuses(fleet, path, match="not a readable ONNX model")


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
@pytest.mark.parametrize("kind", ["protocol-0", "protocol-2", "protocol-5", "torch-zip"])
def test_the_gate_refuses_pickles_disguised_as_models_without_running_them(
    fleet, tmp_path, suffix, kind
):
    marker = tmp_path / "pickle-ran"
    data = (
        _torch_like_zip(marker)
        if kind == "torch-zip"
        else _pickle_bytes(marker, int(kind.split("-")[1]))
    )
    path = tmp_path / f"model{suffix}"
    path.write_bytes(data)
    _gate_refuses(fleet, path, error=ModelError)
    assert not marker.exists(), "the pickle was unpickled"


# --- after decryption: the agent's pre-flight check -------------------------------------


def _sealed(device, graph: bytes, *, fmt: str = "onnx", name: str = "evil") -> Path:
    """What a stolen pack key can seal around any graph, for this device."""
    sgn, cert = device.fleet.ring.load_signer("release")
    out = device.fleet.tmp / f"{name}.esb"
    seal_bundle(
        out,
        sections={"graph": graph},
        model_name=MODEL,
        version=3,
        model_format=fmt,
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=(TensorSpec("y", "float32", (1, 4)),),
        signer=sgn,
        certificate=cert,
        recipients=[RecipientKey(DEVICE, device.agent.key_store.public_key)],
        created=NOW,
        expires=NOW + timedelta(days=365),
    )
    return out


def _open(device, path, **kw):
    agent = device.agent
    return open_bundle(
        path,
        key_store=agent.key_store,
        policy=agent.policy(MODEL, installing=True),
        config=agent.config,
        **kw,
    )


def _agent_refuses(device, path, error=ModelRejectedError, match=None):
    before = device.snapshot()
    with pytest.raises(error, match=match):
        _open(device, path)
    device.assert_unchanged(before)


@pytest.fixture
def shm_secret():
    path = Path(f"/dev/shm/es-sec-{os.getpid()}")
    path.write_bytes(b"SECRET-OF-ANOTHER-PROCESS-0123!!")
    yield path
    path.unlink(missing_ok=True)
    for extra in ("-link", "-hard"):
        Path(f"{path}{extra}").unlink(missing_ok=True)


def test_the_agent_refuses_a_signed_graph_reading_files_beside_the_weights_placeholder(
    serving, shm_secret
):
    """The weights placeholder folder is /dev, so a graph naming "shm/<file>" as external
    data reads any file in /dev/shm into its outputs. ONNX Runtime alone loads it (shown
    first, with the check switched off); the agent refuses it."""
    path = _sealed(serving, _leaky(f"shm/{shm_secret.name}").SerializeToString())
    with _open(serving, path, preflight=UnsafeNoPreflight()) as unchecked:
        assert bytes(unchecked.run({})["y"]) == shm_secret.read_bytes()
    _agent_refuses(serving, path, match="only the sealed weights may be external")


@pytest.mark.parametrize("how", ["symlink", "hardlink", "relative", "absolute", "placeholder"])
def test_the_agent_refuses_every_other_external_data_reference(serving, shm_secret, how):
    if how == "symlink":
        Path(f"{shm_secret}-link").symlink_to("/etc/hostname")
    if how == "hardlink":
        os.link(shm_secret, f"{shm_secret}-hard")
    location = {
        "symlink": f"shm/{shm_secret.name}-link",
        "hardlink": f"shm/{shm_secret.name}-hard",
        "relative": "../etc/hostname",
        "absolute": "/etc/hostname",
        "placeholder": "null",  # the placeholder, for a tensor the weights do not hold
    }[how]
    path = _sealed(serving, _leaky(location).SerializeToString())
    _agent_refuses(serving, path, match="only the sealed weights may be external")


def test_the_agent_refuses_custom_op_domains(serving):
    m = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], domains=["com.evil"])
    _agent_refuses(serving, _sealed(serving, m.SerializeToString()), match="com.evil")


def test_the_agent_refuses_absurd_tensor_dimensions(serving):
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 31, 1 << 31])
    m = _model([helper.make_node("Relu", ["x"], ["y"])], initializers=[big])
    _agent_refuses(serving, _sealed(serving, m.SerializeToString()), match="declares")


def test_the_agent_refuses_subgraphs_nested_past_its_limit(serving):
    """ONNX Runtime itself loads If nested MAX_DEPTH+4 deep; the agent's limit is lower."""
    m = _nested_if(MAX_DEPTH + 4)
    _agent_refuses(serving, _sealed(serving, m.SerializeToString()), match="nested")


def test_the_agent_refuses_nesting_too_deep_to_parse(serving):
    _agent_refuses(serving, _sealed(serving, _raw_nested(2000)), match="does not parse")


def test_the_agent_refuses_self_recursive_local_functions(serving):
    fn = helper.make_function(
        "local.fn",
        "Rec",
        ["a"],
        ["b"],
        [helper.make_node("Rec", ["a"], ["b"], domain="local.fn")],
        [helper.make_opsetid("", 13), helper.make_opsetid("local.fn", 1)],
    )
    m = _model(
        [helper.make_node("Rec", ["x"], ["y"], domain="local.fn")],
        domains=["local.fn"],
        functions=[fn],
    )
    _agent_refuses(serving, _sealed(serving, m.SerializeToString()), match="calls itself")


def _tflite(edit) -> bytes:
    import ai_edge_litert.schema_py_generated as schema
    import flatbuffers

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(make_tflite_dense(seed=2), 0))
    edit(m, m.subgraphs[0])
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


TFLITE_EDITS = {
    "op input index out of range": lambda m, sg: setattr(sg.operators[0], "inputs", [0, 99, 2]),
    "op input index negative": lambda m, sg: setattr(sg.operators[0], "inputs", [0, -5, 2]),
    "op output index out of range": lambda m, sg: setattr(sg.operators[0], "outputs", [77]),
    "tensor buffer index out of range": lambda m, sg: setattr(sg.tensors[1], "buffer", 999),
    "opcode index out of range": lambda m, sg: setattr(sg.operators[0], "opcodeIndex", 42),
    "subgraph input out of range": lambda m, sg: setattr(sg, "inputs", [1000]),
    "dims overflowing int32": lambda m, sg: setattr(sg.tensors[3], "shape", [1 << 30, 1 << 30]),
    "buffer shorter than its tensor": lambda m, sg: setattr(
        m.buffers[2], "data", m.buffers[2].data[:3]
    ),
}


@pytest.mark.parametrize("case", list(TFLITE_EDITS))
def test_the_agent_refuses_tflite_flatbuffers_with_out_of_range_indices(serving, case):
    path = _sealed(serving, _tflite(TFLITE_EDITS[case]), fmt="tflite", name="evil-tflite")
    _agent_refuses(serving, path, (ModelRejectedError, RuntimeCrashError))


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_a_pickle_sealed_as_a_model_is_refused_and_never_unpickled(serving, tmp_path, fmt):
    marker = tmp_path / "pickle-ran"
    path = _sealed(serving, _pickle_bytes(marker, 4), fmt=fmt, name=f"pickle-{fmt}")
    _agent_refuses(serving, path)
    assert not marker.exists()


# --- a runtime that crashes or hangs ------------------------------------------------------

#: The real pre-flight child, with ONNX Runtime's session constructor replaced by a null
#: pointer dereference: what a runtime bug triggered by a crafted graph looks like.
SEGFAULTING_RUNTIME = [
    sys.executable,
    "-c",
    "import ctypes, onnxruntime\n"
    "onnxruntime.InferenceSession = lambda *a, **k: ctypes.string_at(0)\n"
    "from edgeseal.agent.preflight import main\n"
    "main()\n",
]
ABORTING_RUNTIME = [
    sys.executable,
    "-c",
    "import os, onnxruntime\n"
    "onnxruntime.InferenceSession = lambda *a, **k: os.abort()\n"
    "from edgeseal.agent.preflight import main\n"
    "main()\n",
]


@pytest.mark.parametrize(
    ("command", "signal_name"), [(SEGFAULTING_RUNTIME, "SIGSEGV"), (ABORTING_RUNTIME, "SIGABRT")]
)
def test_a_runtime_crash_on_install_fails_the_install_and_the_agent_serves_on(
    fresh, monkeypatch, command, signal_name
):
    from edgeseal.agent import preflight

    monkeypatch.setattr(preflight.default_preflight(), "command", command)
    before = fresh.snapshot()
    with pytest.raises(RuntimeCrashError, match=signal_name):
        fresh.agent.install(fresh.bundle(3, seed=3))
    fresh.assert_serving_unchanged(before)
    monkeypatch.undo()
    assert fresh.agent.install(fresh.bundle(4, seed=4))["version"] == 4


def test_a_runtime_that_hangs_on_a_model_is_killed_at_the_deadline(serving):
    hanging = Preflight(command=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=1.0)
    before = serving.snapshot()
    with pytest.raises(RuntimeCrashError, match="did not finish"):
        _open(serving, serving.bundle(3, seed=3), preflight=hanging)
    serving.assert_unchanged(before)


def test_the_preflight_passes_the_models_the_packager_makes(serving, tmp_path):
    """The check is not a blanket refusal: real ONNX and TFLite bundles open."""
    tfl = tmp_path / "dense.tflite"
    tfl.write_bytes(make_tflite_dense(seed=2))
    tfl_path, _ = serving.fleet.pack(tfl, name="dense", version=1, to=(DEVICE,))
    for path, feed in (
        (serving.bundle(3, seed=3), {"input": np.zeros((1, 8), np.float32)}),
        (tfl_path, {"input": np.zeros((1, 4), np.float32)}),
    ):
        with _open(serving, path) as opened:
            assert all(np.isfinite(v).all() for v in opened.run(feed).values())
