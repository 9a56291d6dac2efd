"""RQI, AHI, CACI and the SSIM they use."""

import warnings

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from optim.metrics.distribution import FeatureRows, GaussianStats, frechet_distance, kernel_inception_distance
from optim.metrics.normative import (
    ahi,
    ahi_equal_n,
    ahi_equal_n_rows,
    ahi_unclipped,
    caci,
    caci_per_image,
    combined_score,
    harmonic_mean,
    masked_mean,
    rqi,
    rqi_per_image,
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


def test_unclipped_ahi_hand_computed_ranks_what_the_clip_ties():
    assert ahi_unclipped(100, 40, 20) == pytest.approx(0.75)  # inside [0, 1]: the same as AHI
    assert ahi_unclipped(100, 120, 20) == pytest.approx(-0.25)  # 20 further than P, gap 80
    assert ahi_unclipped(100, 260, 20) == pytest.approx(-2.0)  # worse still; both clip to AHI 0
    assert ahi_unclipped(100, 10, 20) == pytest.approx(1.125)
    with pytest.warns(RuntimeWarning, match="not positive"):
        assert np.isnan(ahi_unclipped(20, 10, 30))


def test_ahi_equal_n_removes_the_small_sample_bias():
    # U, P and R(P) all from N's distribution: at equal n FID(P,N) - FID(U,N) is ~0 on average; comparing
    # P at n=300 with U at n=60 (the unequal-n version) gives a large negative gap (FID is biased by ~d/n).
    d = 16
    equal, unequal = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n_feat, u_feat = rng.normal(size=(600, d)), rng.normal(size=(60, d))
        p_feat, r_feat = rng.normal(size=(300, d)), rng.normal(size=(300, d))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # AHI itself is undefined without a gap
            out = ahi_equal_n(n_feat, u_feat, p_feat, r_feat, draws=5, seed=0)
        assert (out["n_fid"], out["n_u"], out["n_p"], out["n_reference"], out["draws"]) == (60, 60, 300, 600, 5)
        equal.append(out["fid_p"] - out["fid_u"])
        stats = GaussianStats.from_features(n_feat)
        unequal.append(frechet_distance(stats, p_feat) - frechet_distance(stats, u_feat))
        assert out["fid_u"] == pytest.approx(frechet_distance(stats, u_feat))  # U is the smallest set: used whole
    assert abs(np.mean(equal)) < 0.25, equal
    assert np.mean(unequal) < -0.8, unequal  # what the equal-n rule removes


def test_ahi_equal_n_pairs_restorations_with_their_inputs_and_is_seeded():
    rng = np.random.default_rng(0)
    d = 6
    n_feat, u_feat = rng.normal(size=(400, d)), rng.normal(size=(40, d))
    p_feat = rng.normal(size=(120, d)) + 1.5  # pathological inputs, shifted
    # R(P) = P row by row: the same rows must be drawn for both, so the FIDs agree exactly and AHI is 0.
    same = ahi_equal_n(n_feat, u_feat, p_feat, p_feat.copy(), draws=3, seed=1)
    assert same["fid_rp"] == same["fid_p"] and same["ahi"] == 0.0
    healed = ahi_equal_n(n_feat, u_feat, p_feat, rng.normal(size=(120, d)), draws=3, seed=1)
    assert healed["ahi"] > 0.85 and healed["fid_p"] > 5 * healed["fid_u"]
    again = ahi_equal_n(torch.from_numpy(n_feat), u_feat, p_feat, p_feat.copy(), draws=3, seed=1)
    assert again == same
    other = ahi_equal_n(n_feat, u_feat, p_feat, p_feat.copy(), draws=3, seed=2)
    assert other["fid_p"] != same["fid_p"]
    assert same["kid_p"] == pytest.approx(kernel_inception_distance(n_feat, p_feat))  # KID on the full sets
    with pytest.raises(ValueError, match="row-aligned"):
        ahi_equal_n(n_feat, u_feat, p_feat, p_feat[:10])
    with pytest.raises(ValueError, match="reference_stats"):
        ahi_equal_n(n_feat, u_feat, p_feat, p_feat, reference_stats=GaussianStats.from_features(n_feat[:50]))


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
    # arrays element-wise (the study's bootstrap replicates), a float for scalars
    np.testing.assert_allclose(combined_score([0.9, 0.5], [0.49, 0.0], [0.45, 1.0]), [(0.6 + 0.49) / 2, (2 / 3) / 2])
    assert isinstance(combined_score(0.9, 0.49, 0.45), float)


def test_per_image_terms_are_what_the_indices_average():
    np.testing.assert_allclose(rqi_per_image([1.0, 0.5, -0.2], [0.0, 0.2, 1.3]), [1.0, 0.4, 0.0])
    per = caci_per_image([0.9, 1.0, np.nan], [0.5, 0.0, 0.3])
    np.testing.assert_allclose(per, [2 * 0.9 * 0.5 / 1.4, 0.0, np.nan])
    assert np.nanmean(per) == pytest.approx(caci([0.9, 1.0, np.nan], [0.5, 0.0, 0.3])["caci"])


def test_ahi_of_rows_matches_ahi_equal_n_and_a_resample():
    rng = np.random.default_rng(5)
    d = 6
    reference = rng.normal(size=(50, d))
    healthy = rng.normal(size=(8, d))
    pathological = rng.normal(1.0, 1.0, size=(14, d))
    restored = 0.5 * pathological + 0.5 * rng.normal(size=(14, d))
    stats = GaussianStats.from_features(reference)
    rows = FeatureRows(stats, np.concatenate([healthy, pathological, restored]))
    u, p, r = np.arange(8), 8 + np.arange(14), 22 + np.arange(14)
    direct = ahi_equal_n(reference, healthy, pathological, restored, draws=3, seed=9)
    via_rows = ahi_equal_n_rows(rows, u, p, r, draws=3, seed=9)
    for key in ("ahi", "fid_u", "fid_p", "fid_rp", "n_fid"):
        assert via_rows[key] == pytest.approx(direct[key], rel=1e-10)
    iu, ip = rng.integers(0, 8, 8), rng.integers(0, 14, 14)  # a bootstrap resample: repeats allowed
    resampled = ahi_equal_n(reference, healthy[iu], pathological[ip], restored[ip], draws=3, seed=9)
    assert ahi_equal_n_rows(rows, u[iu], p[ip], r[ip], draws=3, seed=9)["ahi"] == pytest.approx(resampled["ahi"])
    with pytest.raises(ValueError, match="restored rows"):
        ahi_equal_n_rows(rows, u, p, r[:-1])
