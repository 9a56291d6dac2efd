"""optim.metrics.resampled: AUROC from counts and per-image pixel histograms."""

import numpy as np
import pytest

from optim.metrics.classification import auroc
from optim.metrics.resampled import auroc_from_counts, pixel_histograms, score_bins
from optim.metrics.segmentation import pixel_auroc_auprc


def test_auroc_from_counts_hand_computed():
    # positives at scores 1, 2; negatives at 0, 0, 1: pairs won 2 + 0.5 + 3 = 5.5 of 6
    assert auroc_from_counts([0, 1, 1], [2, 1, 0]) == pytest.approx(5.5 / 6)
    assert auroc([1, 2, 0, 0, 1], [1, 1, 0, 0, 0]) == pytest.approx(5.5 / 6)
    batched = auroc_from_counts([[0, 1, 1], [1, 0, 0]], [[2, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(batched, [5.5 / 6, 0.0])
    with pytest.warns(RuntimeWarning, match="one class only"):
        assert np.isnan(auroc_from_counts([0, 0], [1, 2]))
    with pytest.raises(ValueError, match="differ"):
        auroc_from_counts([1], [1, 2])


def test_weighted_counts_give_the_auroc_of_the_resampled_scores():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(12), 1)  # rounding makes ties
    labels = np.r_[np.ones(5), np.zeros(7)]
    weights = rng.integers(0, 3, size=12).astype(float)
    weights[0] = weights[6] = 1  # both classes drawn
    values, index = score_bins(scores)
    assert np.array_equal(values[index], scores)
    pos = np.bincount(index, weights=weights * labels, minlength=values.size)
    neg = np.bincount(index, weights=weights * (1 - labels), minlength=values.size)
    repeats = weights.astype(int)
    assert auroc_from_counts(pos, neg) == pytest.approx(auroc(np.repeat(scores, repeats), np.repeat(labels, repeats)))


def test_pixel_histograms_hand_computed_bound_is_reached():
    maps = np.array([[[[0.1, 0.2], [0.3, 0.4]]]])
    masks = np.array([[[[0, 1], [0, 1]]]])
    hist = pixel_histograms(maps, masks, bins=2)  # one edge at the median 0.25: bins {0.1, 0.2}, {0.3, 0.4}
    np.testing.assert_allclose(hist.edges, [0.25])
    assert hist.anomaly.tolist() == [[1, 1]] and hist.healthy.tolist() == [[1, 1]]
    binned = float(auroc_from_counts(hist.anomaly.sum(0), hist.healthy.sum(0)))
    exact = pixel_auroc_auprc(maps, masks)["auroc_pooled"]
    assert binned == 0.5 and exact == 0.75  # 0.2 > 0.1 and 0.4 > both: 3 of 4 pairs
    assert hist.bound == 0.25 and abs(binned - exact) <= hist.bound


def test_pixel_histograms_respect_the_region():
    maps = np.array([[[[0.1, 0.2], [0.3, 0.4]]]])
    masks = np.array([[[[0, 1], [0, 1]]]])
    region = np.array([[[[1, 1], [0, 1]]]])  # 0.3 (healthy) not counted
    hist = pixel_histograms(maps, masks, region, bins=8)
    assert hist.anomaly.sum() == 2 and hist.healthy.sum() == 1
    assert float(auroc_from_counts(hist.anomaly.sum(0), hist.healthy.sum(0))) == \
        pixel_auroc_auprc(maps, masks, region)["auroc_pooled"] == 1.0
    with pytest.raises(ValueError, match="region is empty"):
        pixel_histograms(maps, masks, np.zeros_like(region))


def test_pooled_pixel_auroc_from_histograms_is_within_the_bound_of_the_exact_value():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 1, 16, 16))
    masks[:, :, 4:9, 5:11] = 1
    maps = rng.gamma(2.0, 1.0, masks.shape) + 1.5 * masks * rng.random(masks.shape)
    maps[:, :, :2] = 0.0  # a block of exact ties (many pixels at one value)
    region = np.ones_like(masks)
    region[:, :, -1] = 0
    hist = pixel_histograms(maps, masks, region)
    exact = pixel_auroc_auprc(maps, masks, region)["auroc_pooled"]
    binned = float(auroc_from_counts(hist.anomaly.sum(0), hist.healthy.sum(0)))
    assert abs(binned - exact) <= hist.bound < 2e-3
    # a resample (images 0, 0, 3) pools the histograms with multiplicities: the same as pooling the maps
    pick = [0, 0, 3]
    weights = np.bincount(pick, minlength=6).astype(float)
    resampled = float(auroc_from_counts(weights @ hist.anomaly, weights @ hist.healthy))
    assert resampled == pytest.approx(pixel_auroc_auprc(maps[pick], masks[pick], region[pick])["auroc_pooled"],
                                      abs=2 * hist.bound + 1e-12)
