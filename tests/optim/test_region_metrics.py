"""AUPRO (hand-computed two-region case, ties, region, connectivity, a brute-force reference) and pixel TPR."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from optim.metrics.regions import aupro, pro_curve, tpr_at_threshold


def _two_regions(region_pixel_out: bool = False):
    """3x4 image: region A = (0,0),(0,1) with scores 0.9, 0.5; region B = (1,3) with 0.7; nine normal pixels, one
    of them (2,0) at 0.8, the others below 0.5."""
    mask = np.zeros((1, 1, 3, 4))
    mask[0, 0, 0, :2] = 1
    mask[0, 0, 1, 3] = 1
    scores = np.array([[0.9, 0.5, 0.30, 0.29], [0.28, 0.27, 0.26, 0.7], [0.8, 0.25, 0.24, 0.23]])
    region = np.ones_like(mask)
    if region_pixel_out:
        region[0, 0, 2, 0] = 0  # the hot normal pixel leaves the evaluation region
    return scores[None, None], mask, region


def test_aupro_two_regions_hand_computed():
    maps, masks, _ = _two_regions()
    # Curve: (0,0) -> t=0.9 (0, 1/4) -> t=0.8 (1/9, 1/4) -> t=0.7 (1/9, 3/4) -> t=0.5 (1/9, 1) -> ... -> (1, 1).
    # Area to 0.3: 1/4 * 1/9 + 1 * (0.3 - 1/9) = 0.3 - 0.75/9; normalised by 0.3.
    out = aupro(maps, masks)
    assert out["aupro"] == pytest.approx((0.3 - 0.75 / 9) / 0.3)
    assert out["aupro_n_regions"] == 2 and out["aupro_fpr_limit"] == 0.3
    # Up to exactly the first false positive only the quarter-overlap plateau counts.
    assert aupro(maps, masks, fpr_limit=1 / 9)["aupro"] == pytest.approx(0.25)
    # Each region weighs the same: pixel-pooled overlap at t=0.7 would be 2/3, PRO is (1/2 + 1) / 2.
    fpr, pro, n = pro_curve(maps, masks)
    assert n == 2 and pro[3] == pytest.approx(0.75) and fpr[3] == pytest.approx(1 / 9)


def test_aupro_region_excludes_pixels():
    maps, masks, region = _two_regions(region_pixel_out=True)
    # Without the hot normal pixel, PRO reaches 1 before any false positive: area 0.3 -> 1.
    assert aupro(maps, masks, region)["aupro"] == pytest.approx(1.0)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks), torch.from_numpy(region))["aupro"] == \
        pytest.approx(1.0)


def test_aupro_ties_switch_together_and_interpolate_at_the_limit():
    # One anomalous and one normal pixel with the same score: the curve jumps from (0,0) to (1,1) in one step,
    # so the area to 0.3 is the triangle 0.3^2 / 2 (interpolated at the limit), 0.15 normalised.
    maps = np.array([[[[0.4, 0.4]]]])
    masks = np.array([[[[1.0, 0.0]]]])
    assert aupro(maps, masks)["aupro"] == pytest.approx(0.15)
    assert aupro(maps, masks, fpr_limit=1.0)["aupro"] == pytest.approx(0.5)


def test_aupro_regions_are_8_connected_over_all_images():
    masks = np.zeros((2, 1, 4, 4))
    masks[0, 0, 0, 0] = masks[0, 0, 1, 1] = 1  # diagonal neighbours: one region
    masks[1, 0, 3, 3] = 1
    assert aupro(np.random.default_rng(0).random(masks.shape), masks)["aupro_n_regions"] == 2


def _brute_force_aupro(maps, masks, limit):
    """Independent reference: per threshold, count directly; integrate with np.interp at the limit."""
    regions = []
    for i in range(maps.shape[0]):
        labels, n = ndi.label(masks[i, 0] > 0.5, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = masks[:, 0] < 0.5
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps[:, 0] >= t
        xs.append((predicted & normal).sum() / normal.sum())
        ys.append(np.mean([predicted[i][r].mean() for i, r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    inside = xs <= limit
    x = np.r_[xs[inside], limit]
    y = np.r_[ys[inside], np.interp(limit, xs, ys)]
    return np.trapezoid(y, x) / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 1, 16, 16))
    for i in range(3):
        for _ in range(2):
            y, x = rng.integers(0, 12, 2)
            masks[i, 0, y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = 1
    maps = np.round(rng.random(masks.shape) + masks * rng.random() * 0.8, 2)  # ties from the rounding
    limit = 0.27  # not a curve point: the interpolation matters
    assert aupro(maps, masks, fpr_limit=limit)["aupro"] == pytest.approx(_brute_force_aupro(maps, masks, limit))


def test_aupro_degenerate_cases_give_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no ground-truth region"):
        assert np.isnan(aupro(np.ones((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)))["aupro"])
    with pytest.warns(RuntimeWarning, match="no normal pixel"):
        assert np.isnan(aupro(np.ones((1, 1, 4, 4)), np.ones((1, 1, 4, 4)))["aupro"])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="same shape"):
        aupro(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 3)))


def test_tpr_at_threshold_pooled_and_per_image():
    maps = np.zeros((3, 1, 2, 2))
    masks = np.zeros_like(maps)
    masks[0, 0, 0] = 1  # 2 anomaly pixels, one above 0.5
    maps[0, 0, 0, 0] = 0.9
    masks[1, 0] = 1  # 4 anomaly pixels, all above 0.5
    maps[1] = 0.6
    maps[2] = 1.0  # no anomaly: false positives do not enter a TPR
    out = tpr_at_threshold(maps, masks, 0.5)
    assert out["tpr_pooled"] == pytest.approx(5 / 6)
    assert out["tpr_per_image_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert tpr_at_threshold(maps, masks, 0.6)["tpr_pooled"] == pytest.approx(1 / 6)  # strict: 0.6 is not > 0.6
    with pytest.warns(RuntimeWarning, match="no anomaly pixel"):
        assert np.isnan(tpr_at_threshold(maps[2:], masks[2:], 0.5)["tpr_pooled"])
