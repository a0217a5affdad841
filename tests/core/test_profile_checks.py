"""The compiled input checks and OOD scores (core/profile.py) on the inputs that a
vectorised fast path could get wrong: a bad value in the last place of a large input,
strided views, shapes seen before, and scores against the formula they stand for."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeseal.core.manifest import TensorSpec
from edgeseal.core.profile import (
    PCA_MAX_FEATURES,
    InputError,
    compile_profile,
    make_profile,
    raw_scores,
)

FEATURES = 64


def _calibration(features: int = FEATURES, rows: int = 256) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((rows, features)).astype(np.float32)


def _spec(features: int | str = FEATURES) -> TensorSpec:
    return TensorSpec("x", "float32", ("batch", features))


def _compiled(
    features: int = FEATURES,
    *,
    margin: float = 1.0,
    max_rows: int = 1024,
    symbolic: bool = False,
) -> Any:
    """Checks for one float32 input of ``features`` values per row; ``symbolic`` names
    the feature axis instead (then the element bound allows more than ``max_rows`` rows,
    and the rows limit is what refuses them)."""
    profile = make_profile({"x": _calibration(features)})
    spec = _spec("n" if symbolic else features)
    return compile_profile(profile, [spec], max_rows=max_rows, range_margin=margin)


def _inside(rows: int, features: int = FEATURES) -> np.ndarray:
    """Rows well inside the calibrated range."""
    rng = np.random.default_rng(11)
    return (rng.standard_normal((rows, features)) * 0.5).astype(np.float32)


@pytest.mark.parametrize("margin", [1.0, 0.0], ids=["ranged", "no-range"])
@pytest.mark.parametrize("where", [0, 1000 * FEATURES // 2 + 7, 1000 * FEATURES - 1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_nan_or_infinity_anywhere_in_a_large_input_is_refused(margin, where, bad):
    checks = _compiled(margin=margin)
    x = _inside(1000)
    checks.check({"x": x})
    x.reshape(-1)[where] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        checks.check({"x": x})


def test_a_value_far_out_of_range_in_the_last_element_is_refused_naming_the_range():
    checks = _compiled()
    x = _inside(1000)
    x[-1, -1] = 1e6
    with pytest.raises(InputError, match="far outside the calibrated range"):
        checks.check({"x": x})


def test_huge_finite_values_are_not_mistaken_for_infinities_without_a_range():
    checks = _compiled(margin=0.0)
    x = _inside(4)
    x[0, 0], x[-1, -1] = -3e38, 3e38  # their difference overflows float32
    checks.check({"x": x})


def test_an_out_of_range_last_element_makes_its_row_ood_and_only_its_row():
    checks = _compiled(margin=0.0)  # range check off: the score alone must see it
    x = _inside(8)
    x[5, -1] = 50.0
    scores = checks.scores({"x": x})
    assert scores is not None and scores.shape == (8,)
    assert scores[5] > 1.0
    assert (np.delete(scores, 5) <= 1.0).all()


@pytest.mark.parametrize("features", [FEATURES, PCA_MAX_FEATURES + 256], ids=["pca", "channel"])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_compiled_scores_are_the_raw_scores_over_the_reference(features, rows):
    profile = make_profile({"x": _calibration(features, rows=64)})
    kind = profile["inputs"]["x"]["model"]["kind"]
    assert kind == ("pca" if features <= PCA_MAX_FEATURES else "channel")
    checks = compile_profile(profile, [_spec(features)], range_margin=0.0)
    x = _inside(rows, features) * 1.7 + 0.2
    got = checks.scores({"x": x})
    want = raw_scores(profile, {"x": x})["x"] / profile["inputs"]["x"]["reference_score"]
    # The same up to rounding (the profile's arrays are float32): answers carry 4 digits.
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_non_contiguous_input_is_checked_and_scored_like_its_contiguous_copy():
    checks = _compiled()
    wide = _inside(40, 2 * FEATURES)
    strided = wide[::2, ::2]  # every other row and column: a view, not a copy
    fortran = np.asfortranarray(_inside(20))
    for x in (strided, fortran, _inside(20)[::-1]):
        assert x.shape[1] == FEATURES
        checks.check({"x": x})
        np.testing.assert_allclose(
            checks.scores({"x": x}), checks.scores({"x": np.ascontiguousarray(x)}), rtol=1e-12
        )
    wide[-2, -2] = np.nan  # lands in the strided view's last element
    with pytest.raises(InputError, match="NaN or infinite"):
        checks.check({"x": strided})


def test_a_shape_accepted_before_does_not_let_a_wrong_shape_or_too_many_rows_through():
    fixed = _compiled(max_rows=8)
    fixed.check({"x": _inside(7)})
    with pytest.raises(InputError, match="shape"):
        fixed.check({"x": _inside(7, FEATURES + 1)})
    with pytest.raises(InputError, match="shape"):
        fixed.check({"x": _inside(7).reshape(7, FEATURES, 1)})
    fixed.check({"x": _inside(7)})
    symbolic = _compiled(max_rows=8, symbolic=True)
    symbolic.check({"x": _inside(8)})
    with pytest.raises(InputError, match="9 rows, at most 8"):
        symbolic.check({"x": _inside(9)})
    symbolic.check({"x": _inside(8)})


def test_the_shapes_remembered_per_input_stay_bounded():
    checks = _compiled(max_rows=500, symbolic=True)
    for rows in range(1, 301):
        checks.check({"x": _inside(rows)})
    (only,) = checks.inputs
    assert 0 < len(only.shapes_ok) <= 64
    with pytest.raises(InputError, match="501 rows"):
        checks.check({"x": _inside(501)})


def test_a_wrong_dtype_is_refused_before_any_value_is_read():
    checks = _compiled()
    with pytest.raises(InputError, match="dtype float64"):
        checks.check({"x": _inside(2).astype(np.float64)})
    with pytest.raises(InputError, match="big-endian"):
        checks.check({"x": _inside(2).astype(">f4")})
