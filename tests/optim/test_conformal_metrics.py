"""Conformal p-values, Benjamini-Hochberg q-values and Clopper-Pearson intervals."""

import numpy as np
import pytest
import torch
from scipy import stats

from optim.metrics.conformal import benjamini_hochberg, clopper_pearson, conformal_p_values, rejection_rate


def test_p_values_hand_computed_with_ties():
    calibration = [1.0, 2.0, 2.0, 3.0]
    # s=2: #{c >= 2} = 3 (ties count against the test score) -> 4/5; s=3.5: 1/5; s=0: 5/5
    p = conformal_p_values(calibration, [2.0, 3.5, 0.0])
    assert p == pytest.approx([0.8, 0.2, 1.0])
    assert conformal_p_values(torch.tensor(calibration), torch.tensor([2.5])) == pytest.approx([0.4])


def test_p_values_without_calibration_are_one():
    with pytest.warns(RuntimeWarning, match="no calibration score"):
        assert conformal_p_values([], [0.1, 5.0]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        conformal_p_values([1.0, float("nan")], [0.5])


def test_p_values_are_valid_for_exchangeable_healthy_scores():
    # 19 calibration scores: P(p <= 0.05) = 1/20 exactly (only the largest of 20 exchangeable scores).
    rng = np.random.default_rng(0)
    trials = 4000
    hits = sum(conformal_p_values(rng.gamma(2.0, size=19), rng.gamma(2.0, size=1))[0] <= 0.05 for _ in range(trials))
    assert hits / trials == pytest.approx(0.05, abs=0.012)
    # Shifted (anomalous) scores are rejected far more often.
    shifted = sum(conformal_p_values(rng.gamma(2.0, size=19), rng.gamma(2.0, size=1) + 4)[0] <= 0.05
                  for _ in range(500))
    assert shifted / 500 > 0.5


def test_benjamini_hochberg_hand_computed_and_against_scipy():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 -> m p / rank = 0.04, 0.06, 0.0533, 0.5 -> running minimum from the top
    assert benjamini_hochberg(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    rng = np.random.default_rng(1)
    many = np.r_[rng.random(50), rng.random(10) * 1e-3, [0.3, 0.3]]  # with ties
    assert benjamini_hochberg(many) == pytest.approx(stats.false_discovery_control(many, method="bh"))
    assert benjamini_hochberg([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.2, 1.5])


def test_clopper_pearson_hand_computed_and_against_scipy():
    zero = clopper_pearson(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(1 - 0.025 ** (1 / 10))
    for k, n in ((0, 10), (3, 60), (7, 7), (12, 200)):
        ours = clopper_pearson(k, n)
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high))
        assert ours.estimate == pytest.approx(k / n)
    assert clopper_pearson(3, 60).contains(0.05) and not clopper_pearson(20, 60).contains(0.05)


def test_clopper_pearson_edge_cases():
    with pytest.warns(RuntimeWarning, match="n = 0"):
        empty = clopper_pearson(0, 0)
    assert (empty.low, empty.high) == (0.0, 1.0) and np.isnan(empty.estimate)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 3, confidence=1.0)


def test_rejection_rate_counts_p_at_or_below_alpha():
    out = rejection_rate([0.01, 0.05, 0.2, 0.5], 0.05)
    assert (out.k, out.n) == (2, 4) and out.estimate == 0.5
    with pytest.raises(ValueError, match="alpha"):
        rejection_rate([0.1], 0.0)


def test_acceptance_interval_is_beta_binomial_and_holds_its_level():
    from optim.metrics.conformal import fpr_acceptance_interval

    # n = 19, alpha = 0.05: k = 1, the FPR given the calibration set is Beta(1, 19); m = 1 -> P(K = 1) = 1/20,
    # more than the upper 2.5 % tail (K = 1 is in the 95 % range), less than the upper 10 % tail (it is not).
    assert fpr_acceptance_interval(19, 1, 0.05) == (0.0, 1.0)
    assert fpr_acceptance_interval(19, 1, 0.05, confidence=0.8) == (0.0, 0.0)
    assert fpr_acceptance_interval(10, 50, 0.05) == (0.0, 0.0)  # 1/11 > 0.05: no p-value can be that small
    assert np.isnan(fpr_acceptance_interval(10, 0, 0.05)[0])
    # Simulated valid calibrations: the beta-binomial range holds its level, a Clopper-Pearson check of alpha
    # does not (it ignores that the 19 calibration scores are random too).
    rng = np.random.default_rng(0)
    low, high = fpr_acceptance_interval(19, 200, 0.05)
    outside_bb = outside_cp = 0
    for _ in range(400):
        k = int((conformal_p_values(rng.random(19), rng.random(200)) <= 0.05).sum())
        outside_bb += not low <= k / 200 <= high
        outside_cp += not clopper_pearson(k, 200).contains(0.05)
    assert outside_bb / 400 <= 0.06 and outside_cp / 400 > 0.3
    with pytest.raises(ValueError, match="alpha and confidence"):
        fpr_acceptance_interval(19, 10, 1.5)


def test_unit_scores_interpolate_one_minus_p_and_keep_every_ranking():
    from optim.metrics.conformal import unit_scores

    calibration = [1.0, 2.0, 2.0, 4.0]  # knots 1, 2, 4 at 1/5, 3/5 (two cases share 2), 4/5
    out = unit_scores(calibration, np.array([1.0, 1.5, 2.0, 3.0, 4.0]))
    assert out == pytest.approx([0.2, 0.4, 0.6, 0.7, 0.8])
    # Tails: hyperbolic with w = 4 - 1, continuous at both ends, inside (0, 1).
    assert unit_scores(calibration, [0.0, 10.0]) == pytest.approx([0.2 / (1 + 1 / 3), 1 - 0.2 / (1 + 6 / 3)])
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 30.0, 500)  # far beyond the calibration range on both sides
    mapped = unit_scores(rng.normal(2.0, 1.0, 30), values)
    assert ((0 < mapped) & (mapped < 1)).all()
    assert (np.argsort(mapped, kind="stable") == np.argsort(values, kind="stable")).all()  # strictly increasing
    # Never below 1 - p, at most 1 / (n + 1) above it for distinct calibration scores.
    cal = rng.normal(size=19)
    gap = unit_scores(cal, values) - (1 - conformal_p_values(cal, values))
    assert gap.min() >= -1e-12 and gap.max() <= 1 / 20 + 1e-12
    assert unit_scores([3.0], [2.0, 3.0, 4.0]) == pytest.approx([0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="at least one"):
        unit_scores([], [1.0])


def test_uniformity_test_flags_p_values_shifted_towards_zero():
    from optim.metrics.conformal import uniformity_test

    rng = np.random.default_rng(0)
    assert uniformity_test(rng.random(200)) > 0.05
    assert uniformity_test(rng.random(200) ** 3) < 1e-6  # stochastically smaller: a shift
    assert uniformity_test(1 - rng.random(200) ** 3) > 0.5  # larger p-values are not a shift (one-sided)
    with pytest.warns(RuntimeWarning, match="no p-values"):
        assert np.isnan(uniformity_test([]))
