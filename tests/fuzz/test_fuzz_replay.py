"""Every seed and every fuzz finding kept as a regression case, replayed on each test run
(SQLite's "fuzzcheck"): each input either passes or raises an edgeseal error, within a
time and memory budget. Fast: the whole replay takes a few seconds."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from fuzz.targets import (
    KNOWN_FINDINGS,
    REGRESSIONS,
    TARGETS,
    UNFIXED,
    corpus_files,
    prepare,
    run_one,
    world,
)

CASES = [(t, p) for t in TARGETS for p in corpus_files(t)]


def _id(case: tuple[str, Path]) -> str:
    target, path = case
    return f"{target}/{path.parent.parent.name}/{path.name}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_replay(case, request):
    target, path = case
    data = path.read_bytes()
    if path.parent.parent == REGRESSIONS and path.name.startswith(UNFIXED):
        request.applymarker(
            pytest.mark.xfail(
                raises=KNOWN_FINDINGS[target], strict=True, reason=f"unfixed finding {path.name}"
            )
        )
    prepare(target)
    tracemalloc.start()
    start = time.monotonic()
    try:
        result = run_one(target, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 5, f"{path.name} took too long"
    assert peak < 64 * 1024**2 + 64 * len(data), f"{path.name} allocated {peak} bytes"
    if path.name.startswith("valid"):
        assert result == "ok", f"the seed {path.name} no longer reaches the end of {target}"


def test_every_target_has_a_corpus():
    for target in TARGETS:
        assert corpus_files(target, regressions=False), f"no seeds for {target}"


def test_the_sample_bundle_is_the_one_the_targets_verify():
    """The checked-in seed bundle verifies with the fixed test keys, so the targets start
    deep (make_corpus.py rewrites it when the format changes)."""
    w = world()
    assert w.verified.manifest.model_name == "fuzz-model"
    assert w.verified.anchor.version == 2  # the rotation in its trust block was followed
    assert w.verified.revocations is not None
