"""Pack a model, open it in memory on a device, run inference: the first end-to-end path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeseal.agent.opener import open_bundle
from edgeseal.core.errors import NotARecipientError
from edgeseal.core.targets import get_target
from edgeseal.packager.samples import reference_onnx_classifier, reference_tflite_dense


def test_onnx_bundle_opens_in_memory_and_matches_the_reference(fleet, onnx_model, config):
    bundle, result = fleet.pack(onnx_model)
    assert result.manifest.model_format == "onnx"
    assert {s.name for s in result.manifest.sections} == {"graph", "weights", "extras"}
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
    ) as model:
        out = model.run({"input": x})["probs"]
        status = model.status()
    np.testing.assert_allclose(out, reference_onnx_classifier(x, seed=1), rtol=1e-5, atol=1e-6)
    assert status["hardware_backed"] is False
    assert all(m["locked"] for m in status["memory"].values())


def test_onnx_graph_section_carries_no_weight_bytes(fleet, onnx_model):
    _, result = fleet.pack(onnx_model)
    graph = next(s for s in result.manifest.sections if s.name == "graph")
    weights = next(s for s in result.manifest.sections if s.name == "weights")
    assert weights.plaintext_size > 8 * 16 * 4  # W1 alone
    assert graph.plaintext_size < weights.plaintext_size


def test_tflite_bundle_opens_in_litert_and_matches_the_reference(fleet, tflite_model, config):
    bundle, result = fleet.pack(tflite_model, name="dense")
    assert result.manifest.model_format == "tflite"
    assert result.manifest.target.runtime == "litert"
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
    ) as model:
        out = model.run({"input": x})["output"]
    np.testing.assert_allclose(out, reference_tflite_dense(x, seed=2), rtol=1e-5, atol=1e-6)


def test_every_recipient_opens_and_others_are_refused(fleet, onnx_model, config):
    bundle, _ = fleet.pack(onnx_model, to=("dev-a", "dev-b"))
    for dev in ("dev-a", "dev-b"):
        with open_bundle(
            bundle, key_store=fleet.devices[dev], policy=fleet.policy(), config=config
        ) as model:
            assert model.manifest.recipient_for(fleet.devices[dev].key_id) is not None
    only_a, _ = fleet.pack(onnx_model, to=("dev-a",))
    with pytest.raises(NotARecipientError):
        open_bundle(only_a, key_store=fleet.devices["dev-b"], policy=fleet.policy(), config=config)


def test_rpi4_target_uses_chacha20_and_still_opens(fleet, onnx_model, config):
    bundle, result = fleet.pack(onnx_model, target=get_target("rpi4"))
    assert result.manifest.cipher == "ChaCha20-Poly1305"
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
    ) as model:
        assert model.run({"input": np.zeros((1, 8), np.float32)})["probs"].shape == (1, 4)


def test_small_chunks_span_many_chunks_and_still_open(fleet, onnx_model, config):
    bundle, result = fleet.pack(onnx_model, chunk_size=64)
    weights = result.manifest.section("weights")
    assert weights is not None and len(weights.chunks) > 10
    with open_bundle(
        bundle, key_store=fleet.devices["dev-a"], policy=fleet.policy(), config=config
    ) as model:
        assert model.run({"input": np.ones((1, 8), np.float32)})["probs"].sum() == pytest.approx(1)


def test_bundle_file_contains_no_plaintext_weights(fleet, onnx_model):
    import onnx
    from onnx import numpy_helper

    bundle, _ = fleet.pack(onnx_model)
    data = Path(bundle).read_bytes()
    for init in onnx.load(str(onnx_model)).graph.initializer:
        raw = numpy_helper.to_array(init).tobytes()
        if len(raw) >= 32:
            assert raw[:32] not in data
