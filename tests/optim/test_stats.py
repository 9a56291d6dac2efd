"""optim.stats: bootstrap draws, intervals, paired differences, rank correlations, permutation p-values."""

import math
import warnings

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from optim import stats


def test_bootstrap_draws_are_stratified_seeded_and_independent_of_the_mapping_order():
    a = stats.bootstrap_indices({"healthy": 3, "lesion": 5}, replicates=4, seed=7)
    b = stats.bootstrap_indices({"lesion": 5, "healthy": 3}, replicates=4, seed=7)
    assert a["healthy"].shape == (4, 3) and a["lesion"].shape == (4, 5)
    assert list(b) == ["lesion", "healthy"]  # the caller's order is kept
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].min() >= 0 and a[name].max() < {"healthy": 3, "lesion": 5}[name]
    other = stats.bootstrap_indices({"healthy": 3, "lesion": 5}, replicates=4, seed=8)
    assert not np.array_equal(a["lesion"], other["lesion"])
    with pytest.raises(ValueError, match="replicates"):
        stats.bootstrap_indices({"x": 2}, replicates=0, seed=0)
    with pytest.raises(ValueError, match="'x' has 0 units"):
        stats.bootstrap_indices({"x": 0}, replicates=2, seed=0)


def test_a_bootstrap_draws_every_unit_about_equally_often():
    draws = stats.bootstrap_indices({"x": 4}, replicates=20000, seed=0)["x"]
    counts = np.bincount(draws.reshape(-1), minlength=4) / draws.size
    np.testing.assert_allclose(counts, 0.25, atol=0.01)


