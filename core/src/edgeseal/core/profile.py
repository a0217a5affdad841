"""Input profiles: what the packager measured of real inputs, and what the agent checks.

The packager builds a profile from the calibration data (:func:`make_profile`); it is
sealed in ``extras`` and signed through the manifest. The agent checks each request
against the manifest's schema and the profile (:func:`check_feed`) and scores how unusual
each row is (:func:`ood_scores`).

The out-of-distribution score of a row is its raw score divided by the 99th percentile
of the raw scores of the calibration rows: above 1 means more unusual than 99% of what
the model was calibrated on. The raw score of an input is

* ``pca`` (inputs of at most ``PCA_MAX_FEATURES`` values per row): a probabilistic PCA
  fit, the Mahalanobis distance in the top components plus the residual energy over the
  residual variance, per feature. It sees both shifts along the data and departures from
  the subspace the data lives in (another distribution);
* ``channel`` (bigger inputs, e.g. images): the mean squared z-score of each value
  against its channel's mean and std (brightness, contrast and noise shifts).

Pure functions over numpy arrays; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# The input errors live in the one error tree (errors.py, which imports nothing) so the
# agent's wire format can raise them without loading the profile code; named here too.
from edgeseal.core.errors import InputError, InputTooLargeError
from edgeseal.core.extras import array_from_obj, array_to_obj
from edgeseal.core.manifest import TensorSpec

__all__ = [
    "CompiledProfile",
    "InputError",
    "InputTooLargeError",
    "check_feed",
    "compile_profile",
    "make_profile",
    "ood_scores",
    "raw_scores",
]

PCA_MAX_FEATURES = 1024
PCA_COMPONENTS = 16
#: Most component values kept per input (float32): a wide input keeps fewer components,
#: so a profile stays a few KiB of the bundle (issue 17's bound on what a bundle carries
#: beyond its model: 64 KiB + 2 %).
PCA_MAX_VALUES = 2048
#: The calibration percentile the score is relative to.
REFERENCE_PERCENTILE = 99.0

Array = npt.NDArray[Any]


def _channel_axis(ndim: int) -> int:
    return 1 if ndim >= 3 else ndim - 1


def _vector(value: Any) -> npt.NDArray[np.float64]:
    """A profile array in float64: an array object (float32, from this version on) or a
    JSON list (profiles packed before)."""
    if isinstance(value, Mapping):
        return np.asarray(array_from_obj(value), dtype=np.float64)
    return np.asarray(value, dtype=np.float64)


def _compact(values: npt.NDArray[np.float64]) -> Any:
    """A short vector as a JSON list; a long one (per-feature statistics of a wide input)
    as a float32 array object, a fifth of the text."""
    return values.tolist() if values.size <= 16 else array_to_obj(values.astype(np.float32))


def _fit_pca(flat: npt.NDArray[np.float64]) -> dict[str, Any]:
    mean = flat.mean(axis=0)
    centered = flat - mean
    rows, features = centered.shape
    k = max(1, min(PCA_COMPONENTS, features - 1, rows - 1, PCA_MAX_VALUES // features))
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    var = (s**2) / max(rows - 1, 1)
    comps = vt[:k]
    total = float(var.sum())
    kept = var[:k]
    residual = (total - float(kept.sum())) / max(features - k, 1)
    floor = max(total / features, 1e-12) * 1e-3
    # The two wide arrays as float32 array objects (base64): a fifth of their JSON text.
    return {
        "kind": "pca",
        "mean": _compact(mean),
        "components": array_to_obj(comps.astype(np.float32)),
        "variances": np.maximum(kept, floor).tolist(),
        "residual_var": max(residual, floor),
    }


def _raw(entry: Mapping[str, Any], x: Array) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    rows = a.shape[0]
    model = entry.get("model", {"kind": "channel"})
    if model["kind"] == "pca":
        flat = a.reshape(rows, -1) - _vector(model["mean"])
        comps = _vector(model["components"])
        z = flat @ comps.T
        resid = flat - z @ comps
        d = flat.shape[1]
        out: npt.NDArray[np.float64] = (
            (z**2 / np.asarray(model["variances"])).sum(axis=1)
            + (resid**2).sum(axis=1) / float(model["residual_var"])
        ) / d
        return out
    axis = int(entry["axis"])
    shape = [1] * a.ndim
    shape[axis] = -1
    mean = _vector(entry["mean"]).reshape(shape)
    std = np.maximum(_vector(entry["std"]), 1e-12).reshape(shape)
    zz = ((a - mean) / std) ** 2
    return zz.reshape(rows, -1).mean(axis=1)  # type: ignore[no-any-return]


def make_profile(inputs: Mapping[str, Array]) -> dict[str, Any]:
    """The profile of real input rows (each array's first axis is the row)."""
    out: dict[str, Any] = {}
    rows = 0
    for name, a in inputs.items():
        x = np.asarray(a, dtype=np.float64)
        rows = x.shape[0]
        axis = _channel_axis(x.ndim)
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        entry: dict[str, Any] = {
            "dtype": a.dtype.name,
            "shape": list(a.shape[1:]),
            "axis": axis,
            "min": float(x.min()),
            "max": float(x.max()),
            "mean": _compact(np.atleast_1d(x.mean(axis=reduce))),
            "std": _compact(np.atleast_1d(x.std(axis=reduce))),
        }
        flat = x.reshape(rows, -1)
        if flat.shape[1] <= PCA_MAX_FEATURES and rows >= 8:
            entry["model"] = _fit_pca(flat)
        else:
            entry["model"] = {"kind": "channel"}
        scores = _raw(entry, x)
        entry["reference_score"] = max(float(np.percentile(scores, REFERENCE_PERCENTILE)), 1e-12)
        out[name] = entry
    return {"inputs": out, "rows": rows}


_ARRAYS = ("mean", "std", "components", "variances")
#: Accepted input shapes remembered per input (a server sees a few batch sizes).
_SHAPES_KEPT = 64
_MIN = np.minimum.reduce
_MAX = np.maximum.reduce


class _Scorer:
    """One input's OOD score, folded into a few precomputed matrices: each row's score
    relative to the reference percentile in two or three vector operations.

    For ``pca`` (orthonormal components ``C``, variances ``v``, residual variance ``r``,
    ``d`` features) the raw score of a centred row ``c`` is
    ``(sum(z**2 / v) + (|c|**2 - |z|**2) / r) / d`` with ``z = c @ C.T``: the residual
    energy is the row's energy minus what the components hold, so no reconstruction is
    computed. For ``channel`` it is the mean of ``((a - mean) * (1 / std))**2``.
    """

    def __init__(self, entry: Mapping[str, Any]) -> None:
        ref = float(entry.get("reference_score") or 0.0)
        self.active = ref > 0
        scale = 1.0 / ref if self.active else 1.0
        model = entry.get("model") or {"kind": "channel"}
        self.kind = str(model["kind"])
        if self.kind == "pca":
            comps = _vector(model["components"])
            d = comps.shape[1]
            var = np.asarray(model["variances"], dtype=np.float64)
            rv = float(model["residual_var"])
            self.mean = _vector(model["mean"])
            self.proj = np.ascontiguousarray(comps.T)
            self.weights = (1.0 / var - 1.0 / rv) * (scale / d)
            self.energy = scale / (rv * d)
            self.features = d
            #: One weight per squared value of ``[c, z]``: the energy weight for each of
            #: the ``d`` centred values, then the component weights.
            self.coef = np.concatenate([np.full(d, self.energy), self.weights])
        else:
            axis = int(entry["axis"])
            self.axis = axis
            self.mean = _vector(entry["mean"])
            self.inv_std = 1.0 / np.maximum(_vector(entry["std"]), 1e-12)
            self._shaped: dict[int, tuple[Array, Array]] = {}
            self.scale = scale

    def _channel_vectors(self, ndim: int, dtype: np.dtype[Any]) -> tuple[Array, Array]:
        key = ndim * 1000 + dtype.num
        got = self._shaped.get(key)
        if got is None:
            shape = [1] * ndim
            shape[self.axis] = -1
            work = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float64)
            got = (
                self.mean.astype(work).reshape(shape),
                self.inv_std.astype(work).reshape(shape),
            )
            self._shaped[key] = got
        return got

    def raw(self, x: Array) -> npt.NDArray[np.float64]:
        """Each row's score relative to the reference (1: the calibration's 99th pct)."""
        rows = x.shape[0]
        if self.kind == "pca":
            # Four array operations, whatever the rows: the centred row ``c`` (float64
            # from here on) and its projection ``z`` side by side in one buffer, squared
            # in place, then one product with the weights gives
            # ``energy * |c|**2 + weights . z**2`` per row.
            d = self.features
            y = np.empty((rows, d + self.weights.shape[0]))
            c = y[:, :d]
            np.subtract(x.reshape(rows, -1), self.mean, out=c)
            np.matmul(c, self.proj, out=y[:, d:])
            np.multiply(y, y, out=y)
            out: npt.NDArray[np.float64] = y @ self.coef
            return out
        mean, inv = self._channel_vectors(x.ndim, x.dtype)
        zz = (x - mean) * inv
        flat = zz.reshape(rows, -1)
        s = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        return s * (self.scale / flat.shape[1])  # type: ignore[no-any-return]


