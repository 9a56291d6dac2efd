"""Metrics in the form a bootstrap recomputes them: AUROC from counts and per-image pixel histograms.

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

The FIDs of resampled feature rows are :class:`optim.metrics.distribution.FeatureRows` and
:func:`optim.metrics.normative.ahi_equal_n_rows` (which the runs' own AHI uses as well).

Pure functions; inputs are never mutated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

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