def test_multiplicities_hand_computed():
    np.testing.assert_array_equal(stats.multiplicities([[0, 0, 2], [1, 2, 2]], 3), [[2, 0, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="outside range"):
        stats.multiplicities([[3]], 3)


def test_percentile_interval_hand_computed_and_nan_replicates():
    assert stats.percentile_interval(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))
    with pytest.warns(RuntimeWarning, match="1 of 4 replicates are NaN"):
        assert stats.percentile_interval([0.0, 1.0, float("nan"), 2.0], level=0.5) == pytest.approx((0.5, 1.5))
    with pytest.warns(RuntimeWarning, match="none of 2"):
        assert all(math.isnan(v) for v in stats.percentile_interval([float("nan")] * 2))
    with pytest.raises(ValueError, match="level"):
        stats.percentile_interval([1.0], level=1.0)


def test_paired_difference_hand_computed():
    better = stats.paired_difference(0.9, 0.5, [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], level=0.5)
    assert better.difference == pytest.approx(0.4)
    assert (better.low, better.high) == pytest.approx((1.75, 3.25))  # quantiles 0.25 / 0.75 of d = 1, 2, 3, 4
    assert better.p_value == pytest.approx(2 * 1 / 5) and better.n_replicates == 4  # no d <= 0: (1 + 0) / (B + 1)
    mixed = stats.paired_difference(1.0, 0.0, [-1.0, 1.0, 2.0, 3.0], [0.0] * 4)
    assert mixed.p_value == pytest.approx(2 * 2 / 5)  # one d <= 0
    same = stats.paired_difference(0.7, 0.7, [0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    assert same.p_value == 1.0 and (same.low, same.high) == (0.0, 0.0)


def test_paired_difference_edge_cases():
    with pytest.raises(ValueError, match="same draws"):
        stats.paired_difference(0.0, 0.0, [1.0, 2.0], [1.0])
    with pytest.warns(RuntimeWarning, match="no finite replicate pair"):
        nan = stats.paired_difference(1.0, 0.0, [float("nan")], [0.0])
    assert math.isnan(nan.p_value) and nan.n_replicates == 0 and nan.difference == 1.0


def test_minmax_normalise_hand_computed():
    np.testing.assert_array_equal(stats.minmax_normalise([1.0, 3.0, float("nan"), 2.0]), [0.0, 1.0, np.nan, 0.5])
    assert np.isnan(stats.minmax_normalise([2.0, 2.0])).all()  # no scale
    rows = stats.minmax_normalise([[0.0, 2.0, 1.0], [5.0, 5.0, 5.0]], axis=-1)
    np.testing.assert_array_equal(rows[0], [0.0, 1.0, 0.5])
    assert np.isnan(rows[1]).all()


@pytest.mark.parametrize(("x", "y", "method", "expected"), [
    ([1, 2, 3, 4], [1, 3, 2, 4], "spearman", 0.8),                          # 1 - 6 * 2 / (4 * 15)
    ([1, 2, 2, 3], [1, 2, 3, 4], "spearman", 4.5 / math.sqrt(4.5 * 5.0)),   # average ranks 1, 2.5, 2.5, 4
    ([1, 2, 3, 4], [1, 3, 2, 4], "kendall", 4 / 6),                         # 5 concordant, 1 discordant pair
    ([1, 2, 2, 3], [1, 2, 3, 4], "kendall", 5 / math.sqrt(5 * 6)),          # tau-b: one pair tied in x
    ([1, 2], [3, 5], "spearman", 1.0),
    ([4, 3, 2, 1], [1, 2, 3, 4], "kendall", -1.0),
])
def test_rank_correlations_hand_computed(x, y, method, expected):
    assert stats.rank_correlation(x, y, method) == pytest.approx(expected)
    reference = spearmanr(x, y).statistic if method == "spearman" else kendalltau(x, y).statistic
    assert stats.rank_correlation(x, y, method) == pytest.approx(reference)


def test_rank_correlation_edge_cases():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(stats.rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.warns(RuntimeWarning, match="1 usable pair"):
        assert math.isnan(stats.rank_correlation([1, float("nan")], [1, 2], "kendall"))
    assert stats.rank_correlation([1, 2, float("nan"), 3], [1, 2, 0, 3]) == pytest.approx(1.0)  # NaN pair left out
    with pytest.raises(ValueError, match="pearson"):
        stats.rank_correlation([1, 2], [1, 2], "pearson")
    with pytest.raises(ValueError, match="differ in length"):
        stats.rank_correlation([1, 2], [1, 2, 3])


def test_correlation_test_with_two_units_is_exact_and_uninformative():
    """Two methods: rho = 1, both orderings reach |rho| = 1 (p = 1); the resamples that draw one method twice are
    constant and left out, the others reproduce rho = 1."""
    result = stats.correlation_test([0.2, 0.9], [0.1, 0.3], replicates=200, seed=0)
    assert result.estimate == 1.0 and result.p_value == 1.0 and result.exact and result.n == 2
    assert (result.low, result.high) == (1.0, 1.0)
    assert 60 < result.n_replicates < 140  # about half of 200


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_correlation_test_exact_permutation_p_value(method):
    # rho = tau = 1 on four units: of the 24 orderings of y only the identity and the reversal reach |r| = 1
    result = stats.correlation_test([1, 2, 3, 4], [10, 20, 30, 40], method=method, permutations=24)
    assert result.estimate == pytest.approx(1.0) and result.exact
    assert result.p_value == pytest.approx(2 / 24)


def test_correlation_test_monte_carlo_p_value_and_interval():
    x = np.arange(9.0)
    result = stats.correlation_test(x, x ** 2, permutations=2000, replicates=300, seed=1)
    assert not result.exact and result.estimate == pytest.approx(1.0)
    assert result.p_value < 0.005  # (1 + #) / 2001; |rho| = 1 is reached by 2 of 9! orderings
    assert result.low == pytest.approx(1.0) and result.high == pytest.approx(1.0)  # monotone: every resample rho 1
    noisy = stats.correlation_test(x, [3, 1, 4, 1, 5, 9, 2, 6, 5], replicates=300, seed=1)
    assert noisy.low < noisy.estimate < noisy.high and 0.0 < noisy.p_value < 1.0


def test_correlation_test_of_a_constant_column_is_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="constant"):
        result = stats.correlation_test([0.5, 0.5, 0.5], [1, 2, 3])
    assert all(math.isnan(v) for v in (result.estimate, result.low, result.high, result.p_value))


def test_correlation_test_is_seeded():
    args = ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.correlation_test(*args, seed=4) == stats.correlation_test(*args, seed=4)


def test_mean_and_spread():
    assert stats.mean_and_spread([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    mean, spread = stats.mean_and_spread([0.5, float("nan")])
    assert mean == 0.5 and math.isnan(spread)
