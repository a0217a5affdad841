"""Models as users bring them: every one packs into a bundle the device runs, or pack
refuses it before sealing, with the reason (issue 17). Models are built here with
onnx.helper; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeseal.agent.guard import ServingModel
from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config, RuntimeConfig
from edgeseal.core.golden import check_golden
from edgeseal.packager import pack as pack_module
from edgeseal.packager.devicecheck import DeviceCheckError
from edgeseal.packager.evaluate import GateUsageError, Threshold
from edgeseal.packager.golden import InputSynthesisError
from edgeseal.packager.onnx_model import ModelError, fold_constants
from edgeseal.packager.pack import PackOptions
from edgeseal.packager.quantize import QuantizeMode
from helpers import run

OPSET = 13


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, np.ndarray],
    *,
    opset: int = OPSET,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def conv_with_bias(*, opset: int = OPSET, batch: int | str = "N", hw: int | str = 8) -> bytes:
    """One Conv, 3 -> 64 channels, with a 64-channel bias: what quantize_dynamic wraps in
    a Reshape over the bias initializer."""
    rng = np.random.default_rng(0)
    return _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 64, hw, hw])],
        {
            "W": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
            "B": rng.standard_normal(64).astype(np.float32),
        },
        opset=opset,
    )


def _write(tmp: Path, name: str, model: bytes) -> Path:
    p = tmp / name
    p.write_bytes(model)
    return p


def _device_golden(fleet, bundle: Path, config: Config | None = None) -> list[str]:
    extras = fleet.extras(bundle)
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config or Config()
    ) as model:
        return check_golden(model.run, extras["golden"])


# --- item 1: pack opens what it seals, as the device will -----------------------------


def test_dynamic_int8_conv_with_bias_runs_on_the_device_at_its_default_optimizations(
    fleet, tmp_path
):
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    bundle, _ = fleet.pack(model, options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8))
    for level in ("disable", "basic"):
        config = Config(runtime=RuntimeConfig(graph_optimization=level))
        assert _device_golden(fleet, bundle, config) == []


@pytest.mark.parametrize("mode", [QuantizeMode.DYNAMIC_INT8, QuantizeMode.FP16])
@pytest.mark.parametrize("level", ["extended", "all"])
def test_a_model_packed_for_a_level_above_basic_opens_there_with_weights_in_the_graph(
    fleet, tmp_path, mode, level
):
    """Above basic the optimizers need the weights (fp16 Conv: the CPU provider's casts;
    all: the NCHWc layout): they go into the graph, pack's check passes, and the device
    at that level installs, passes its golden check and says it handed them over so."""
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    runtime = RuntimeConfig(graph_optimization=level)
    bundle, _ = fleet.pack(model, options=PackOptions(quantize=mode), runtime=runtime)
    config = Config(runtime=runtime)
    assert _device_golden(fleet, bundle, config) == []
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
    ) as opened:
        assert "into the graph" in opened.status()["weights_handed_over"]


def test_folding_removes_the_reshape_quantize_dynamic_puts_over_the_bias(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _write(tmp_path, "conv.onnx", conv_with_bias())
    quantize_dynamic(str(src), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert "Reshape" in [n.op_type for n in quantized.graph.node]
    folded, count = fold_constants(quantized)
    assert count >= 1
    assert "Reshape" not in [n.op_type for n in folded.graph.node]
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in folded.graph.node}


def test_without_folding_the_device_check_refuses_and_writes_nothing(fleet, tmp_path, monkeypatch):
    monkeypatch.setattr(pack_module, "fold_constants", lambda m: (m, 0))
    monkeypatch.setattr(pack_module, "optimize_offline", lambda m, _work: m)
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    out = tmp_path / "never.esb"
    with pytest.raises(DeviceCheckError, match="graph_optimization = 'basic'"):
        fleet.pack(model, out=out, options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8))
    assert not out.exists()


# --- item 5: nothing written outside -o ------------------------------------------------


@pytest.mark.parametrize("mode", list(QuantizeMode))
def test_pack_in_an_empty_directory_leaves_only_the_bundle(fleet, tmp_path, monkeypatch, mode):
    model = _write(tmp_path, "conv.onnx", conv_with_bias(hw="H"))
    np.savez(
        tmp_path / "calib.npz",
        x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32),
    )
    work, temp = tmp_path / "empty", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    fleet.pack(
        model,
        out=work / "m.esb",
        options=PackOptions(quantize=mode, calibration=tmp_path / "calib.npz"),
    )
    assert [p.name for p in work.iterdir()] == ["m.esb"]
    assert list(temp.iterdir()) == []


def test_what_incomplete_shape_inference_writes_stays_in_the_private_folder(
    fleet, tmp_path, monkeypatch
):
    """ONNX Runtime's symbolic shape inference, when it cannot infer every shape, saves
    ``sym_shape_infer_temp.onnx`` with its weights in ``<uuid>.data`` into the current
    directory before it raises (its code, run here on a model it can infer)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def incomplete(in_mp, *args, **kwargs):
        onnx.save_model(in_mp, "sym_shape_infer_temp.onnx", save_as_external_data=True)
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(incomplete))
    model = _write(tmp_path, "conv.onnx", conv_with_bias(hw="H"))
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    fleet.pack(model, out=work / "m.esb", options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8))
    assert [p.name for p in work.iterdir()] == ["m.esb"]


