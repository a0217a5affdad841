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


def check_golden(
    run: Callable[[dict[str, npt.NDArray[Any]]], Mapping[str, Any]], golden: Mapping[str, Any]
) -> list[str]:
    """Run each golden input through ``run(feed) -> {name: array}``; the mismatches."""
    problems = []
    tolerances = golden["tolerances"]
    for i, vector in enumerate(golden["vectors"]):
        feed = {k: array_from_obj(v) for k, v in vector["inputs"].items()}
        got = numeric_outputs(run(feed))
        for name, obj in vector["outputs"].items():
            want = array_from_obj(obj).astype(np.float64)
            have = np.asarray(got.get(name, np.empty(0)), dtype=np.float64)
            err = (
                float(np.abs(have - want).max(initial=0.0))
                if have.shape == want.shape
                else float("inf")
            )
            if not err <= tolerances[name]["atol"]:
                problems.append(
                    f"golden vector {i}, output {name}: error {err:.3g} > "
                    f"{tolerances[name]['atol']:.3g}"
                )
    return problems
