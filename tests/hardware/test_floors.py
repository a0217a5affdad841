"""Version floors: only ever rise; the TPM's survive a restart and refuse lower versions."""

from __future__ import annotations

import pytest

from edgeseal.core.errors import RollbackError
from edgeseal.hardware.floors import FileFloors, TpmFloors


def test_file_floor_only_rises_and_survives_reopening(tmp_path):
    floors = FileFloors(tmp_path / "floors.json")
    assert floors.get("det") == 0
    assert floors.raise_to("det", 3) == 3
    assert floors.raise_to("det", 2) == 3
    assert FileFloors(tmp_path / "floors.json").get("det") == 3
    assert (tmp_path / "floors.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.tpm
def test_tpm_floor_rises_survives_a_restart_and_refuses_a_lower_version(swtpm, fleet, onnx_model):
    floors = TpmFloors(swtpm.tcti)
    name = "floor-model"
    assert floors.get(name) == 0
    assert floors.raise_to(name, 2) == 2
    assert floors.raise_to(name, 1) == 2
    swtpm.restart()
    assert TpmFloors(swtpm.tcti).get(name) == 2
    bundle, _ = fleet.pack(onnx_model, name=name, version=1)
    from edgeseal.core.reader import BundleFile

    with BundleFile.open(bundle) as bf, pytest.raises(RollbackError):
        bf.verify(fleet.policy(floor=TpmFloors(swtpm.tcti).get(name)))


@pytest.mark.tpm
def test_tpm_floor_refuses_a_fast_forward(swtpm):
    floors = TpmFloors(swtpm.tcti, max_step=10)
    floors.raise_to("ff-model", 5)
    with pytest.raises(RollbackError, match="fast-forward"):
        floors.raise_to("ff-model", 100)
    assert floors.get("ff-model") == 5


@pytest.mark.tpm
def test_tpm_floors_of_different_models_are_independent(swtpm):
    floors = TpmFloors(swtpm.tcti)
    floors.raise_to("model-a", 4)
    floors.raise_to("model-b", 1)
    assert (floors.get("model-a"), floors.get("model-b")) == (4, 1)
