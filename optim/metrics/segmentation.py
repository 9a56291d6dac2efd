"""Pixel-level metrics: healthy thresholds, pixel AUROC/AUPRC, Dice, oracle best Dice, lesion-size bins.

Pure functions. Maps and masks are ``[N,1,H,W]`` or ``[N,H,W]`` (numpy or torch); maps are >= 0 anomaly
maps, masks are {0,1}. The decision rule everywhere is **anomalous iff map > threshold** (strict), so a
threshold computed on healthy data at FPR f flags at most a fraction f of healthy pixels.

Two aggregations are reported and labelled: ``pooled`` (all pixels of all images in one pool) and
``per_image_mean`` (the metric per image, then the mean over the images where it is defined: images with
an empty anomaly mask have no per-image AUROC/AUPRC/Dice and are skipped, their count is reported).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from optim.metrics.classification import auroc, average_precision

#: The reference lesion-size bins (ATLAS v2 at 128x128 pixels), half-open [lo, hi) in pixels.
REFERENCE_SIZE_BINS: tuple[tuple[int, int], ...] = ((1, 71), (71, 570), (570, 10000))
REFERENCE_AREA = 128 * 128


def per_image(values: Any, name: str = "map") -> np.ndarray:
    """``[N,1,H,W]``/``[N,H,W]`` tensor or array -> float64 numpy ``[N, H*W]`` (a copy)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 4:
        if array.shape[1] != 1:
            raise ValueError(f"{name}: expected [N,1,H,W], got {array.shape}")
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected [N,1,H,W] or [N,H,W], got shape {array.shape}")
    return array.reshape(array.shape[0], -1)


