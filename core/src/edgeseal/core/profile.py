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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeseal.core.errors import EdgesealError
from edgeseal.core.manifest import TensorSpec

__all__ = [
    "InputError",
    "check_feed",
    "compile_profile",
    "make_profile",
    "ood_scores",
    "raw_scores",
]

PCA_MAX_FEATURES = 1024
PCA_COMPONENTS = 16
#: The calibration percentile the score is relative to.
REFERENCE_PERCENTILE = 99.0

Array = npt.NDArray[Any]


class InputError(EdgesealError):
    """A request's inputs do not match the model's signed schema or profile."""

    hint = "GET the model's info for its inputs: names, dtypes, shapes and value ranges"


def _channel_axis(ndim: int) -> int:
    return 1 if ndim >= 3 else ndim - 1


def _fit_pca(flat: npt.NDArray[np.float64]) -> dict[str, Any]:
    mean = flat.mean(axis=0)
    centered = flat - mean
    rows, features = centered.shape
    k = max(1, min(PCA_COMPONENTS, features - 1, rows - 1))
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    var = (s**2) / max(rows - 1, 1)
    comps = vt[:k]
    total = float(var.sum())
    kept = var[:k]
    residual = (total - float(kept.sum())) / max(features - k, 1)
    floor = max(total / features, 1e-12) * 1e-3
    return {
        "kind": "pca",
        "mean": mean.tolist(),
        "components": comps.tolist(),
        "variances": np.maximum(kept, floor).tolist(),
        "residual_var": max(residual, floor),
    }


def _raw(entry: Mapping[str, Any], x: Array) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    rows = a.shape[0]
    model = entry.get("model", {"kind": "channel"})
    if model["kind"] == "pca":
        flat = a.reshape(rows, -1) - np.asarray(model["mean"])
        comps = np.asarray(model["components"])
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
    mean = np.asarray(entry["mean"]).reshape(shape)
    std = np.maximum(np.asarray(entry["std"]), 1e-12).reshape(shape)
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
            "mean": np.atleast_1d(x.mean(axis=reduce)).tolist(),
            "std": np.atleast_1d(x.std(axis=reduce)).tolist(),
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


def compile_profile(profile: Mapping[str, Any]) -> dict[str, Any]:
    """The profile with its vectors as numpy arrays, converted once: what a server keeps
    (converting the JSON lists on every request costs more than the model)."""
    inputs = {}
    for name, entry in profile.get("inputs", {}).items():
        e = {k: np.asarray(v) if k in _ARRAYS else v for k, v in entry.items()}
        if isinstance(entry.get("model"), dict):
            e["model"] = {
                k: np.asarray(v) if k in _ARRAYS else v for k, v in entry["model"].items()
            }
        inputs[name] = e
    return {**profile, "inputs": inputs}


def raw_scores(profile: Mapping[str, Any], feed: Mapping[str, Array]) -> dict[str, Array]:
    """Per input present in the profile, the raw score of each row."""
    return {
        name: _raw(entry, feed[name])
        for name, entry in profile.get("inputs", {}).items()
        if name in feed
    }


def ood_scores(profile: Mapping[str, Any], feed: Mapping[str, Array]) -> Array | None:
    """Per row, the highest score over the inputs relative to the calibration data's 99th
    percentile (above 1: unusual); None when the profile has nothing to score with."""
    parts = []
    for name, raw in raw_scores(profile, feed).items():
        ref = profile["inputs"][name].get("reference_score")
        if ref:
            parts.append(raw / float(ref))
    if not parts:
        return None
    return np.max(np.stack(parts), axis=0)  # type: ignore[no-any-return]


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
    times its span on each side (0 disables the range check)."""
    names = {s.name for s in specs}
    extra = sorted(set(feed) - names)
    missing = sorted(names - set(feed))
    if extra or missing:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unknown {', '.join(extra)}"] if extra else []
        raise InputError("inputs do not match the model: " + "; ".join(parts))
    prof = (profile or {}).get("inputs", {})
    for spec in specs:
        a = feed[spec.name]
        if a.dtype.name != spec.dtype:
            raise InputError(
                f"input {spec.name}: dtype {a.dtype.name}, the model takes {spec.dtype}"
            )
        if not _shape_ok(spec.shape, a.shape):
            raise InputError(
                f"input {spec.name}: shape {list(a.shape)}, the model takes {list(spec.shape)}"
            )
        if a.ndim and a.shape[0] > max_rows:
            raise InputError(f"input {spec.name}: {a.shape[0]} rows, at most {max_rows} per call")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise InputError(f"input {spec.name}: NaN or infinite values")
        entry = prof.get(spec.name)
        if entry and range_margin > 0 and a.size:
            lo, hi = float(entry["min"]), float(entry["max"])
            span = max(hi - lo, 1e-12) * range_margin
            amin, amax = float(a.min()), float(a.max())
            if amin < lo - span or amax > hi + span:
                raise InputError(
                    f"input {spec.name}: values in [{amin:.4g}, {amax:.4g}], far outside the "
                    f"calibrated range [{lo:.4g}, {hi:.4g}]"
                )
