"""The packager end to end: quantize, prove accuracy held, seal what the device checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeseal.agent.opener import open_bundle
from edgeseal.core.config import Config
from edgeseal.core.extras import sbom_digest
from edgeseal.core.golden import check_golden
from edgeseal.packager.evaluate import AccuracyDropError, Threshold
from edgeseal.packager.golden import onnx_runners
from edgeseal.packager.pack import PackOptions
from edgeseal.packager.quantize import CalibrationMethod, QuantizeMode
from edgeseal.packager.samples import make_onnx_cnn, make_trained_classifier
from helpers import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    model, ds = make_trained_classifier(seed=1, hidden=512)
    (d / "mlp.onnx").write_bytes(model)
    np.savez(d / "calib.npz", input=ds.x_train[:200], labels=ds.y_train[:200])
    np.savez(d / "eval.npz", input=ds.x_test, labels=ds.y_test)
    return d


@pytest.mark.parametrize(
    "mode", [QuantizeMode.DYNAMIC_INT8, QuantizeMode.STATIC_INT8, QuantizeMode.FP16]
)
def test_each_quantization_mode_packs_opens_and_keeps_accuracy(fleet, trained, mode):
    opts = PackOptions(
        quantize=mode,
        calibration=trained / "calib.npz",
        evaluation=trained / "eval.npz",
        max_accuracy_drop=Threshold.parse("2%"),
    )
    bundle, result = fleet.pack(trained / "mlp.onnx", options=opts)
    report = result.report
    assert report is not None and report.mode == mode.value
    assert report.accuracy_before > 0.95 and report.top1_drop <= 0.02
    assert report.size_after < 0.7 * report.size_before
    assert result.manifest.quantization["mode"] == mode.value
    extras = fleet.extras(bundle)
    assert len(extras["golden"]["vectors"]) == 8
    assert extras["provenance"]["settings"]["quantize"] == mode.value
    assert sbom_digest(extras["sbom"]) == result.manifest.sbom_digest
    x = np.load(trained / "eval.npz")["input"][:16]
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=Config()
    ) as model:
        assert check_golden(model.run, extras["golden"]) == []
        probs = model.run({"input": x})["probs"]
    assert (probs.argmax(axis=1) == np.load(trained / "eval.npz")["labels"][:16]).mean() > 0.9


def test_static_int8_quantizes_a_cnn_with_each_calibration_method(fleet, tmp_path):
    (tmp_path / "cnn.onnx").write_bytes(make_onnx_cnn(seed=2))
    images = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=images)
    for method in CalibrationMethod:
        opts = PackOptions(
            quantize=QuantizeMode.STATIC_INT8, calibration=tmp_path / "calib.npz", method=method
        )
        bundle, result = fleet.pack(tmp_path / "cnn.onnx", name=f"cnn-{method.value}", options=opts)
        assert result.report.top1_agreement is not None
        assert result.report.outputs[0].cosine > 0.95
        with open_bundle(
            bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=Config()
        ) as model:
            assert model.run({"image": images[:2]})["probs"].shape == (2, 3)


def test_the_gate_refuses_a_model_that_quantization_breaks(fleet, tmp_path):
    model, ds = make_trained_classifier(seed=3, outlier=1000.0)
    (tmp_path / "fragile.onnx").write_bytes(model)
    np.savez(tmp_path / "eval.npz", input=ds.x_test, labels=ds.y_test)
    opts = PackOptions(
        quantize=QuantizeMode.DYNAMIC_INT8,
        evaluation=tmp_path / "eval.npz",
        max_accuracy_drop=Threshold.parse("1%"),
    )
    out = tmp_path / "fragile.esb"
    with pytest.raises(AccuracyDropError, match="top-1 dropped") as err:
        fleet.pack(tmp_path / "fragile.onnx", out=out, options=opts)
    assert err.value.report.accuracy_before > 0.95
    assert err.value.report.accuracy_after < 0.8
    assert not out.exists()
    # Accepted on purpose: sealed, and the failure is on record.
    accepted = PackOptions(**{**opts.__dict__, "accept_accuracy_drop": True})
    bundle, result = fleet.pack(tmp_path / "fragile.onnx", out=out, options=accepted)
    assert result.gate_failures and "top-1" in result.gate_failures[0]
    assert fleet.extras(bundle)["provenance"]["settings"]["accepted_failures"]


def test_the_cli_prints_the_report_and_exits_1_when_the_gate_fails(tmp_path):
    env = {**os.environ, "EDGESEAL_KEYS": str(tmp_path / "keys"), "COLUMNS": "200"}
    run("keys", "init-root", "--no-passphrase", env=env)
    run("keys", "new-signer", "release", "--no-passphrase", env=env)
    model, ds = make_trained_classifier(seed=3, outlier=1000.0)
    (tmp_path / "m.onnx").write_bytes(model)
    np.savez(tmp_path / "eval.npz", input=ds.x_test, labels=ds.y_test)
    proc = run(
        "pack",
        str(tmp_path / "m.onnx"),
        "--name",
        "m",
        "--version",
        "1",
        "--signer",
        "release",
        "--quantize",
        "dynamic-int8",
        "--eval",
        str(tmp_path / "eval.npz"),
        "--max-accuracy-drop",
        "1%",
        "--dry-run",
        "--json",
        "-o",
        str(tmp_path / "m.esb"),
        env=env,
        check=1,
    )
    report = json.loads(proc.stdout)
    assert report["error"] == "AccuracyDropError" and report["report"]["top1_drop"] > 0.01
    dry = run(
        "pack",
        str(tmp_path / "m.onnx"),
        "--name",
        "m",
        "--version",
        "1",
        "--signer",
        "release",
        "--quantize",
        "dynamic-int8",
        "--eval",
        str(tmp_path / "eval.npz"),
        "--dry-run",
        "-o",
        str(tmp_path / "m.esb"),
        env=env,
    )
    assert "accuracy report" in dry.stdout and "dry run" in dry.stdout
    assert not (tmp_path / "m.esb").exists()


def test_golden_tolerances_are_tight_and_loose_enough(trained, tmp_path):
    """The model passes its own vectors under other settings; a model trained with another
    seed fails them, and so does one changed weight."""
    from edgeseal.packager.datasets import load_inputs
    from edgeseal.packager.golden import make_golden
    from edgeseal.packager.onnx_model import onnx_io

    model_path = trained / "mlp.onnx"
    inputs, _ = onnx_io(onnx.load(str(model_path)))
    data = load_inputs(trained / "eval.npz", inputs)
    reference, variants = onnx_runners(model_path)
    golden = make_golden(reference, variants, data, mode="none")
    for runner in (reference, *variants):
        assert check_golden(runner, golden) == []

    other, _ = make_trained_classifier(seed=2)
    (tmp_path / "other.onnx").write_bytes(other)
    assert check_golden(onnx_runners(tmp_path / "other.onnx")[0], golden)

    m = onnx.load(str(model_path))
    w1 = next(t for t in m.graph.initializer if t.name == "W1")
    arr = numpy_helper.to_array(w1).copy()
    i = np.unravel_index(np.abs(arr).argmax(), arr.shape)
    arr[i] *= 1.05  # one weight, five per cent
    w1.CopyFrom(numpy_helper.from_array(arr, "W1"))
    onnx.save(m, str(tmp_path / "tweaked.onnx"))
    assert check_golden(onnx_runners(tmp_path / "tweaked.onnx")[0], golden)


def test_the_input_profile_describes_the_calibration_data(fleet, trained):
    opts = PackOptions(calibration=trained / "calib.npz")
    bundle, _ = fleet.pack(trained / "mlp.onnx", options=opts)
    profile = fleet.extras(bundle)["profile"]["inputs"]["input"]
    x = np.load(trained / "calib.npz")["input"]
    assert profile["dtype"] == "float32" and profile["shape"] == [16]
    np.testing.assert_allclose(profile["mean"], x.mean(axis=0), rtol=1e-5)
    assert profile["min"] == pytest.approx(float(x.min()))


def test_a_pretrained_model_from_a_wheel_packs_and_opens(fleet):
    """onnxruntime ships logreg_iris.onnx (ai.onnx.ml ops, a fixed batch of 3, a ZipMap)."""
    import onnxruntime.datasets

    src = Path(onnxruntime.datasets.__file__).parent / "logreg_iris.onnx"
    bundle, _ = fleet.pack(src, name="logreg-iris")
    extras = fleet.extras(bundle)
    assert set(extras["golden"]["tolerances"]) == {"label"}
    x = np.array([[5.1, 3.5], [6.2, 2.9], [7.7, 3.0]], np.float32)
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=Config()
    ) as model:
        assert check_golden(model.run, extras["golden"]) == []
        assert model.run({"float_input": x})["label"].shape == (3,)


def test_tflite_is_packed_with_its_tensor_types_and_golden_vectors(fleet, tflite_model):
    bundle, result = fleet.pack(tflite_model, name="dense")
    assert result.tensor_types == {"float32": 4}
    assert len(fleet.extras(bundle)["golden"]["vectors"]) == 8
    with pytest.raises(Exception, match="TensorFlow"):
        fleet.pack(
            tflite_model, name="dense", options=PackOptions(quantize=QuantizeMode.DYNAMIC_INT8)
        )
