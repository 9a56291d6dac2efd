"""The normative-learning indices RQI, AHI and CACI and the SSIM they use.

Definitions and what each index measures: docs/methods.md#evaluation-metrics-and-normative-indices.

The reference paper's exact formulas were not available; these are **the project's definitions**,
consistent with the reference code's inputs:

* **RQI** (restoration quality on unseen healthy images H): per image SSIM(x_rec, x), LPIPS(x_rec, x) and
  MAE; RQI = mean over H of SSIM * (1 - LPIPS). Each factor is clipped to [0,1] (SSIM can be slightly
  negative, LPIPS can exceed 1) so that RQI lies in [0,1]; the unclipped component means are reported too.
* **AHI** (anomaly-to-healthy) = clip((FID(P,N) - FID(R(P),N)) / (FID(P,N) - FID(U,N)), 0, 1): the fraction of
  the feature-space gap between pathological inputs P and unseen healthy images U (both against the
  healthy training set N) that the restorations R(P) close. NaN when the gap is not positive. FID is biased
  upwards by an amount that shrinks with n, so the three FIDs are compared at equal n
  (:func:`ahi_equal_n`: repeated subsampling without replacement to the smallest set's n).
* **CACI** (conservation and correction, per annotated image): C = SSIM(x_rec, x) averaged inside the
  healthy-tissue mask, K = 1 - SSIM(x_rec, x) averaged inside the anomaly mask, both clipped to [0,1];
  CACI = mean over images of the harmonic mean 2CK / (C + K) (0 when C + K = 0).

SSIM: one implementation everywhere, scikit-image's ``structural_similarity`` with its defaults (7x7
uniform window, K1=0.01, K2=0.03) and ``data_range=1`` (images in [0,1]). The global SSIM is scikit-image's
mean (which crops the (win-1)/2 border); the masked SSIM is the mean of the full SSIM map inside the mask.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from optim.metrics.distribution import FeatureRows, GaussianStats, as_features, kernel_inception_distance
from optim.metrics.segmentation import per_image

SSIM_DATA_RANGE = 1.0


def _images(values: Any, name: str) -> np.ndarray:
    """[N,1,H,W]/[N,H,W] tensor or array -> float64 numpy [N,H,W] (a copy)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected [N,1,H,W] or [N,H,W], got shape {array.shape}")
    return array


def ssim_per_image(x: Any, y: Any) -> np.ndarray:
    """Global SSIM of each image pair: x, y [N,1,H,W] in [0,1] -> [N] (data_range=1)."""
    a, b = _images(x, "x"), _images(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"ssim_per_image: shapes differ {a.shape} vs {b.shape}")
    return np.array([structural_similarity(a[i], b[i], data_range=SSIM_DATA_RANGE) for i in range(a.shape[0])])


def ssim_maps(x: Any, y: Any) -> np.ndarray:
    """Full SSIM maps: x, y [N,1,H,W] in [0,1] -> [N,H,W] (data_range=1)."""
    a, b = _images(x, "x"), _images(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"ssim_maps: shapes differ {a.shape} vs {b.shape}")
    return np.stack([structural_similarity(a[i], b[i], data_range=SSIM_DATA_RANGE, full=True)[1]
                     for i in range(a.shape[0])])


def masked_mean(maps: Any, masks: Any) -> np.ndarray:
    """Mean of each [H,W] map inside its {0,1} mask: [N]; NaN (with a warning) for empty masks."""
    m = per_image(maps, "maps")
    k = per_image(masks, "masks") > 0.5
    if m.shape != k.shape:
        raise ValueError(f"masked_mean: maps {m.shape} and masks {k.shape} differ")
    counts = k.sum(axis=1)
    if (counts == 0).any():
        warnings.warn(f"masked_mean: {int((counts == 0).sum())} empty mask(s) give NaN", RuntimeWarning, stacklevel=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (m * k).sum(axis=1) / np.maximum(counts, 1), np.nan)