@dataclass(frozen=True)
class ThresholdResult:
    """A healthy operating point.

    Attributes:
        threshold: pixels with map > threshold are called anomalous.
        target_fpr: the requested mean pixel FPR.
        achieved_fpr: the mean per-image pixel FPR at ``threshold`` on the healthy maps (<= target_fpr).
        region: 'foreground' (only brain-mask pixels counted) or 'all' (every pixel).
        n_images: healthy images used (images with an empty foreground are skipped).
        n_pixels: pixels counted.
    """

    threshold: float
    target_fpr: float
    achieved_fpr: float
    region: Literal["foreground", "all"]
    n_images: int
    n_pixels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def threshold_at_fpr(healthy_maps: Any, fpr: float, foreground: Any | None = None) -> ThresholdResult:
    """The smallest threshold whose mean pixel FPR on healthy images is <= ``fpr``.

    The FPR of image i at threshold t is the fraction of its counted pixels with map > t; the mean is over
    images (each image weighs the same, whatever its brain size). Candidate thresholds are the map values
    themselves: the FPR only changes there, so the smallest admissible threshold is one of them.

    Args:
        healthy_maps: [N,1,H,W] anomaly maps of healthy images (no lesions).
        fpr: target false-positive rate in (0, 1), e.g. 0.01, 0.02, 0.05.
        foreground: optional [N,1,H,W] {0,1} brain masks; when given only foreground pixels count.

    Returns:
        A :class:`ThresholdResult` saying which pixels were counted.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"threshold_at_fpr: fpr must be in (0, 1), got {fpr!r}")
    maps = per_image(healthy_maps, "healthy_maps")
    if foreground is None:
        keep = np.ones_like(maps, dtype=bool)
    else:
        keep = per_image(foreground, "foreground") > 0.5
        if keep.shape != maps.shape:
            raise ValueError(f"threshold_at_fpr: foreground shape {keep.shape} != maps shape {maps.shape}")
    counts = keep.sum(axis=1)
    valid = counts > 0
    if not valid.any():
        raise ValueError("threshold_at_fpr: no pixel to count (empty maps or empty foreground masks)")
    weights = np.where(keep, 1.0 / np.maximum(counts, 1)[:, None], 0.0) / valid.sum()
    values, w = maps[keep], weights[keep]
    order = np.argsort(values, kind="mergesort")
    values, w = values[order], w[order]
    # tail[k] = sum of weights at sorted positions >= k; FPR(v) = weight of values strictly above v.
    tail = np.r_[np.cumsum(w[::-1])[::-1], 0.0]
    last = np.r_[np.where(np.diff(values))[0], values.size - 1]  # last index of each distinct value
    fprs = tail[last + 1]
    ok = np.where(fprs <= fpr + 1e-12)[0]
    pick = int(ok[0])  # fprs is non-increasing; the last distinct value always has FPR 0
    return ThresholdResult(
        threshold=float(values[last[pick]]),
        target_fpr=float(fpr),
        achieved_fpr=float(min(fprs[pick], 1.0)),
        region="all" if foreground is None else "foreground",
        n_images=int(valid.sum()),
        n_pixels=int(counts.sum()),
    )


def fpr_at_threshold(healthy_maps: Any, threshold: float, foreground: Any | None = None) -> float:
    """Mean per-image pixel FPR (map > threshold) on healthy maps, counting foreground pixels when given."""
    maps = per_image(healthy_maps, "healthy_maps")
    keep = np.ones_like(maps, dtype=bool) if foreground is None else per_image(foreground, "foreground") > 0.5
    counts = keep.sum(axis=1)
    valid = counts > 0
    rates = ((maps > threshold) & keep).sum(axis=1)[valid] / counts[valid]
    return float(rates.mean())


def _region(masks: np.ndarray, region: Any | None) -> np.ndarray:
    return np.ones_like(masks, dtype=bool) if region is None else per_image(region, "region") > 0.5


def pixel_auroc_auprc(maps: Any, masks: Any, region: Any | None = None) -> dict[str, float]:
    """Pixel AUROC and AUPRC, pooled over all pixels and as the mean over images.

    Args:
        maps: [N,1,H,W] anomaly maps.
        masks: [N,1,H,W] {0,1} ground-truth anomaly masks.
        region: optional [N,1,H,W] {0,1} evaluation region (e.g. brain mask OR anomaly mask); pixels
            outside are ignored.

    Returns:
        ``auroc_pooled``, ``auprc_pooled``, ``auroc_per_image_mean``, ``auprc_per_image_mean`` and
        ``n_images_with_lesion`` (images whose region holds both classes; only those enter the means).
        NaN (with a warning) where undefined.
    """
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    keep = _region(g, region)
    out = {"auroc_pooled": auroc(m[keep], g[keep]), "auprc_pooled": average_precision(m[keep], g[keep])}
    per_auroc, per_ap = [], []
    for i in range(m.shape[0]):
        yi = g[i][keep[i]]
        if 0 < yi.sum() < yi.size:
            per_auroc.append(auroc(m[i][keep[i]], yi))
            per_ap.append(average_precision(m[i][keep[i]], yi))
    out["auroc_per_image_mean"] = _mean(per_auroc, "pixel AUROC per image")
    out["auprc_per_image_mean"] = _mean(per_ap, "pixel AUPRC per image")
    out["n_images_with_lesion"] = float(len(per_ap))
    return out


def _mean(values: Sequence[float], what: str) -> float:
    if len(values) == 0:
        warnings.warn(f"{what}: no image defines it (no lesion pixels); returning NaN", RuntimeWarning, stacklevel=3)
        return float("nan")
    return float(np.mean(values))


def dice_per_image(maps: Any, masks: Any, threshold: float, region: Any | None = None) -> np.ndarray:
    """Dice of (map > threshold) vs mask for each image: [N]; NaN where mask and prediction are both empty."""
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    keep = _region(g, region)
    pred = (m > threshold) & keep
    g = g & keep
    inter = (pred & g).sum(axis=1)
    denom = pred.sum(axis=1) + g.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)


def dice_at_threshold(maps: Any, masks: Any, threshold: float, region: Any | None = None) -> dict[str, float]:
    """Dice at a fixed (healthy) threshold, pooled over all pixels and averaged over lesion images.

    Returns:
        ``dice_pooled`` (2 sum|P&G| / (sum|P| + sum|G|); NaN with a warning when both are empty) and
        ``dice_per_image_mean`` (mean over images with a non-empty mask).
    """
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    keep = _region(g, region)
    pred = (m > threshold) & keep
    g = g & keep
    denom = pred.sum() + g.sum()
    if denom == 0:
        warnings.warn("dice_at_threshold: empty prediction and empty mask; returning NaN", RuntimeWarning,
                      stacklevel=2)
        pooled = float("nan")
    else:
        pooled = float(2.0 * (pred & g).sum() / denom)
    per = dice_per_image(maps, masks, threshold, region)
    has_lesion = g.sum(axis=1) > 0
    return {"dice_pooled": pooled, "dice_per_image_mean": _mean(per[has_lesion].tolist(), "Dice per image")}


def best_dice(maps: Any, masks: Any, region: Any | None = None) -> dict[str, float]:
    """ORACLE upper bound: the best pooled Dice over all thresholds (chosen on the labelled test data).

    Exact: evaluates Dice at every distinct map value (prediction map > t for t just below each value).

    Returns:
        ``oracle_best_dice_pooled`` and ``oracle_best_threshold`` (NaN with a warning when the masks are empty).
    """
    m, g = per_image(maps, "maps"), per_image(masks, "masks") > 0.5
    keep = _region(g, region)
    s, y = m[keep], g[keep]
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn("best_dice: empty masks; returning NaN", RuntimeWarning, stacklevel=2)
        return {"oracle_best_dice_pooled": float("nan"), "oracle_best_threshold": float("nan")}
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    idx = np.r_[np.where(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[idx]
    predicted = idx + 1
    dice = 2.0 * tp / (predicted + n_pos)
    k = int(np.argmax(dice))
    # Predicting "map >= s_sorted[idx[k]]" equals "map > next lower distinct value".
    lower = s_sorted[idx[k + 1]] if k + 1 < idx.size else np.nextafter(s_sorted[idx[k]], -np.inf)
    return {"oracle_best_dice_pooled": float(dice[k]), "oracle_best_threshold": float(lower)}


def scaled_size_bins(bins: Sequence[Sequence[float]], image_area: int,
                     reference_area: int = REFERENCE_AREA) -> list[tuple[float, float]]:
    """Scale pixel-count bins defined at ``reference_area`` (128x128) to another image area."""
    factor = image_area / reference_area
    out = []
    for b in bins:
        if len(b) != 2 or not b[0] < b[1]:
            raise ValueError(f"size bin {list(b)!r} must be [low, high] with low < high")
        out.append((float(b[0]) * factor, float(b[1]) * factor))
    return out


def lesion_size_bin(masks: Any, bins: Sequence[Sequence[float]] = REFERENCE_SIZE_BINS,
                    reference_area: int = REFERENCE_AREA) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Bin index per image from its lesion area (pixels), with bins scaled to the image area.

    Args:
        masks: [N,1,H,W] {0,1}.
        bins: half-open [low, high) pixel ranges at ``reference_area``.

    Returns:
        ([N] int bin index, -1 when outside every bin, e.g. no lesion), the scaled bins.
    """
    g = per_image(masks, "masks") > 0.5
    scaled = scaled_size_bins(bins, g.shape[1], reference_area)
    sizes = g.sum(axis=1)
    index = np.full(sizes.shape, -1, dtype=np.int64)
    for k, (lo, hi) in enumerate(scaled):
        index[(sizes >= lo) & (sizes < hi) & (index < 0)] = k
    return index, scaled
