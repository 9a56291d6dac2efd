"""Frechet distance and KID on small dimensions."""

import numpy as np
import pytest
import scipy.linalg

from optim.metrics.distribution import FeatureRows, GaussianStats, frechet_distance, kernel_inception_distance


def test_frechet_hand_computed_diagonal():
    # 1-D: N(0, 1) vs N(3, 4): (0-3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 9 + 5 - 4 = 10
    a = GaussianStats(mu=np.zeros(1), sigma=np.eye(1), n=10)
    b = GaussianStats(mu=np.array([3.0]), sigma=4 * np.eye(1), n=10)
    assert frechet_distance(a, b) == pytest.approx(10.0)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    y = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d = x.mean(0) - y.mean(0)
    expected = d @ d + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_rejects_tiny_sets_and_mismatched_dims():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStats.from_features(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(np.zeros((3, 2)), np.zeros((3, 4)))


def test_kid_hand_computed_and_unbiased():
    # d = 1, kernel (xy + 1)^3; x = {0, 1}, y = {0, 2}
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    kxx_off = 2 * (0 * 1 + 1) ** 3
    kyy_off = 2 * (0 * 2 + 1) ** 3
    kxy = [(0 + 1) ** 3, (0 + 1) ** 3, (0 + 1) ** 3, (2 + 1) ** 3]
    expected = kxx_off / 2 + kyy_off / 2 - 2 * np.mean(kxy)
    assert kernel_inception_distance(x, y) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    same = [kernel_inception_distance(rng.normal(size=(30, 4)), rng.normal(size=(30, 4))) for _ in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))  # unbiased: ~0 for one distribution
    shifted = kernel_inception_distance(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 2.0)
    assert shifted > 10 * np.std(same)
    with pytest.warns(RuntimeWarning):
        assert np.isnan(kernel_inception_distance(x[:1], y))


# d = 30 > n: frechet_distance's d x d covariance is rank-deficient and the square roots of its round-off zeros
# (~1e-8 each) shift it; the tolerance allows for that
@pytest.mark.parametrize(("d", "rel"), [(4, 1e-10), (30, 1e-6)])
def test_feature_rows_fid_equals_the_frechet_distance(d, rel):
    rng = np.random.default_rng(d)
    reference = rng.normal(size=(40, d))
    rows = rng.normal(0.3, 1.2, size=(12, d))
    stats = GaussianStats.from_features(reference)
    prepared = FeatureRows(stats, rows)
    for pick in ([0, 1, 2, 3, 4], [5, 5, 7, 11, 2, 2, 0], list(range(12))):
        assert prepared.fid(pick) == pytest.approx(frechet_distance(stats, rows[pick]), rel=rel)
    with pytest.raises(ValueError, match=">= 2 rows"):
        prepared.fid([3])
    with pytest.raises(ValueError, match="outside"):
        prepared.fid([0, 12])