def harmonic_mean(a: Any, b: Any) -> np.ndarray:
    """Element-wise 2ab / (a + b), 0 where a + b = 0; inputs expected in [0,1]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    s = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, 2.0 * a * b / np.where(s > 0, s, 1.0), 0.0)


def rqi_per_image(ssim: Any, lpips: Any) -> np.ndarray:
    """Each image's RQI term clip(SSIM, 0, 1) * clip(1 - LPIPS, 0, 1): [N] in [0,1] from [N] SSIM and LPIPS."""
    s = np.asarray(ssim, dtype=np.float64).reshape(-1)
    p = np.asarray(lpips, dtype=np.float64).reshape(-1)
    return np.clip(s, 0.0, 1.0) * np.clip(1.0 - p, 0.0, 1.0)


def rqi(ssim: Any, lpips: Any, mae: Any) -> dict[str, float]:
    """Restoration Quality Index from per-image components on unseen healthy images.

    Args:
        ssim: [N] SSIM(x_rec, x).
        lpips: [N] LPIPS(x_rec, x).
        mae: [N] mean absolute error |x_rec - x|.

    Returns:
        ``{'rqi', 'ssim_mean', 'lpips_mean', 'mae_mean', 'n'}``; RQI in [0,1], NaN (warning) for N = 0.
    """
    s = np.asarray(ssim, dtype=np.float64).reshape(-1)
    p = np.asarray(lpips, dtype=np.float64).reshape(-1)
    e = np.asarray(mae, dtype=np.float64).reshape(-1)
    if not (s.size == p.size == e.size):
        raise ValueError(f"rqi: component sizes differ (ssim {s.size}, lpips {p.size}, mae {e.size})")
    if s.size == 0:
        warnings.warn("rqi: no images; returning NaN", RuntimeWarning, stacklevel=2)
        return {"rqi": float("nan"), "ssim_mean": float("nan"), "lpips_mean": float("nan"),
                "mae_mean": float("nan"), "n": 0.0}
    per = rqi_per_image(s, p)
    return {"rqi": float(per.mean()), "ssim_mean": float(s.mean()), "lpips_mean": float(p.mean()),
            "mae_mean": float(e.mean()), "n": float(s.size)}


def ahi_unclipped(fid_pathological: float, fid_restored: float, fid_healthy: float) -> float:
    """(FID(P,N) - FID(R(P),N)) / (FID(P,N) - FID(U,N)): the Anomaly-to-Healthy Index before its clip to [0, 1].

    Below 0 the restorations are further from the healthy training set N than the pathological inputs (in units of
    the gap between P and unseen healthy images U); above 1 closer to N than U is. The clipped :func:`ahi` is 0 for
    every method below 0, so only this value ranks them there.

    Returns NaN (with a warning) when the gap FID(P,N) - FID(U,N) is not positive: the pathological
    inputs are then no farther from the healthy training set than unseen healthy images.
    """
    gap = float(fid_pathological) - float(fid_healthy)
    if not np.isfinite(gap) or gap <= 0:
        warnings.warn(f"ahi: FID(P,N) - FID(U,N) = {gap:.4g} is not positive; AHI undefined (NaN)",
                      RuntimeWarning, stacklevel=3)
        return float("nan")
    return (float(fid_pathological) - float(fid_restored)) / gap


def ahi(fid_pathological: float, fid_restored: float, fid_healthy: float) -> float:
    """Anomaly-to-Healthy Index: clip((FID(P,N) - FID(R(P),N)) / (FID(P,N) - FID(U,N)), 0, 1)
    (:func:`ahi_unclipped`, clipped; NaN with a warning when the gap is not positive)."""
    value = ahi_unclipped(fid_pathological, fid_restored, fid_healthy)
    return value if math.isnan(value) else float(np.clip(value, 0.0, 1.0))


