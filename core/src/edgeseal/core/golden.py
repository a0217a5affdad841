"""Checking golden vectors: the inputs whose outputs a model must reproduce. Stable API.

The packager makes them (``edgeseal.packager.golden``); the agent runs them on load and
on a schedule while serving. A corrupted or swapped model, a broken runtime or a faulty
accelerator shows up as an output outside its tolerance.

Two formats (docs/packager.md, "golden"; docs/bundle-format.md):

- format 1 (no ``format`` field): every vector holds its full ``inputs`` and ``outputs``.
- format 2 (``"format": 2``): compact. An input is either kept verbatim per vector or
  described by how to draw it (:func:`draw_input`) from the golden ``seed``; an output
  holds its full shape and the values at a seeded sample of its elements
  (:func:`sample_indices`). Packer and device derive the same arrays and indices from
  the seed: both only use the raw 64-bit stream of PCG64 (stable across platforms and
  numpy versions) and integer or correctly rounded float arithmetic on it.

Everything here is pure: dictionaries and arrays in, arrays and problem lists out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.errors import MalformedBundleError
from edgeseal.core.extras import array_from_obj

__all__ = [
    "FORMAT",
    "Expected",
    "GoldenVector",
    "check_golden",
    "draw_input",
    "golden_vectors",
    "numeric_outputs",
    "sample_indices",
]

#: The compact golden format this module writes (the packager) and reads besides format 1.
FORMAT = 2
#: Largest element count of one input drawn on the device (it allocates that much).
MAX_DRAWN_ELEMENTS = 1 << 26
#: Most golden vectors read from a bundle.
MAX_VECTORS = 256
#: Stream purposes, mixed into each seed so inputs and samples never share draws.
_INPUT, _SAMPLE = 1, 2
_SQRT3 = math.sqrt(3.0)


def numeric_outputs(outputs: Mapping[str, Any]) -> dict[str, npt.NDArray[Any]]:
    """Only numeric tensor outputs are checked (ZipMap's sequences of maps are not)."""
    return {
        k: v for k, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
    }


def _stream(seed: int, purpose: int, vector: int, name: str) -> np.random.PCG64:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return np.random.PCG64(np.random.SeedSequence([seed, purpose, vector, key]))


def draw_input(spec: Mapping[str, Any], *, seed: int, vector: int, name: str) -> Any:
    """The array input ``name`` of golden vector ``vector`` holds, drawn as ``spec`` says.

    ``spec`` is ``{"dtype", "shape", "draw": "normal", "mean", "std", "min", "max"}``
    (a bell-shaped draw: the sum of four uniform 16-bit integers, scaled to mean 0 and
    standard deviation 1, then ``mean + std * z`` clipped to [min, max]) or
    ``{"dtype", "shape", "draw": "integers", "low", "high"}`` (uniform on [low, high]).
    Raises :class:`MalformedBundleError` for a spec out of bounds."""
    try:
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(d) for d in spec["shape"])
        count = math.prod(shape)
        if dtype.kind not in "biuf" or any(d < 0 for d in shape) or count > MAX_DRAWN_ELEMENTS:
            raise ValueError(f"cannot draw {dtype} {list(shape)}")
        raw = _stream(seed, _INPUT, vector, name).random_raw(count)
        assert isinstance(raw, np.ndarray)
        if spec["draw"] == "normal":
            mean, std, lo, hi = (float(spec[k]) for k in ("mean", "std", "min", "max"))
            if not all(math.isfinite(v) for v in (mean, std, lo, hi)) or lo > hi:
                raise ValueError("non-finite or empty range")
            total = sum((raw >> np.uint64(s)) & np.uint64(0xFFFF) for s in (0, 16, 32, 48))
            z = (total.astype(np.float64) - 131070.0) * (_SQRT3 / 65536.0)
            values = np.clip(mean + std * z, lo, hi)
        elif spec["draw"] == "integers":
            low, high = int(spec["low"]), int(spec["high"])
            if not (-(1 << 63) <= low <= high < 1 << 63 and high - low < 1 << 63):
                raise ValueError("empty or too wide integer range")
            values = (raw % np.uint64(high - low + 1)).astype(np.int64) + np.int64(low)
        else:
            raise ValueError(f"unknown draw {spec['draw']!r}")
        return values.astype(dtype).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MalformedBundleError(f"extras: malformed golden input {name!r}: {e}") from e


def sample_indices(size: int, count: int, *, seed: int, vector: int, name: str) -> Any:
    """``count`` distinct flat indices into ``size`` elements (all when ``count >= size``),
    sorted: the elements of output ``name`` of vector ``vector`` the golden data keeps."""
    if count >= size:
        return np.arange(size, dtype=np.int64)
    bits = _stream(seed, _SAMPLE, vector, name)
    picked: list[int] = []
    seen: set[int] = set()
    while len(picked) < count:
        draws = bits.random_raw(2 * (count - len(picked)))
        assert isinstance(draws, np.ndarray)
        for i in (draws % np.uint64(size)).tolist():
            if i not in seen:
                seen.add(i)
                picked.append(i)
                if len(picked) == count:
                    break
    return np.array(sorted(picked), dtype=np.int64)


@dataclass(frozen=True)
class Expected:
    """One output's expectation: its full shape and its values at ``index`` (flat indices
    into it; None: all of them, format 1)."""

    shape: tuple[int, ...]
    values: npt.NDArray[Any]
    index: npt.NDArray[np.int64] | None = None

    def error(self, have: Any) -> float:
        """The largest absolute difference on the kept elements; inf for another shape."""
        have = np.asarray(have if have is not None else np.empty(0), dtype=np.float64)
        if have.shape != self.shape:
            return float("inf")
        flat = have.reshape(-1)
        got = flat if self.index is None else flat[self.index]
        want = self.values.astype(np.float64).reshape(-1)
        return float(np.abs(got - want).max(initial=0.0))


