"""Bootstrap intervals of the reproduction's correlations."""
import math

import numpy as np
import pytest
from scipy.stats import kendalltau, pearsonr

from relflat_ext.apps.stats import _kendall, correlations, partial_correlation


def _pairs(n, seed, slope=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, slope * x + rng.normal(size=n)


@pytest.mark.parametrize("seed", range(5))
def test_point_estimates_are_scipys_and_inside_their_intervals(seed):
    x, y = _pairs(60, seed)
    res = correlations(x, y, seed=seed)
    assert res["pearson"] == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert res["kendall"] == pytest.approx(kendalltau(x, y)[0], abs=1e-12)
    for key in ("pearson", "kendall"):
        lo, hi = res[f"{key}_ci"]
        assert lo < res[key] < hi


def test_intervals_narrow_with_more_data_sets():
    widths = {}
    for n in (30, 300):
        res = correlations(*_pairs(n, seed=1), seed=0)
        widths[n] = {k: res[f"{k}_ci"][1] - res[f"{k}_ci"][0] for k in ("pearson", "kendall")}
    for key in ("pearson", "kendall"):
        assert widths[300][key] < 0.5 * widths[30][key]  # ~ 1/sqrt(n): about 0.32x


def test_kendall_is_tau_b_with_ties_for_batches_of_resamples():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(4, 40)), 1)  # ties
    y = np.round(x + rng.normal(size=(4, 40)), 0)
    got = _kendall(x, y)
    assert got.shape == (4,)
    for row in range(4):
        assert got[row] == pytest.approx(kendalltau(x[row], y[row])[0], abs=1e-12)


def test_degenerate_input():
    res = correlations([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(res["pearson"]) and all(math.isnan(v) for v in res["kendall_ci"])
    with pytest.raises(ValueError, match="same length"):
        correlations([1.0, 2.0], [1.0, 2.0, 3.0])


def test_partial_correlation_removes_a_common_cause():
    """x and y both follow z: strongly correlated, but not once z is held fixed (and the value is
    the residuals' correlation after regressing each on z)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=400)
    x, y = z + 0.3 * rng.normal(size=400), z + 0.3 * rng.normal(size=400)
    assert pearsonr(x, y)[0] > 0.8
    res = partial_correlation(x, y, z)
    design = np.c_[np.ones_like(z), z]
    residual = lambda v: v - design @ np.linalg.lstsq(design, v, rcond=None)[0]  # noqa: E731
    assert res["pearson"] == pytest.approx(pearsonr(residual(x), residual(y))[0], abs=1e-10)
    lo, hi = res["pearson_ci"]
    assert lo < 0 < hi and hi - lo < 0.3
