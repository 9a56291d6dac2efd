"""RQI, AHI, CACI and the SSIM they use."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from optim.metrics.normative import (
    ahi,
    caci,
    combined_score,
    harmonic_mean,
    masked_mean,
    rqi,
    ssim_maps,
    ssim_per_image,
)


def test_ssim_matches_skimage_and_identity():
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 24, 24))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    values = ssim_per_image(torch.from_numpy(x), torch.from_numpy(y))
    assert values[0] == pytest.approx(structural_similarity(x[0, 0], y[0, 0], data_range=1.0))
    assert ssim_per_image(x, x) == pytest.approx([1.0, 1.0])
    maps = ssim_maps(x, y)
    assert maps.shape == (2, 24, 24)
    full_mask = np.ones((2, 1, 24, 24))
    assert masked_mean(maps, full_mask) == pytest.approx(maps.reshape(2, -1).mean(1))


def test_masked_mean_hand_computed_and_empty_mask():
    maps = np.arange(4, dtype=float).reshape(1, 2, 2)
    mask = np.array([[[1, 0], [0, 1]]], dtype=float)
    assert masked_mean(maps, mask)[0] == pytest.approx(1.5)
    with pytest.warns(RuntimeWarning, match="empty mask"):
        assert np.isnan(masked_mean(maps, np.zeros_like(mask))[0])


def test_rqi_hand_computed():
    out = rqi([1.0, 0.5], [0.0, 0.2], [0.01, 0.03])
    assert out["rqi"] == pytest.approx((1.0 + 0.5 * 0.8) / 2)
    assert out["ssim_mean"] == 0.75 and out["lpips_mean"] == pytest.approx(0.1) and out["mae_mean"] == 0.02
    assert out["n"] == 2
    clipped = rqi([-0.2], [1.3], [0.5])  # factors clipped to [0,1]: RQI stays in [0,1]
    assert clipped["rqi"] == 0.0 and clipped["ssim_mean"] == -0.2
    with pytest.warns(RuntimeWarning):
        assert np.isnan(rqi([], [], [])["rqi"])


def test_ahi_hand_computed_clipped_and_undefined():
    assert ahi(fid_pathological=100, fid_restored=40, fid_healthy=20) == pytest.approx(0.75)
    assert ahi(100, 120, 20) == 0.0  # restoration moved away from healthy
    assert ahi(100, 10, 20) == 1.0  # closer than unseen healthy images: clipped
    with pytest.warns(RuntimeWarning, match="not positive"):
        assert np.isnan(ahi(20, 10, 20))


def test_caci_hand_computed_and_edge_cases():
    out = caci([0.9, 1.0], [0.5, 0.0])
    assert out["caci"] == pytest.approx((2 * 0.9 * 0.5 / 1.4 + 0.0) / 2)
    assert out["conservation_mean"] == pytest.approx(0.95) and out["n"] == 2
    assert caci([0.8, np.nan], [0.2, 0.3])["n"] == 1  # NaN component (empty region) skipped
    with pytest.warns(RuntimeWarning):
        assert np.isnan(caci([np.nan], [np.nan])["caci"])


def test_harmonic_mean_and_combined_score():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    # ((hm(0.9, 0.45) = 0.6) + 0.49) / 2
    assert combined_score(0.9, 0.49, 0.45) == pytest.approx((0.6 + 0.49) / 2)
