"""Metrics in the form a bootstrap recomputes them: AUROC from counts, pixel histograms, FIDs of feature rows.

A study resamples images (see :mod:`optim.stats`); these functions turn what a run stores per image into the
metric of any resample without the maps or the model:

* :func:`auroc_from_counts`: AUROC from counts of positives and negatives per ordered bin, ties inside a bin
  counted 1/2. With one bin per distinct score it is exactly the Mann-Whitney AUROC
  (:func:`optim.metrics.classification.auroc`); a resample's image AUROC weights each image by how often it
  was drawn.
* :func:`pixel_histograms`: per image, the histogram of the anomaly map on anomaly pixels and on healthy
  pixels of the evaluation region, on one binning per dataset (:data:`PIXEL_BINS` bins at the quantiles of the
  dataset's region values). Summing the histograms of any multiset of images gives that multiset's pooled
  pixel AUROC through :func:`auroc_from_counts`; it differs from the exact pooled AUROC only inside bins that
  hold more than one distinct value, by at most ``bound`` (returned, typically ~1e-4).
* :class:`FeatureRows` and :func:`ahi_equal_n_rows`: the FID against a fixed reference set N of any multiset of
  stored feature rows (U, P, R(P)) through Gram matrices, O(n^2 d) per FID instead of a d x d eigen-
  decomposition, and the equal-n AHI of :func:`optim.metrics.normative.ahi_equal_n` on row indices (same
  draws, same value on the same rows).

Pure functions; inputs are never mutated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from optim.metrics.distribution import GaussianStats, as_features
from optim.metrics.normative import ahi
from optim.metrics.segmentation import per_image

#: Bins of the per-image pixel histograms (quantile bins of a dataset's evaluation-region map values).
PIXEL_BINS = 1024


def auroc_from_counts(positive: Any, negative: Any) -> np.ndarray:
    """AUROC from counts per ordered bin.

    Args:
        positive, negative: [..., K] non-negative counts (or weights) of positives / negatives in K bins sorted
            by increasing score.

    Returns:
        [...] sum_k pos_k (neg_{<k} + neg_k / 2) / (sum pos * sum neg), in [0, 1]; NaN (with a warning) where a
        class has no count.
    """
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.shape != neg.shape:
        raise ValueError(f"auroc_from_counts: positive {pos.shape} and negative {neg.shape} differ")
    below = np.cumsum(neg, axis=-1) - neg
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    total = n_pos * n_neg
    if np.any(total <= 0):
        warnings.warn(f"auroc_from_counts: {int(np.sum(total <= 0))} of {total.size} entries have one class only; "
                      "NaN there", RuntimeWarning, stacklevel=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + neg / 2.0)).sum(-1) / np.where(total > 0, total, 1.0), np.nan)


def score_bins(scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """The distinct scores (ascending, [K]) and each score's bin ([N] int64): one bin per distinct value."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    values, index = np.unique(s, return_inverse=True)
    return values, index.astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class PixelHistograms:
    """Per-image histograms of an anomaly map on one binning.

    Attributes:
        edges: [K-1] ascending bin edges; a value v falls in bin ``searchsorted(edges, v, side='right')``.
        anomaly: [N, K] int64 counts of evaluation-region pixels inside the anomaly mask.
        healthy: [N, K] int64 counts of evaluation-region pixels outside it.
        bound: the largest possible |pooled AUROC from the histograms - exact pooled AUROC| on all N images:
            half the anomaly-healthy pairs that share a bin holding more than one distinct map value, over all pairs.
    """

    edges: np.ndarray
    anomaly: np.ndarray
    healthy: np.ndarray
    bound: float


def pixel_histograms(maps: Any, masks: Any, region: Any | None = None, *, bins: int = PIXEL_BINS
                     ) -> PixelHistograms:
    """Histograms of ``maps`` per image on anomaly and healthy pixels, on quantile bins of the pooled region values.

    Args:
        maps: [N,1,H,W] anomaly maps (finite).
        masks: [N,1,H,W] {0,1} anomaly masks.
        region: optional [N,1,H,W] {0,1} evaluation region (pixels outside are not counted), as in
            :func:`optim.metrics.segmentation.pixel_auroc_auprc`.
        bins: the number of quantile bins (>= 2; fewer when quantiles coincide).

    Returns:
        :class:`PixelHistograms`.
    """
    if bins < 2:
        raise ValueError(f"pixel_histograms: bins must be >= 2, got {bins}")
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    if m.shape != g.shape:
        raise ValueError(f"pixel_histograms: maps {m.shape} and masks {g.shape} differ")
    keep = np.ones_like(g) if region is None else per_image(region, "region") > 0.5
    values = m[keep]
    if values.size == 0:
        raise ValueError("pixel_histograms: the evaluation region is empty")
    if not np.isfinite(values).all():
        raise ValueError("pixel_histograms: maps contain NaN or infinite values")
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    k = edges.size + 1
    index = np.searchsorted(edges, m, side="right")
    n = m.shape[0]
    flat = np.arange(n)[:, None] * k + index

    def count(select: np.ndarray) -> np.ndarray:
        return np.bincount(flat[select], minlength=n * k).reshape(n, k)

    anomaly, healthy = count(keep & g), count(keep & ~g)
    distinct = np.unique(values)
    mixed = np.bincount(np.searchsorted(edges, distinct, side="right"), minlength=k) > 1
    pos, neg = anomaly.sum(0), healthy.sum(0)
    pairs = float(pos.sum()) * float(neg.sum())
    bound = float(0.5 * (pos * neg)[mixed].sum() / pairs) if pairs > 0 else float("nan")
    return PixelHistograms(edges=edges, anomaly=anomaly, healthy=healthy, bound=bound)


