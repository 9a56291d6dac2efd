"""Healthy thresholds, pixel AUROC/AUPRC, Dice, oracle Dice and size bins."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from optim.metrics.segmentation import (
    best_dice,
    dice_at_threshold,
    dice_per_image,
    fpr_at_threshold,
    lesion_size_bin,
    pixel_auroc_auprc,
    scaled_size_bins,
    threshold_at_fpr,
)


def test_threshold_hand_computed():
    maps = np.arange(10, dtype=float).reshape(1, 1, 2, 5)  # values 0..9
    r = threshold_at_fpr(maps, 0.2)
    # map > 7 flags {8, 9} = 20 %; map > 6 would flag 30 %
    assert r.threshold == 7.0 and r.achieved_fpr == pytest.approx(0.2) and r.region == "all"
    assert r.n_images == 1 and r.n_pixels == 10


def test_threshold_counts_foreground_only_and_says_so():
    maps = np.zeros((1, 1, 2, 2))
    maps[0, 0, 0, 0] = 5.0  # a hot background pixel
    fg = np.array([[[[0, 1], [1, 1]]]], dtype=float)
    r_all = threshold_at_fpr(maps, 0.1)
    r_fg = threshold_at_fpr(maps, 0.1, foreground=fg)
    assert r_all.threshold == 5.0  # 1 of 4 pixels at 0 would be 25 % > 10 %
    assert r_fg.threshold == 0.0 and r_fg.region == "foreground" and r_fg.n_pixels == 3


def test_threshold_mean_over_images_not_pooled():
    # image 0: 1 of 2 pixels hot; image 1: 0 of 8 -> mean FPR at 0 is 0.25 (pooled would be 0.1)
    a = np.zeros((2, 1, 2, 4))
    a[0, 0, 0, 0] = 1.0
    fg = np.zeros_like(a)
    fg[0, 0, 0, :2] = 1
    fg[1] = 1
    r = threshold_at_fpr(a, 0.2, foreground=fg)
    assert r.threshold == 1.0
    assert fpr_at_threshold(a, 0.0, fg) == pytest.approx(0.25)


def test_threshold_gives_requested_fpr_on_healthy_data():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.gamma(2.0, 1.0, size=(12, 1, 32, 32))).float()
    fg = torch.zeros_like(maps)
    fg[..., 4:28, 4:28] = 1
    for fpr in (0.01, 0.02, 0.05):
        r = threshold_at_fpr(maps, fpr, fg)
        achieved = fpr_at_threshold(maps, r.threshold, fg)
        assert achieved <= fpr
        assert achieved == pytest.approx(fpr, abs=0.002)  # continuous maps: as close as the pixel grid allows
        assert achieved == pytest.approx(r.achieved_fpr)


def test_threshold_constant_map_and_bad_input():
    r = threshold_at_fpr(np.ones((2, 1, 4, 4)), 0.05)
    assert r.threshold == 1.0 and r.achieved_fpr == 0.0
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(np.ones((1, 1, 2, 2)), 0.0)
    with pytest.raises(ValueError, match="no pixel"):
        threshold_at_fpr(np.ones((1, 1, 2, 2)), 0.1, foreground=np.zeros((1, 1, 2, 2)))


def test_pixel_auroc_auprc_pooled_and_per_image_against_sklearn():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 1, 8, 8))
    masks = (rng.random((3, 1, 8, 8)) > 0.8).astype(float)
    masks[2] = 0  # an image without lesion: skipped by the per-image mean
    out = pixel_auroc_auprc(maps, masks)
    assert out["auroc_pooled"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert out["auprc_pooled"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    per = np.mean([roc_auc_score(masks[i].ravel(), maps[i].ravel()) for i in range(2)])
    assert out["auroc_per_image_mean"] == pytest.approx(per)
    assert out["n_images_with_lesion"] == 2


def test_pixel_metrics_empty_masks_are_nan():
    with pytest.warns(RuntimeWarning):
        out = pixel_auroc_auprc(np.ones((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)))
    assert np.isnan(out["auroc_pooled"]) and np.isnan(out["auprc_per_image_mean"])


def test_dice_hand_computed_and_empty():
    maps = np.zeros((2, 1, 2, 2))
    maps[0, 0, 0, :] = 1.0  # predicts 2 pixels
    masks = np.zeros((2, 1, 2, 2))
    masks[0, 0, 0, 0] = 1  # 1 lesion pixel, overlap 1 -> Dice 2*1/(2+1)
    d = dice_at_threshold(maps, masks, 0.5)
    assert d["dice_pooled"] == pytest.approx(2 / 3) and d["dice_per_image_mean"] == pytest.approx(2 / 3)
    per = dice_per_image(maps, masks, 0.5)
    assert per[0] == pytest.approx(2 / 3) and np.isnan(per[1])  # empty mask and empty prediction
    with pytest.warns(RuntimeWarning):
        assert np.isnan(dice_at_threshold(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), 0.5)["dice_pooled"])


def test_best_dice_is_an_exact_oracle():
    maps = np.array([0.9, 0.8, 0.3, 0.2]).reshape(1, 1, 2, 2)
    masks = np.array([1, 1, 0, 0], dtype=float).reshape(1, 1, 2, 2)
    out = best_dice(maps, masks)
    assert out["oracle_best_dice_pooled"] == 1.0
    assert 0.3 <= out["oracle_best_threshold"] < 0.8
    assert dice_at_threshold(maps, masks, out["oracle_best_threshold"])["dice_pooled"] == 1.0
    rng = np.random.default_rng(3)
    m, g = rng.random((2, 1, 6, 6)), (rng.random((2, 1, 6, 6)) > 0.7).astype(float)
    best = best_dice(m, g)["oracle_best_dice_pooled"]
    grid = max(dice_at_threshold(m, g, t)["dice_pooled"] for t in np.unique(m))
    assert best == pytest.approx(max(grid, dice_at_threshold(m, g, -1)["dice_pooled"]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(best_dice(m, np.zeros_like(g))["oracle_best_dice_pooled"])


def test_size_bins_scale_with_area():
    assert scaled_size_bins([[1, 71]], 64 * 64) == [(0.25, 17.75)]
    masks = np.zeros((4, 1, 128, 128))
    masks[0, 0, :5, :5] = 1  # 25 px -> bin 0
    masks[1, 0, :10, :10] = 1  # 100 px -> bin 1
    masks[2, 0, :30, :30] = 1  # 900 px -> bin 2
    index, scaled = lesion_size_bin(masks)
    assert index.tolist() == [0, 1, 2, -1] and scaled[0] == (1.0, 71.0)
    small = masks[:, :, ::2, ::2]  # same lesions at 64x64: areas / 4, bins / 4
    assert lesion_size_bin(small)[0].tolist() == [0, 1, 2, -1]
