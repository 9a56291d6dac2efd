"""Per-subject metrics: slice scores aggregated per subject, Dice and healthy false-positive rate per subject.

Pure functions. A subject (a volume, a scan) is a group of slices named by equal ids in ``subjects`` ([N]
strings, one per slice, in the order of the maps and scores); subjects are reported in order of first
appearance. Maps and masks are ``[N,1,H,W]`` or ``[N,H,W]`` (numpy or torch), masks in {0,1}; the decision rule is
the healthy thresholds' **anomalous iff map > threshold**.

Pixel counts of a subject are pooled over its slices: its Dice is 2|P & G| / (|P| + |G|) over all its slices, its
false-positive rate the false-positive pixels over all its counted pixels; so a subject weighs the same whatever
its number of slices, and its slices weigh by their pixels, as a volume's voxels do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from optim.metrics.classification import as_numpy
from optim.metrics.segmentation import per_image

Aggregation = Literal["mean", "max", "quantile"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def group(subjects: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(subject ids in order of first appearance, [N] int index of each slice's subject in that list)."""
    ids: dict[str, int] = {}
    index = np.array([ids.setdefault(str(s), len(ids)) for s in subjects], dtype=np.int64)
    return list(ids), index


def aggregate_scores(scores: Any, subjects: Sequence[str], rule: Aggregation = "mean",
                     quantile: float = 0.9) -> tuple[list[str], np.ndarray]:
    """One score per subject from its slices' scores.

    Args:
        scores: [N] slice anomaly scores.
        subjects: [N] subject ids.
        rule: ``'mean'``, ``'max'`` or ``'quantile'`` (the ``quantile`` of the subject's slice scores, linear
            interpolation, numpy's default).
        quantile: in [0, 1], used by ``'quantile'``.

    Returns:
        (subject ids, [S] float64 subject scores).
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation {rule!r} is not one of {', '.join(AGGREGATIONS)}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    s = as_numpy(scores)
    if s.size != len(subjects):
        raise ValueError(f"{s.size} scores for {len(subjects)} subject ids")
    ids, index = group(subjects)
    out = np.empty(len(ids))
    for k in range(len(ids)):
        values = s[index == k]
        out[k] = values.mean() if rule == "mean" else values.max() if rule == "max" else np.quantile(values, quantile)
    return ids, out


def _pixels(maps: Any, masks: Any | None, subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None,
                                                                             list[str], np.ndarray]:
    m = per_image(maps, "maps")
    g = None if masks is None else per_image(masks, "masks") > 0.5
    if g is not None and g.shape != m.shape:
        raise ValueError(f"masks shape {g.shape} != maps shape {m.shape}")
    if m.shape[0] != len(subjects):
        raise ValueError(f"{m.shape[0]} maps for {len(subjects)} subject ids")
    ids, index = group(subjects)
    return m, g, ids, index


def dice_per_subject(maps: Any, masks: Any, subjects: Sequence[str], threshold: float,
                     region: Any | None = None) -> tuple[list[str], np.ndarray]:
    """Dice of ``map > threshold`` against the masks, pooled over each subject's slices.

    Args:
        maps: [N,1,H,W] anomaly maps; masks: [N,1,H,W] {0,1}; subjects: [N] ids.
        threshold: the operating point.
        region: optional [N,1,H,W] {0,1}; pixels outside are ignored.

    Returns:
        (subject ids, [S] Dice in [0,1]; NaN for a subject whose prediction and mask are both empty).
    """
    m, g, ids, index = _pixels(maps, masks, subjects)
    keep = np.ones_like(g) if region is None else per_image(region, "region") > 0.5
    pred, g = (m > threshold) & keep, g & keep
    inter = np.bincount(index, weights=(pred & g).sum(axis=1), minlength=len(ids))
    denom = np.bincount(index, weights=pred.sum(axis=1) + g.sum(axis=1), minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        return ids, np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)


def fpr_per_subject(maps: Any, subjects: Sequence[str], threshold: float,
                    foreground: Any | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pixel false-positive rate of ``map > threshold`` on healthy slices, pooled over each subject's slices.

    Args:
        maps: [N,1,H,W] anomaly maps of healthy slices; subjects: [N] ids.
        threshold: the operating point.
        foreground: optional [N,1,H,W] {0,1} brain masks: only their pixels are counted.

    Returns:
        (subject ids, [S] FPR in [0,1] (NaN for a subject without a counted pixel), [S] false-positive pixel
        counts).
    """
    m, fg, ids, index = _pixels(maps, foreground, subjects)
    keep = np.ones_like(m, dtype=bool) if fg is None else fg
    false_pos = np.bincount(index, weights=((m > threshold) & keep).sum(axis=1), minlength=len(ids))
    counted = np.bincount(index, weights=keep.sum(axis=1), minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        return ids, np.where(counted > 0, false_pos / np.maximum(counted, 1), np.nan), false_pos


def distribution(values: Any, prefix: str = "") -> dict[str, float]:
    """Median, quartiles, IQR, mean, min, max and n of the finite values (NaN with a warning when none is).

    Keys are ``<prefix>median``, ``<prefix>q25``, ``<prefix>q75``, ``<prefix>iqr``, ``<prefix>mean``,
    ``<prefix>min``, ``<prefix>max``, ``<prefix>n``.
    """
    v = as_numpy(values)
    v = v[np.isfinite(v)]
    if v.size == 0:
        warnings.warn(f"distribution{f' of {prefix}' if prefix else ''}: no finite value; returning NaN",
                      RuntimeWarning, stacklevel=2)
        stats = dict.fromkeys(("median", "q25", "q75", "iqr", "mean", "min", "max"), float("nan"))
    else:
        q25, median, q75 = np.quantile(v, (0.25, 0.5, 0.75))
        stats = {"median": median, "q25": q25, "q75": q75, "iqr": q75 - q25, "mean": v.mean(), "min": v.min(),
                 "max": v.max()}
    return {**{f"{prefix}{k}": float(x) for k, x in stats.items()}, f"{prefix}n": float(v.size)}