# --- items 2-4: no exit 3 for ordinary model problems --------------------------------


def stateful_model() -> bytes:
    """A voice-activity-like model: audio [N, 16], a state [2, N, 8] whose fixed dim is
    not the batch, a scalar int64 sample rate used as an index (only 16000 and 16001
    are valid), and symbolic window dims that must be at least 3 long."""
    rng = np.random.default_rng(3)
    return _model(
        [
            helper.make_node("Sub", ["sr", "base"], ["idx"]),
            helper.make_node("Gather", ["table", "idx"], ["gain"]),
            helper.make_node("Mul", ["audio", "gain"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "W"], ["h"]),
            helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
            helper.make_node("Add", ["h", "s"], ["out"]),
            helper.make_node("Identity", ["state"], ["state_out"]),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "N", 8]),
        ],
        {
            "base": np.array(16000, np.int64),
            "table": np.array([1.0, 0.5], np.float32),
            "W": rng.standard_normal((16, 8)).astype(np.float32),
            "axes0": np.array([0], np.int64),
        },
    )


def test_a_scalar_input_no_synthetic_value_fits_is_refused_naming_it_and_asking_for_samples(
    fleet, tmp_path
):
    model = _write(tmp_path, "vad.onnx", stateful_model())
    with pytest.raises(InputSynthesisError, match="sr") as e:
        fleet.pack(model)
    assert "--sample-inputs" in e.value.diagnostics()


def test_sample_inputs_pack_a_model_with_a_scalar_and_a_state_input(fleet, tmp_path):
    model = _write(tmp_path, "vad.onnx", stateful_model())
    rng = np.random.default_rng(4)
    np.savez(
        tmp_path / "samples.npz",
        audio=rng.standard_normal((6, 16)).astype(np.float32),
        state=rng.standard_normal((2, 6, 8)).astype(np.float32),
        sr=np.array(16000, np.int64),
    )
    bundle, result = fleet.pack(model, options=PackOptions(sample_inputs=tmp_path / "samples.npz"))
    assert result.golden_vectors == 6
    golden = fleet.extras(bundle)["golden"]["inputs"]  # small: kept verbatim
    assert golden["state"]["values"][0]["shape"] == [2, 1, 8]
    assert golden["sr"]["values"][0]["shape"] == []
    opened = open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=Config()
    )
    serving = ServingModel.start(opened, Config().agent)  # refuses unless golden passes
    try:
        feed = {
            "audio": rng.standard_normal((3, 16)).astype(np.float32),
            "state": rng.standard_normal((2, 3, 8)).astype(np.float32),
            "sr": np.array(16001, np.int64),
        }
        result_ = serving.infer(feed)
        assert result_.outputs["out"].shape == (3, 8) and len(result_.ood) == 3
        # The scalar first: rows are still counted on the batch axis of the others.
        serving.infer({"sr": feed["sr"], "audio": feed["audio"], "state": feed["state"]})
        assert serving.counters.rows == 6
    finally:
        serving.close()


