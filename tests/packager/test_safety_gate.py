"""The safety gate refuses models that would hurt the device or leak, before sealing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeseal.core.config import Limits
from edgeseal.packager.safety import UnsafeModelError, check_onnx
from edgeseal.packager.samples import make_onnx_classifier


def _with_external(tmp_path, location: str, *, data: bytes = b"\0" * 512, length: int = 512):
    model = onnx.load_from_string(make_onnx_classifier())
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = w1.external_data.add()
        e.key, e.value = k, v
    (tmp_path / "weights.bin").write_bytes(data)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_a_well_formed_external_data_model_passes_and_loads_its_weights(tmp_path):
    path = _with_external(tmp_path, "weights.bin", data=np.ones(128, np.float32).tobytes())
    model = check_onnx(path)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    assert numpy_helper.to_array(w1).sum() == 128


@pytest.mark.parametrize("location", ["/etc/passwd", "../weights.bin", "sub/../../x.bin"])
def test_external_data_paths_escaping_the_model_folder_are_refused(tmp_path, location):
    with pytest.raises(UnsafeModelError, match="inside the model's folder"):
        check_onnx(_with_external(tmp_path, location))


def test_an_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 512)
    folder = tmp_path / "model"
    folder.mkdir()
    path = _with_external(folder, "link.bin")
    (folder / "link.bin").symlink_to(outside)
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        check_onnx(path)


def test_external_data_past_the_end_of_its_file_is_refused(tmp_path):
    with pytest.raises(UnsafeModelError, match="past the end"):
        check_onnx(_with_external(tmp_path, "weights.bin", data=b"\0" * 100, length=512))


def _model(nodes, opset=13, domain_imports=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", opset),
            *(helper.make_opsetid(d, 1) for d in domain_imports),
        ],
    )
    m.ir_version = 8
    return m


def test_custom_op_domains_are_refused_unless_allowed(tmp_path):
    m = _model(
        [helper.make_node("Evil", ["x"], ["y"], domain="com.example.ops")],
        domain_imports=["com.example.ops"],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UnsafeModelError, match=r"com\.example\.ops"):
        check_onnx(path)
    check_onnx(path, allow_custom_ops=["com.example.ops"])


def test_an_opset_newer_than_devices_load_is_refused(tmp_path):
    path = tmp_path / "new.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], opset=30), str(path))
    with pytest.raises(UnsafeModelError, match="opset 30"):
        check_onnx(path)


def test_a_tensor_declaring_a_huge_size_is_refused(tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["y"])])
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    m.graph.initializer.append(big)
    path = tmp_path / "big.onnx"
    onnx.save(m, str(path))
    with pytest.raises(UnsafeModelError, match=r"over limits\.max_section_bytes"):
        check_onnx(path, limits=Limits())


@pytest.mark.parametrize("name", ["model.pt", "model.pkl", "model.joblib"])
def test_pickle_formats_are_refused_with_a_pointer_to_onnx(fleet, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95junk")
    with pytest.raises(UnsafeModelError, match="export it to ONNX"):
        fleet.pack(path)


def test_a_garbage_file_is_refused_cleanly(fleet, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a model at all")
    with pytest.raises(UnsafeModelError, match="not a readable ONNX model"):
        fleet.pack(path)


def test_a_truncated_tflite_flatbuffer_is_refused(fleet, tflite_model):
    from edgeseal.packager.onnx_model import ModelError

    data = tflite_model.read_bytes()
    tflite_model.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="LiteRT"):
        fleet.pack(tflite_model, name="dense")