class _InputCheck:
    """One input's schema and range check, compiled."""

    def __init__(
        self, spec: TensorSpec, entry: Mapping[str, Any] | None, margin: float, max_rows: int
    ) -> None:
        self.name = spec.name
        self.max_rows = max_rows
        self.dtype = np.dtype(spec.dtype) if spec.dtype in np.sctypeDict else None
        self.dtype_name = spec.dtype
        self.want = tuple(spec.shape)
        self.ndim = len(self.want)
        #: (axis, size) of every fixed dimension; symbolic and unknown ones take any size.
        self.fixed = tuple((i, w) for i, w in enumerate(self.want) if isinstance(w, int) and w > 0)
        self.floating = self.dtype is not None and self.dtype.kind == "f"
        self.lo, self.hi = -np.inf, np.inf
        self.ranged = False
        if entry and margin > 0:
            lo, hi = float(entry["min"]), float(entry["max"])
            span = max(hi - lo, 1e-12) * margin
            self.lo, self.hi, self.ranged = lo - span, hi + span, True
            self.calibrated = (lo, hi)
        #: Whether the values are reduced at all: finiteness for floats, range if profiled.
        self.reduced = self.floating or self.ranged
        #: Shapes already found to fit the schema and the rows limit, so that a repeated
        #: shape costs one set lookup; at most ``_SHAPES_KEPT`` are kept.
        self.shapes_ok: set[tuple[int, ...]] = set()

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """What is wrong with ``shape`` (the schema's rank and fixed sizes, at most
        ``max_rows`` rows), or None; a shape that fits is remembered, so a repeated one
        costs a set lookup."""
        if shape in self.shapes_ok:
            return None
        if len(shape) != self.ndim or any(shape[i] != w for i, w in self.fixed):
            return f"shape {list(shape)}, the model takes {list(self.want)}"
        if shape and shape[0] > self.max_rows:
            return f"{shape[0]} rows, at most {self.max_rows} per call"
        if len(self.shapes_ok) < _SHAPES_KEPT:
            self.shapes_ok.add(shape)
        return None