def windowed_model(batch: int | str = "N") -> bytes:
    """An image model with symbolic height and width that must be at least 3 (a 3x3
    convolution without padding) and a scalar float gain: synthesized inputs of 1x1
    fail in ONNX Runtime."""
    rng = np.random.default_rng(5)
    return _model(
        [
            helper.make_node("Conv", ["img", "W"], ["c"]),
            helper.make_node("Mul", ["c", "gain"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [batch, 3, "H", "W_"]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, "h", "w"])],
        {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
    )


@pytest.mark.parametrize("mode", [QuantizeMode.NONE, QuantizeMode.DYNAMIC_INT8])
def test_synthesized_inputs_fit_symbolic_spatial_dims_and_scalars(fleet, tmp_path, mode):
    model = _write(tmp_path, "win.onnx", windowed_model())
    bundle, result = fleet.pack(model, options=PackOptions(quantize=mode))
    assert _device_golden(fleet, bundle) == []
    if result.report is not None:
        assert result.report.data_source == "synthetic inputs"
        assert result.report.metric == "output error only"


def test_a_symbolic_dim_the_weights_fix_is_derived_from_them(fleet, tmp_path):
    """x is declared [N, 'features']; the MatMul weight [80, 4] makes features 80, a
    size no fixed list of guesses holds."""
    rng = np.random.default_rng(12)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "features"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"W": rng.standard_normal((80, 4)).astype(np.float32)},
    )
    bundle, _ = fleet.pack(_write(tmp_path, "mlp.onnx", model))
    assert fleet.extras(bundle)["golden"]["inputs"]["x"]["values"][0]["shape"] == [1, 80]
    assert _device_golden(fleet, bundle) == []


def test_static_int8_calibrates_a_fixed_batch_1_model_one_row_per_feed(fleet, tmp_path):
    model = _write(tmp_path, "conv1.onnx", conv_with_bias(batch=1))
    x = np.random.default_rng(6).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    bundle, result = fleet.pack(
        model,
        options=PackOptions(quantize=QuantizeMode.STATIC_INT8, calibration=tmp_path / "calib.npz"),
    )
    assert result.report is not None and result.report.rows == 5
    assert _device_golden(fleet, bundle) == []


def test_static_int8_on_opset_11_converts_it_for_per_channel_weights_and_says_so(fleet, tmp_path):
    model = _write(tmp_path, "conv11.onnx", conv_with_bias(opset=11))
    x = np.random.default_rng(7).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    bundle, result = fleet.pack(
        model,
        options=PackOptions(quantize=QuantizeMode.STATIC_INT8, calibration=tmp_path / "calib.npz"),
    )
    assert any("opset 11 converted to 13" in n for n in result.report.notes)
    assert _device_golden(fleet, bundle) == []


