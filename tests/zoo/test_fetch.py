"""The zoo's fetcher fails loudly: a file that is not the pinned one is never used."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from zoo.models import BY_ID, ZooFetchError, fetch, fetch_dist

pytestmark = pytest.mark.zoo


def test_a_download_that_is_not_the_pinned_file_fails_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESEAL_ZOO_CACHE", str(tmp_path))
    dist = dataclasses.replace(BY_ID["magika"].dist, sha256="0" * 64)
    with pytest.raises(ZooFetchError, match="sha256"):
        fetch_dist(dist)  # downloaded again (nothing cached), then refused
    assert not (tmp_path / "dists" / dist.filename).exists()


def test_a_model_file_that_is_not_the_pinned_one_fails_the_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = BY_ID["magika"]
    real = fetch_dist(model.dist)  # the shared cache, fetched once
    monkeypatch.setenv("EDGESEAL_ZOO_CACHE", str(tmp_path))
    (tmp_path / "dists").mkdir()
    shutil.copy(real, tmp_path / "dists" / real.name)
    with pytest.raises(ZooFetchError, match="sha256"):
        fetch(dataclasses.replace(model, sha256="0" * 64))
    assert fetch(model).read_bytes()[:2] == b"\x08\x07"  # the real one: an ONNX protobuf