class CompiledProfile:
    """A profile and a schema compiled once per model: what a server keeps. Converting
    the JSON lists, or looking up entries, on every request costs more than a small model.

    :meth:`check` refuses a feed exactly as :func:`check_feed` does, :meth:`scores` gives
    :func:`ood_scores`. ``raw`` is the profile as sealed (its vectors as arrays).
    """

    def __init__(
        self,
        profile: Mapping[str, Any] | None,
        specs: Sequence[TensorSpec] = (),
        *,
        max_rows: int = 1024,
        range_margin: float = 1.0,
        max_elements: int | None = None,
        dim_factor: float = 4.0,
    ) -> None:
        self.raw: dict[str, Any] = _arrays(profile or {})
        prof = self.raw.get("inputs", {})
        self.max_rows = max_rows
        self.names = frozenset(s.name for s in specs)
        self.inputs = tuple(_InputCheck(s, prof.get(s.name), range_margin, max_rows) for s in specs)
        #: Input elements per call at most: max_rows rows of each input, a symbolic
        #: dimension counted at ``dim_factor`` times its size in the calibration rows;
        #: never more than ``max_elements``.
        self.max_elements = _elements_bound(specs, prof, max_rows, dim_factor, max_elements)
        self.scorers = {name: _Scorer(e) for name, e in prof.items()}
        self.scorers = {n: s for n, s in self.scorers.items() if s.active}

    def check(self, feed: Mapping[str, Array]) -> None:
        if len(feed) != len(self.names) or not self.names.issuperset(feed):
            _names_problem(self.names, feed)
        elements = 0
        for a in feed.values():
            elements += a.size
        if elements > self.max_elements:
            self.too_large(elements)
        for c in self.inputs:
            a = feed[c.name]
            if a.dtype != c.dtype:
                order = " big-endian" if a.dtype.byteorder == ">" else ""
                raise InputError(
                    f"input {c.name}: dtype{order} {a.dtype.name}, the model takes "
                    f"{c.dtype_name}" + (" in little-endian order" if order else "")
                )
            problem = c.shape_problem(a.shape)
            if problem is not None:
                raise InputError(f"input {c.name}: {problem}")

            if not c.reduced or not a.size:
                continue
            # Two reductions check finiteness and range at once, whatever the layout (no
            # copy of a strided input): NaN propagates through min and max and fails
            # every comparison; an infinity lies outside any bound. The ufuncs' own
            # reduce skips the Python wrappers of ``a.min()`` and ``a.max()``.
            amin, amax = _MIN(a, axis=None), _MAX(a, axis=None)
            if (
                c.lo <= amin
                and amax <= c.hi
                and (c.ranged or (math.isfinite(amin) and math.isfinite(amax)))
            ):
                continue
            if c.floating and not np.isfinite(a).all():
                raise InputError(f"input {c.name}: NaN or infinite values")
            if c.ranged:
                lo, hi = c.calibrated
                raise InputError(
                    f"input {c.name}: values in [{float(amin):.4g}, {float(amax):.4g}], far "
                    f"outside the calibrated range [{lo:.4g}, {hi:.4g}]"
                )

    def too_large(self, elements: int) -> None:
        raise InputTooLargeError(
            f"inputs of {elements} elements, at most {self.max_elements} per call for this "
            "model (its symbolic dimensions are bounded by the calibrated sizes)"
        )

    def scores(self, feed: Mapping[str, Array]) -> Array | None:
        out: Array | None = None
        for name, scorer in self.scorers.items():
            if name in feed:
                s = scorer.raw(feed[name])
                out = s if out is None else np.maximum(out, s)
        return out


