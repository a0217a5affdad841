"""No plaintext model reaches the disk during an OTA update: a model with a distinctive
run of weight bytes is offered, downloaded in chunks, verified, staged, opened, checked
and committed by a device against a real broker, then serves; no file written meanwhile
holds the run (fanotify where permitted, and a before/after scan of every file new or
changed under the device's home, the temp dirs, /dev/shm and the working dir)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from agent.test_plaintext import (
    _file_contains,
    _marker_model,
    _snapshot,
    _watch_writes,
)
from edgeseal.packager.pack import pack_model
from helpers import NOW
from ota_world import wait_for

pytestmark = pytest.mark.mqtt


def test_an_ota_update_leaves_no_plaintext_model_on_disk(ws, fleet_side, device, tmp_path):
    model = _marker_model(tmp_path / "source", "onnx")
    signer, cert = ws.ring.load_signer("release")
    bundle = tmp_path / "marker.esb"
    pack_model(
        model.path, bundle, name="clf-marker", version=1, signer=signer, certificate=cert,
        devices=[ws.ring.device("dev-a")], now=NOW,
    )  # fmt: skip
    model.path.unlink()
    ws.bundles["marker-v1"] = bundle
    dev = device()
    home = dev.agent.home.path
    candidates = [home, tmp_path, Path(tempfile.gettempdir()), Path("/tmp"), Path("/dev/shm")]
    roots = sorted({p.resolve() for p in [*candidates, Path.cwd()] if p.is_dir()})
    before = _snapshot(roots)
    with _watch_writes(roots, model.marker) as watch:
        fleet_side.offer("marker-v1")
        wait_for(lambda: "clf-marker" in dev.agent.serving, what="the marker model committed")
        for _ in range(10):
            result = dev.agent.infer("clf-marker", {"input": model.x})
            if watch:
                watch.drain()
    (output,) = result.outputs.values()
    np.testing.assert_allclose(output, model.expected, rtol=1e-4, atol=1e-4)
    after = _snapshot(roots)
    changed = sorted(p for p, ident in after.items() if before.get(p) != ident)
    assert any("slot-" in p for p in changed), "the update wrote no slot: nothing was tested"
    found = [p for p in changed if _file_contains(Path(p), model.marker)]
    assert found == []
    if watch:
        assert not watch.overflowed, "fanotify lost events"
        assert sorted(watch.holding_marker) == []