def ahi_equal_n(reference: Any, healthy: Any, pathological: Any, restored: Any, *, draws: int = 5, seed: int = 0,
                reference_stats: GaussianStats | None = None) -> dict[str, float]:
    """AHI with FID(U,N), FID(P,N) and FID(R(P),N) all computed at the same sample size n.

    Rule (subsampling, not a bootstrap): n = min(|U|, |P|); in each of ``draws`` draws of a seeded
    ``numpy`` generator, U and P are subsampled to n rows without replacement (a set of exactly n rows is
    used whole) and R(P) takes the same rows as P (``restored[j]`` is the restoration of
    ``pathological[j]``). Each FID is the mean over the draws; AHI is :func:`ahi` of the mean FIDs. The
    reference N is shared by all three FIDs and used whole. KID is unbiased at any n, so it is computed once
    on the full sets. The FIDs are taken in Gram form (:class:`optim.metrics.distribution.FeatureRows`, through
    :func:`ahi_equal_n_rows`): milliseconds each at n = 60 and d = 2048 instead of seconds for a d x d product
    and eigen-decomposition, the same value up to round-off.

    Args:
        reference: [n_N, d] features of the healthy training set N.
        healthy: [n_U, d] features of the unseen healthy set U.
        pathological: [n_P, d] features of the pathological inputs P.
        restored: [n_P, d] features of their restorations R(P), row-aligned with ``pathological``.
        draws: number of subsamples averaged (>= 1).
        seed: seed of the subsampling generator (same inputs and seed -> same values).
        reference_stats: ``GaussianStats`` of ``reference`` to reuse its square root across calls (else computed).

    Returns:
        ``ahi``, ``ahi_unclipped``, ``fid_u``, ``fid_p``, ``fid_rp`` (means over draws) with ``n_fid`` (the common n)
        and ``draws``; ``kid_u``, ``kid_p``, ``kid_rp`` on the full sets with ``n_u``, ``n_p``, ``n_reference``.
    """
    n_feat, u_feat = as_features(reference, "ahi_equal_n: reference"), as_features(healthy, "ahi_equal_n: healthy")
    p_feat, r_feat = as_features(pathological, "ahi_equal_n: pathological"), \
        as_features(restored, "ahi_equal_n: restored")
    if p_feat.shape != r_feat.shape:
        raise ValueError(f"ahi_equal_n: restored {r_feat.shape} must be row-aligned with pathological {p_feat.shape}")
    if draws < 1:
        raise ValueError(f"ahi_equal_n: draws must be >= 1, got {draws}")
    n = min(len(u_feat), len(p_feat))
    if n < 2:
        raise ValueError(f"ahi_equal_n: need >= 2 healthy and pathological feature vectors, got {len(u_feat)} "
                         f"and {len(p_feat)}")
    stats = reference_stats if reference_stats is not None else GaussianStats.from_features(n_feat)
    if stats.n != len(n_feat):
        raise ValueError(f"ahi_equal_n: reference_stats has n={stats.n} but reference has {len(n_feat)} rows")
    rows = FeatureRows(stats, np.concatenate([u_feat, p_feat, r_feat]))
    n_u, n_p = len(u_feat), len(p_feat)
    out = ahi_equal_n_rows(rows, np.arange(n_u), n_u + np.arange(n_p), n_u + n_p + np.arange(n_p), draws=draws,
                           seed=seed)
    return {**out, "draws": float(draws),
            "kid_u": kernel_inception_distance(n_feat, u_feat), "kid_p": kernel_inception_distance(n_feat, p_feat),
            "kid_rp": kernel_inception_distance(n_feat, r_feat), "n_u": float(len(u_feat)),
            "n_p": float(len(p_feat)), "n_reference": float(len(n_feat))}


