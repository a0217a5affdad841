"""Checking golden vectors: the sealed inputs whose outputs a model must reproduce.

The packager makes them (``edgeseal.packager.golden``); the agent runs them on load and
on a schedule while serving. A corrupted or swapped model, a broken runtime or a faulty
accelerator shows up as an output outside its tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.extras import array_from_obj

__all__ = ["check_golden", "numeric_outputs"]


def numeric_outputs(outputs: Mapping[str, Any]) -> dict[str, npt.NDArray[Any]]:
    """Only numeric tensor outputs are checked (ZipMap's sequences of maps are not)."""
    return {
        k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
    }


def _error(have: Any, want_obj: Any) -> float:
    want = array_from_obj(want_obj).astype(np.float64)
    have = np.asarray(have if have is not None else np.empty(0), dtype=np.float64)
    return float(np.abs(have - want).max(initial=0.0)) if have.shape == want.shape else float("inf")


def _problems(
    got: list[dict[str, npt.NDArray[Any]]],
    expected: list[Mapping[str, Any]],
    tolerances: Mapping[str, Any],
    label: str = "",
) -> list[str]:
    problems = []
    for i, (outputs, want) in enumerate(zip(got, expected, strict=True)):
        for name, obj in want.items():
            err = _error(outputs.get(name), obj)
            atol = tolerances[name]["atol"]
            if not err <= atol:
                problems.append(
                    f"golden vector {i}, output {name}{label}: error {err:.3g} > {atol:.3g}"
                )
    return problems


def check_golden(
    run: Callable[[dict[str, npt.NDArray[Any]]], Mapping[str, Any]], golden: Mapping[str, Any]
) -> list[str]:
    """Run each golden input through ``run(feed) -> {name: array}``; the mismatches.

    Golden data of int8 models may hold, besides ``outputs`` and ``tolerances``, one
    expectation per int8 kernel family (``expected_by_kernel`` in each vector, and
    ``kernel_tolerances``). Then the outputs pass when they match one family's expected
    outputs within that family's tolerances on every vector and output: a device runs one
    family's kernels, so answers that mix families across vectors are refused. Without
    per-family data, ``outputs`` within ``tolerances``."""
    vectors = golden["vectors"]
    got = [
        numeric_outputs(run({k: array_from_obj(v) for k, v in vector["inputs"].items()}))
        for vector in vectors
    ]
    kernel_tolerances: Mapping[str, Any] = golden.get("kernel_tolerances") or {}
    kernels = [
        kernel
        for kernel in kernel_tolerances
        if all(kernel in v.get("expected_by_kernel", {}) for v in vectors)
    ]
    if not kernels:
        return _problems(got, [v["outputs"] for v in vectors], golden["tolerances"])
    by_kernel = {
        kernel: _problems(
            got,
            [v["expected_by_kernel"][kernel] for v in vectors],
            kernel_tolerances[kernel],
            f" ({kernel} int8 kernels)",
        )
        for kernel in kernels
    }
    if any(not p for p in by_kernel.values()):
        return []
    return [p for kernel in kernels for p in by_kernel[kernel]]