def test_fp16_on_an_already_int8_model_is_refused_naming_why(fleet, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _write(tmp_path, "conv.onnx", conv_with_bias())
    quantize_dynamic(str(src), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    with pytest.raises(ModelError, match="already quantized to int8"):
        fleet.pack(tmp_path / "int8.onnx", options=PackOptions(quantize=QuantizeMode.FP16))


def test_a_model_the_quantizer_takes_only_folded_is_quantized_folded_and_says_so(
    fleet, tmp_path, monkeypatch
):
    """Weights behind an Identity: a quantizer that insists on initializers (as ONNX
    Runtime's does for some graphs: "Expected W to be an initializer") gets the model with
    its constant subgraphs folded, after pre-processing and the model as given failed."""
    from onnxruntime import quantization
    from onnxruntime.quantization import shape_inference

    real = quantization.quantize_dynamic

    def strict(model_input, *args, **kwargs):
        if "Identity" in {n.op_type for n in onnx.load(str(model_input)).graph.node}:
            raise ValueError("Expected W to be an initializer")
        return real(model_input, *args, **kwargs)

    def cannot_infer(*args, **kwargs):
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(quantization, "quantize_dynamic", strict)
    monkeypatch.setattr(shape_inference, "quant_pre_process", cannot_infer)
    rng = np.random.default_rng(11)
    model = _model(
        [
            helper.make_node("Identity", ["W0"], ["W"]),
            helper.make_node("Conv", ["x", "W"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 6, 6])],
        {"W0": rng.standard_normal((16, 3, 3, 3)).astype(np.float32)},
    )
    bundle, result = fleet.pack(
        _write(tmp_path, "idw.onnx", model),
        options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8),
    )
    assert any("constant subgraphs folded first" in n for n in result.report.notes)
    assert _device_golden(fleet, bundle) == []


def test_a_third_party_failure_during_pack_is_a_model_error_naming_the_stage(
    fleet, tmp_path, monkeypatch
):
    def broken(*args, **kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(pack_module, "make_golden", broken)
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    with pytest.raises(ModelError, match="making golden vectors: IndexError"):
        fleet.pack(model)


# --- item 6: an honest gate -------------------------------------------------------------


def test_a_top1_bound_on_outputs_without_classes_is_a_usage_error(fleet, tmp_path):
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    x = np.random.default_rng(8).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    opts = PackOptions(
        quantize=QuantizeMode.DYNAMIC_INT8,
        evaluation=tmp_path / "eval.npz",
        max_accuracy_drop=Threshold.parse("0.001%"),
    )
    with pytest.raises(GateUsageError, match="abs=") as e:
        fleet.pack(model, options=opts)
    assert isinstance(e.value, ValueError)  # the CLI's usage error, exit 2


def test_a_bound_without_real_data_is_a_usage_error_before_quantizing(fleet, tmp_path):
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    opts = PackOptions(
        quantize=QuantizeMode.DYNAMIC_INT8, max_accuracy_drop=Threshold.parse("abs=0.5")
    )
    with pytest.raises(GateUsageError, match="needs real data"):
        fleet.pack(model, options=opts)


def test_the_report_says_user_data_and_the_error_bound_it_checked(fleet, tmp_path):
    model = _write(tmp_path, "conv.onnx", conv_with_bias())
    x = np.random.default_rng(9).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    opts = PackOptions(
        quantize=QuantizeMode.DYNAMIC_INT8,
        evaluation=tmp_path / "eval.npz",
        max_accuracy_drop=Threshold.parse("abs=10"),
    )
    _, result = fleet.pack(model, options=opts)
    assert result.report.data_source == "user data" and result.report.rows == 8
    assert result.report.metric == "output error only"


# --- item 8: real output shapes ------------------------------------------------------


def test_output_shapes_are_recorded_from_running_the_model_not_its_declaration(fleet, tmp_path):
    """Declared [1, 'seqlen']; the model returns (3, N, 5)."""
    model = _model(
        [
            helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
            helper.make_node("Tile", ["u", "reps"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])],
        {"axes": np.array([0], np.int64), "reps": np.array([3, 1, 1], np.int64)},
    )
    bundle, result = fleet.pack(_write(tmp_path, "seq.onnx", model))
    (spec,) = result.manifest.outputs
    assert spec.shape == (3, "N", 5)
    assert _device_golden(fleet, bundle) == []


# --- the command: exit 1 with the reason, 2 for a bound it cannot check, never 3 -------


def test_the_command_refuses_with_exit_1_or_2_and_says_why(tmp_path):
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--models", "*", "--no-passphrase", env=env)
    run(
        "agent",
        "provision",
        "--home",
        str(tmp_path / "dev"),
        "--root",
        str(tmp_path / "keys/root.pub"),
        "--device-id",
        "cam-01",
        env=env,
    )
    run("keys", "add-device", "cam-01", str(tmp_path / "dev/device.pub.json"), env=env)
    base = ["--version", "1", "--signer", "release", "--to", "cam-01"]
    vad = _write(tmp_path, "vad.onnx", stateful_model())
    refused = run(
        "pack", str(vad), "--name", "vad", *base, "-o", str(tmp_path / "x.esb"), env=env, check=1
    )
    assert "sr" in refused.stderr and "--sample-inputs" in refused.stderr
    conv = _write(tmp_path, "conv.onnx", conv_with_bias())
    x = np.random.default_rng(10).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    bound = [*base, "--quantize", "dynamic-int8", "--eval", str(tmp_path / "eval.npz")]
    usage = run(
        "pack",
        str(conv),
        "--name",
        "c",
        *bound,
        "--max-accuracy-drop",
        "1%",
        "-o",
        str(tmp_path / "never.esb"),
        env=env,
        check=2,
    )
    assert "abs=" in usage.stderr
    ok = run(
        "pack",
        str(conv),
        "--name",
        "c",
        *bound,
        "--max-accuracy-drop",
        "abs=10",
        "-o",
        str(tmp_path / "c.esb"),
        env=env,
    )
    assert "8 rows of user data" in ok.stdout and "gate passed" in ok.stdout
    assert not (tmp_path / "x.esb").exists() and not (tmp_path / "never.esb").exists()


def test_batch_layout_finds_the_batch_axis_of_each_input():
    from edgeseal.core.manifest import TensorSpec
    from edgeseal.packager.datasets import batch_layout

    free = batch_layout(
        (
            TensorSpec("state", "float32", (2, "batch", 128)),
            TensorSpec("audio", "float32", ("batch", 512)),
            TensorSpec("sr", "int64", ()),
        )
    )
    assert dict(free.axes) == {"state": 1, "audio": 0, "sr": None}
    assert (free.name, free.fixed) == ("batch", None)
    fixed = batch_layout(
        (
            TensorSpec("state", "float32", (2, 1, 128)),
            TensorSpec("audio", "float32", (1, 512)),
            TensorSpec("sr", "int64", ()),
        )
    )
    assert dict(fixed.axes) == {"state": None, "audio": 0, "sr": None}
    assert fixed.fixed == 1