def ahi_equal_n_rows(rows: FeatureRows, healthy: Any, pathological: Any, restored: Any, *, draws: int = 5,
                     seed: int = 0) -> dict[str, float]:
    """:func:`ahi_equal_n` on row indices of :class:`optim.metrics.distribution.FeatureRows`.

    The same rule and the same generator calls: n = min(|U|, |P|); in each of ``draws`` draws U and P are
    subsampled to n without replacement, R(P) takes P's positions; AHI of the mean FIDs. A bootstrap resample
    passes indices with repeats (rows drawn twice count twice).

    Args:
        rows: the prepared feature rows.
        healthy: [n_U] row indices of U.
        pathological: [n_P] row indices of P.
        restored: [n_P] row indices of R(P), position j the restoration of ``pathological[j]``.
        draws, seed: as in ``ahi_equal_n``.

    Returns:
        ``ahi`` (NaN with a warning when FID(P,N) <= FID(U,N)), ``ahi_unclipped``, ``fid_u``, ``fid_p``, ``fid_rp``,
        ``n_fid``.
    """
    u, p, r = (np.asarray(v, dtype=np.int64).reshape(-1) for v in (healthy, pathological, restored))
    if p.shape != r.shape:
        raise ValueError(f"ahi_equal_n_rows: {r.size} restored rows for {p.size} pathological rows")
    if draws < 1:
        raise ValueError(f"ahi_equal_n_rows: draws must be >= 1, got {draws}")
    n = min(u.size, p.size)
    if n < 2:
        raise ValueError(f"ahi_equal_n_rows: need >= 2 healthy and pathological rows, got {u.size} and {p.size}")
    rng = np.random.default_rng(seed)
    fids = np.zeros((draws, 3))
    for k in range(draws):
        u_pick = rng.choice(u.size, n, replace=False)
        p_pick = rng.choice(p.size, n, replace=False)
        fids[k] = [rows.fid(u[u_pick]), rows.fid(p[p_pick]), rows.fid(r[p_pick])]
    fid_u, fid_p, fid_rp = (float(v) for v in fids.mean(axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the same warning comes from ahi() below
        unclipped = ahi_unclipped(fid_p, fid_rp, fid_u)
    return {"ahi": ahi(fid_p, fid_rp, fid_u), "ahi_unclipped": unclipped, "fid_u": fid_u, "fid_p": fid_p,
            "fid_rp": fid_rp, "n_fid": float(n)}


def caci_per_image(conservation: Any, correction: Any) -> np.ndarray:
    """Each image's CACI term, the harmonic mean of clip(C, 0, 1) and clip(K, 0, 1): [N] in [0,1], NaN where C or K
    is NaN (no healthy or no anomaly region)."""
    c = np.asarray(conservation, dtype=np.float64).reshape(-1)
    k = np.asarray(correction, dtype=np.float64).reshape(-1)
    if c.size != k.size:
        raise ValueError(f"caci: sizes differ (conservation {c.size}, correction {k.size})")
    valid = np.isfinite(c) & np.isfinite(k)
    per = harmonic_mean(np.clip(np.where(valid, c, 0.0), 0.0, 1.0), np.clip(np.where(valid, k, 0.0), 0.0, 1.0))
    return np.where(valid, per, np.nan)


def caci(conservation: Any, correction: Any) -> dict[str, float]:
    """Conservation-And-Correction Index from per-image components.

    Args:
        conservation: [N] C = SSIM(x_rec, x) inside the healthy-tissue mask.
        correction: [N] K = 1 - SSIM(x_rec, x) inside the anomaly mask.

    Returns:
        ``{'caci', 'conservation_mean', 'correction_mean', 'n'}``; images with a NaN component are skipped.
    """
    c = np.asarray(conservation, dtype=np.float64).reshape(-1)
    k = np.asarray(correction, dtype=np.float64).reshape(-1)
    per = caci_per_image(c, k)
    valid = np.isfinite(per)
    if not valid.any():
        warnings.warn("caci: no image with both a healthy and an anomaly region; returning NaN", RuntimeWarning,
                      stacklevel=2)
        return {"caci": float("nan"), "conservation_mean": float("nan"), "correction_mean": float("nan"), "n": 0.0}
    c, k, per = c[valid], k[valid], per[valid]
    return {"caci": float(per.mean()), "conservation_mean": float(c.mean()), "correction_mean": float(k.mean()),
            "n": float(c.size)}


def combined_score(rqi_value: Any, ahi_value: Any, caci_value: Any) -> Any:
    """The cross-run comparison score ((harmonic mean of RQI and CACI) + AHI) / 2: a float for scalars, an array
    (element-wise) for arrays."""
    value = (harmonic_mean(rqi_value, caci_value) + np.asarray(ahi_value, dtype=np.float64)) / 2.0
    return float(value) if value.ndim == 0 else value
