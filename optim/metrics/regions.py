"""Region-overlap metrics: AUPRO (per-region overlap up to an FPR limit) and the TPR at a healthy threshold.

Pure functions. Maps and masks are ``[N,1,H,W]`` or ``[N,H,W]`` (numpy or torch); maps are anomaly maps (larger
is more anomalous), masks are {0,1}; an optional ``region`` ({0,1}, same shape) restricts every count to its
pixels (e.g. brain mask OR anomaly mask).

**AUPRO** is the threshold-free region metric of the MVTec AD benchmark (Bergmann et al., IJCV 2021) as the
MVTec evaluation code and anomalib compute it:

1. the ground truth of every image is split into connected components (8-connectivity); each component is
   one region, over all images together;
2. for a threshold t, a pixel is predicted anomalous iff ``map >= t``; FPR(t) = predicted normal-pixel count /
   all normal pixels (pooled over the images, normal = outside every region); PRO(t) = the mean over all regions
   of the fraction of the region's pixels predicted anomalous (each region weighs the same, whatever its size);
3. the curve (FPR, PRO) over every distinct map value, starting at (0, 0), is integrated by the trapezoidal rule
   up to ``fpr_limit`` (linear interpolation at the limit) and divided by ``fpr_limit``.

A perfect map gives 1; a map that ranks pixels at random gives about ``fpr_limit / 2`` (0.15 at the default
0.3), not 0.5: the curve is integrated only over the low-FPR part.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from optim.metrics.segmentation import per_image

#: 8-connectivity: diagonal neighbours belong to the same region (MVTec's ``np.ones((3, 3))`` structure).
CONNECTIVITY = np.ones((3, 3), dtype=int)


def _inputs(maps: Any, masks: Any, region: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(maps [N,P] float64, masks [N,P] bool, region [N,P] bool, (H, W)) with the shapes checked."""
    shape = tuple(np.shape(maps.detach().cpu() if hasattr(maps, "detach") else maps))[-2:]
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    keep = np.ones_like(g) if region is None else per_image(region, "region") > 0.5
    if g.shape != m.shape or keep.shape != m.shape:
        raise ValueError(f"maps {m.shape}, masks {g.shape} and region {keep.shape} must have the same shape")
    if not np.isfinite(m[keep]).all():
        raise ValueError("maps contain NaN or infinite values inside the region")
    return m, g & keep, keep, (int(shape[0]), int(shape[1]))


def pro_curve(maps: Any, masks: Any, region: Any | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The per-region-overlap curve (see the module docstring).

    Args:
        maps: [N,1,H,W] anomaly maps.
        masks: [N,1,H,W] {0,1} ground truth; connected components (8-connectivity) are the regions.
        region: optional [N,1,H,W] {0,1}; pixels outside it are ignored.

    Returns:
        (fpr, pro, n_regions): fpr and pro start at 0 and are non-decreasing, one point per distinct map value
        (decreasing thresholds); both empty when there is no region or no normal pixel (NaN cases of
        :func:`aupro`).
    """
    m, g, keep, (height, width) = _inputs(maps, masks, region)
    overlap_weight = np.zeros_like(m)
    n_regions = 0
    for i in range(m.shape[0]):
        labels, n = ndi.label(g[i].reshape(height, width), structure=CONNECTIVITY)
        if n == 0:
            continue
        labels = labels.reshape(-1)
        sizes = np.bincount(labels, minlength=n + 1).astype(np.float64)
        inside = labels > 0
        overlap_weight[i, inside] = 1.0 / sizes[labels[inside]]
        n_regions += n
    normal = keep & ~g
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.zeros(0), np.zeros(0), n_regions
    scores = m[keep]
    order = np.argsort(-scores, kind="mergesort")
    scores = scores[order]
    fp = np.cumsum(normal[keep][order]) / n_normal
    pro = np.cumsum(overlap_weight[keep][order]) / n_regions
    last = np.r_[np.diff(scores) != 0, True]  # all pixels of a tied value switch together
    return np.r_[0.0, np.clip(fp[last], 0, 1)], np.r_[0.0, np.clip(pro[last], 0, 1)], n_regions


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under y(x) for x in [0, limit], interpolating y linearly at ``limit``."""
    inside = x <= limit
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    k = int(inside.sum())  # x[k - 1] <= limit < x[k]
    if k < x.size and x[k - 1] < limit:
        y_limit = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_limit) * (limit - x[k - 1])
    return area


def aupro(maps: Any, masks: Any, region: Any | None = None, *, fpr_limit: float = 0.3) -> dict[str, float]:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (see the module docstring).

    Args:
        maps: [N,1,H,W] anomaly maps.
        masks: [N,1,H,W] {0,1} ground truth.
        region: optional [N,1,H,W] {0,1} evaluation region.
        fpr_limit: the pooled pixel FPR up to which the curve is integrated, in (0, 1].

    Returns:
        ``aupro`` in [0,1] (NaN with a warning when there is no region or no normal pixel), ``aupro_fpr_limit``
        and ``aupro_n_regions`` (connected ground-truth components over all images).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro, n_regions = pro_curve(maps, masks, region)
    if fpr.size == 0:
        warnings.warn(f"aupro: {'no ground-truth region' if n_regions == 0 else 'no normal pixel'}; returning NaN",
                      RuntimeWarning, stacklevel=2)
        value = float("nan")
    else:
        value = _area_to(fpr, pro, fpr_limit) / fpr_limit
    return {"aupro": value, "aupro_fpr_limit": float(fpr_limit), "aupro_n_regions": float(n_regions)}


def tpr_at_threshold(maps: Any, masks: Any, threshold: float, region: Any | None = None) -> dict[str, float]:
    """Pixel sensitivity of ``map > threshold`` (e.g. at a healthy threshold), pooled and per image.

    Args:
        maps: [N,1,H,W] anomaly maps.
        masks: [N,1,H,W] {0,1} ground truth.
        threshold: pixels with map > threshold are predicted anomalous (the rule of the healthy thresholds).
        region: optional [N,1,H,W] {0,1} evaluation region.

    Returns:
        ``tpr_pooled`` (true positives / anomaly pixels over all images) and ``tpr_per_image_mean`` (the mean
        over images with anomaly pixels), both in [0,1]; NaN with a warning when no image has anomaly pixels.
    """
    m, g, _, _ = _inputs(maps, masks, region)
    hits = ((m > threshold) & g).sum(axis=1)
    positives = g.sum(axis=1)
    if positives.sum() == 0:
        warnings.warn("tpr_at_threshold: no anomaly pixel; returning NaN", RuntimeWarning, stacklevel=2)
        return {"tpr_pooled": float("nan"), "tpr_per_image_mean": float("nan")}
    with_lesion = positives > 0
    return {"tpr_pooled": float(hits.sum() / positives.sum()),
            "tpr_per_image_mean": float(np.mean(hits[with_lesion] / positives[with_lesion]))}