class FeatureRows:
    """Feature rows (e.g. U, P and R(P) stacked) prepared for the FID of any multiset of them against a reference.

    With g_i = S f_i (S the PSD square root of the reference covariance), the FID of rows r (n of them, repeats
    allowed) is |mean f_r - mu_N|^2 + tr(Sigma_N) + tr(Sigma_r) - 2 sum sqrt(eig(C K_g C / (n - 1))), where
    K_g = g g^T restricted to r and C centres it: the same value as
    :func:`optim.metrics.distribution.frechet_distance` on ``features[r]`` (the non-zero eigenvalues of
    S Sigma_r S are those of the n x n centred Gram matrix), at O(n^2) per FID after O(m d^2) set-up. Round-off
    differs: ``frechet_distance`` takes the square roots of the d - n + 1 round-off "zero" eigenvalues of a
    rank-deficient covariance (d > n), adding up to about (d - n) sqrt(eps * max eigenvalue); here they are zeros.

    Args:
        reference: :class:`GaussianStats` of the reference set N (its square root is computed once and cached).
        rows: [m, d] feature rows.
    """

    def __init__(self, reference: GaussianStats, rows: Any) -> None:
        f = as_features(rows, "FeatureRows: rows")
        if f.shape[1] != reference.mu.size:
            raise ValueError(f"FeatureRows: rows have {f.shape[1]} features, the reference {reference.mu.size}")
        g = f @ reference.sqrt_sigma()
        self.n_rows = f.shape[0]
        self._kf, self._kg = f @ f.T, g @ g.T
        self._f_mu = f @ reference.mu
        self._mu_mu = float(reference.mu @ reference.mu)
        self._trace_reference = float(np.trace(reference.sigma))

    def fid(self, rows: Any) -> float:
        """FID against the reference of the rows ``rows`` ([n] int indices, n >= 2, repeats allowed); >= 0."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = r.size
        if n < 2:
            raise ValueError(f"FeatureRows.fid: need >= 2 rows, got {n}")
        if r.min() < 0 or r.max() >= self.n_rows:
            raise ValueError(f"FeatureRows.fid: row indices outside range({self.n_rows})")
        kf = self._kf[np.ix_(r, r)]
        mean_square = float(kf.mean())  # |mean f_r|^2
        distance = mean_square - 2.0 * float(self._f_mu[r].mean()) + self._mu_mu
        trace_rows = (float(np.trace(kf)) - n * mean_square) / (n - 1)
        kg = self._kg[np.ix_(r, r)]
        centred = kg - kg.mean(0, keepdims=True) - kg.mean(1, keepdims=True) + kg.mean()
        eig = np.linalg.eigvalsh((centred + centred.T) / (2.0 * (n - 1)))
        # The centred Gram matrix has rank <= n - 1 (fewer with repeated rows): its zero eigenvalues come out as
        # +-n*eps*max, whose square roots (~1e-8 each) would add up; they are zeros.
        eig[eig <= n * np.finfo(np.float64).eps * max(float(eig[-1]), 0.0)] = 0.0
        trace_sqrt = float(np.sqrt(eig).sum())
        return max(distance + self._trace_reference + trace_rows - 2.0 * trace_sqrt, 0.0)


def ahi_equal_n_rows(rows: FeatureRows, healthy: Any, pathological: Any, restored: Any, *, draws: int = 5,
                     seed: int = 0) -> dict[str, float]:
    """:func:`optim.metrics.normative.ahi_equal_n` on row indices of :class:`FeatureRows`.

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
        ``ahi`` (NaN with a warning when FID(P,N) <= FID(U,N)), ``fid_u``, ``fid_p``, ``fid_rp``, ``n_fid``.
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
    return {"ahi": ahi(fid_p, fid_rp, fid_u), "fid_u": fid_u, "fid_p": fid_p, "fid_rp": fid_rp, "n_fid": float(n)}