def _elements_bound(
    specs: Sequence[TensorSpec],
    prof: Mapping[str, Any],
    max_rows: int,
    dim_factor: float,
    cap: int | None,
) -> int:
    """Input elements a call may carry: per input, ``max_rows`` rows of the schema's fixed
    dimensions, each symbolic one at ``dim_factor`` times its calibrated size; ``cap``
    where a symbolic dimension has no calibrated size (and at most ``cap`` always)."""
    limit = cap if cap is not None else 2**62
    total = 0
    for spec in specs:
        shape = list(spec.shape)[1:]  # the first axis is the rows (max_rows)
        entry = prof.get(spec.name) or {}
        calibrated = entry.get("shape")
        if not isinstance(calibrated, list) or len(calibrated) != len(shape):
            calibrated = None
        row = 1
        for i, w in enumerate(shape):
            if isinstance(w, int) and w > 0:
                row *= w
            elif calibrated is not None and isinstance(calibrated[i], int) and calibrated[i] > 0:
                row *= max(1, math.ceil(calibrated[i] * dim_factor))
            else:
                return limit
        total += max_rows * row
    return min(total, limit) if specs else limit


def _names_problem(names: frozenset[str], feed: Mapping[str, Array]) -> None:
    extra = sorted(set(feed) - names)
    missing = sorted(names - set(feed))
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unknown {', '.join(extra)}"] if extra else []
    raise InputError("inputs do not match the model: " + "; ".join(parts))


def _arrays(profile: Mapping[str, Any]) -> dict[str, Any]:
    inputs = {}
    for name, entry in profile.get("inputs", {}).items():
        e = {k: _vector(v) if k in _ARRAYS else v for k, v in entry.items()}
        if isinstance(entry.get("model"), dict):
            e["model"] = {k: _vector(v) if k in _ARRAYS else v for k, v in entry["model"].items()}
        inputs[name] = e
    return {**profile, "inputs": inputs}


def compile_profile(
    profile: Mapping[str, Any],
    specs: Sequence[TensorSpec] = (),
    *,
    max_rows: int = 1024,
    range_margin: float = 1.0,
    max_elements: int | None = None,
    dim_factor: float = 4.0,
) -> CompiledProfile:
    """The profile (and the signed input schema ``specs``) compiled once per model."""
    return CompiledProfile(
        profile,
        specs,
        max_rows=max_rows,
        range_margin=range_margin,
        max_elements=max_elements,
        dim_factor=dim_factor,
    )


def raw_scores(profile: Mapping[str, Any], feed: Mapping[str, Array]) -> dict[str, Array]:
    """Per input present in the profile, the raw score of each row."""
    return {
        name: _raw(entry, feed[name])
        for name, entry in profile.get("inputs", {}).items()
        if name in feed
    }


def ood_scores(
    profile: Mapping[str, Any] | CompiledProfile, feed: Mapping[str, Array]
) -> Array | None:
    """Per row, the highest score over the inputs relative to the calibration data's 99th
    percentile (above 1: unusual); None when the profile has nothing to score with."""
    compiled = profile if isinstance(profile, CompiledProfile) else CompiledProfile(profile)
    return compiled.scores(feed)


def _shape_ok(want: Sequence[int | str], have: tuple[int, ...]) -> bool:
    if len(want) != len(have):
        return False
    return all(not isinstance(w, int) or w <= 0 or w == h for w, h in zip(want, have, strict=True))


def check_feed(
    specs: Sequence[TensorSpec],
    profile: Mapping[str, Any] | None,
    feed: Mapping[str, Array],
    *,
    max_rows: int = 1024,
    range_margin: float = 1.0,
) -> None:
    """Refuse a request that does not match the signed schema: names, dtypes, shapes,
    finite values, and values within the profile's range widened by ``range_margin``
    times its span on each side (0 disables the range check). A server compiles this
    once per model (:func:`compile_profile`) and calls ``check``."""
    CompiledProfile(profile, specs, max_rows=max_rows, range_margin=range_margin).check(feed)