@dataclass(frozen=True)
class GoldenVector:
    """One golden vector as read: the feed, the expected outputs and, for int8 models,
    each kernel family's expected outputs."""

    feed: dict[str, npt.NDArray[Any]]
    outputs: dict[str, Expected]
    by_kernel: dict[str, dict[str, Expected]]


def _full(obj: Any) -> Expected:
    a = array_from_obj(obj)
    return Expected(tuple(a.shape), a)


def _sampled(obj: Any, *, seed: int, vector: int, name: str) -> Expected:
    """A format 2 output: ``values`` at :func:`sample_indices`, and optionally
    ``extremes``: ``{"index": flat indices, "values"}`` (the packer's largest-magnitude
    elements outside the sample, where a changed weight shows most)."""
    try:
        shape = tuple(int(d) for d in obj["shape"])
        values = array_from_obj(obj["values"]).reshape(-1)
        size = math.prod(shape)
        if any(d < 0 for d in shape) or values.size > size:
            raise ValueError("more sampled values than elements")
        extremes = obj.get("extremes")
        if extremes is not None:
            extra = array_from_obj(extremes["index"]).reshape(-1)
            extra_values = array_from_obj(extremes["values"]).reshape(-1)
            if extra.dtype.kind not in "iu" or extra.size != extra_values.size:
                raise ValueError("extremes: one integer index per value")
            if extra.size and not 0 <= int(extra.min()) <= int(extra.max()) < size:
                raise ValueError("extremes: index out of range")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MalformedBundleError(f"extras: malformed golden output {name!r}: {e}") from e
    index = sample_indices(size, values.size, seed=seed, vector=vector, name=name)
    if extremes is None:
        return Expected(shape, values, None if values.size == size else index)
    return Expected(
        shape,
        np.concatenate([values, extra_values.astype(values.dtype)]),
        np.concatenate([index, extra.astype(np.int64)]),
    )


def golden_vectors(golden: Mapping[str, Any]) -> list[GoldenVector]:
    """The vectors of golden data of either format, with their feeds built (format 2's
    drawn inputs included) and their expectations. Raises :class:`MalformedBundleError`."""
    try:
        vectors = golden["vectors"]
        if not isinstance(vectors, list) or len(vectors) > MAX_VECTORS:
            raise ValueError(f"vectors must be a list of at most {MAX_VECTORS}")
        fmt = golden.get("format", 1)
        if fmt == 1:
            return [
                GoldenVector(
                    {k: array_from_obj(a) for k, a in v["inputs"].items()},
                    {k: _full(a) for k, a in v["outputs"].items()},
                    {
                        kernel: {k: _full(a) for k, a in outputs.items()}
                        for kernel, outputs in v.get("expected_by_kernel", {}).items()
                    },
                )
                for v in vectors
            ]
        if fmt != FORMAT:
            raise ValueError(f"unknown golden format {fmt!r}")
        seed = int(golden["seed"])
        if not 0 <= seed < 1 << 64:
            raise ValueError("seed must be an unsigned 64-bit integer")
        inputs: Mapping[str, Any] = golden["inputs"]
        for name, spec in inputs.items():
            if spec["draw"] == "verbatim" and len(spec["values"]) != len(vectors):
                raise ValueError(f"input {name!r}: one verbatim value per vector")
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedBundleError(f"extras: malformed golden data: {e}") from e
    result = []
    for i, v in enumerate(vectors):

        def expected(outputs: Mapping[str, Any], i: int = i) -> dict[str, Expected]:
            return {k: _sampled(o, seed=seed, vector=i, name=k) for k, o in outputs.items()}

        feed = {
            name: array_from_obj(spec["values"][i])
            if spec["draw"] == "verbatim"
            else draw_input(spec, seed=seed, vector=i, name=name)
            for name, spec in inputs.items()
        }
        by_kernel = {kernel: expected(o) for kernel, o in v.get("expected_by_kernel", {}).items()}
        result.append(GoldenVector(feed, expected(v["outputs"]), by_kernel))
    return result


def _problems(
    got: list[dict[str, npt.NDArray[Any]]],
    expected: list[Mapping[str, Expected]],
    tolerances: Mapping[str, Any],
    label: str = "",
) -> list[str]:
    problems = []
    for i, (outputs, want) in enumerate(zip(got, expected, strict=True)):
        for name, exp in want.items():
            err = exp.error(outputs.get(name))
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
    per-family data, ``outputs`` within ``tolerances``. In format 2 only each output's
    sampled elements are compared (and its shape)."""
    vectors = golden_vectors(golden)
    got = [numeric_outputs(run(dict(vector.feed))) for vector in vectors]
    kernel_tolerances: Mapping[str, Any] = golden.get("kernel_tolerances") or {}
    kernels = [
        kernel for kernel in kernel_tolerances if all(kernel in v.by_kernel for v in vectors)
    ]
    if not kernels:
        return _problems(got, [v.outputs for v in vectors], golden["tolerances"])
    by_kernel = {
        kernel: _problems(
            got,
            [v.by_kernel[kernel] for v in vectors],
            kernel_tolerances[kernel],
            f" ({kernel} int8 kernels)",
        )
        for kernel in kernels
    }
    if any(not p for p in by_kernel.values()):
        return []
    return [p for kernel in kernels for p in by_kernel[kernel]]
