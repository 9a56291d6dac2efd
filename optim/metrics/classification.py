"""Binary ranking metrics: AUROC, average precision (AUPRC), ROC and PR curves, image-level detection.

Pure functions on 1-D score/label arrays (numpy or torch, any float dtype). Labels are {0,1} (or bool);
larger scores mean "more anomalous". When only one class is present the metric is undefined: the
functions return NaN and emit a ``RuntimeWarning`` (never an exception), so that one degenerate dataset
does not abort an evaluation.

The maths is scikit-learn's (``roc_auc_score``, ``average_precision_score``, ``roc_curve``,
``precision_recall_curve``); these wrappers add input checks and the NaN-with-warning rule for one class:

* AUROC = Mann-Whitney U / (n_pos * n_neg), ties counted as 1/2.
* AP = sum_k (R_k - R_{k-1}) * P_k over the distinct score thresholds in decreasing order (no
  interpolation).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm


def as_numpy(values: Any, dtype: Any = np.float64) -> np.ndarray:
    """A flat float64 (or ``dtype``) numpy copy of a tensor/array/sequence; the input is never mutated."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _check(scores: Any, labels: Any, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    s = as_numpy(scores)
    y = as_numpy(labels)
    if s.shape != y.shape:
        raise ValueError(f"{name}: scores ({s.size}) and labels ({y.size}) differ in size")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{name}: labels must be 0/1, got values {np.unique(y)[:5].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: scores contain NaN or infinite values")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        warnings.warn(f"{name}: only one class present ({y.size} samples, {n_pos} positive); returning NaN",
                      RuntimeWarning, stacklevel=3)
        return None
    return s, y.astype(bool)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve.

    Args:
        scores: [N] anomaly scores (any real range).
        labels: [N] in {0,1}, 1 = anomalous.

    Returns:
        AUROC in [0,1]; NaN (with a warning) when only one class is present.
    """
    checked = _check(scores, labels, "auroc")
    if checked is None:
        return float("nan")
    return float(skm.roc_auc_score(checked[1], checked[0]))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision (the area under the precision-recall curve, step-wise, scikit-learn's definition).

    Args:
        scores: [N] anomaly scores.
        labels: [N] in {0,1}.

    Returns:
        AP in [0,1]; NaN (with a warning) when only one class is present.
    """
    checked = _check(scores, labels, "average_precision")
    if checked is None:
        return float("nan")
    return float(skm.average_precision_score(checked[1], checked[0]))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points from (0,0) to (1,1) for plotting; empty arrays when one class only."""
    checked = _check(scores, labels, "roc_curve")
    if checked is None:
        return np.zeros(0), np.zeros(0)
    s, y = checked
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def pr_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) points for plotting, recall increasing; empty arrays when one class only."""
    checked = _check(scores, labels, "pr_curve")
    if checked is None:
        return np.zeros(0), np.zeros(0)
    s, y = checked
    precision, recall, _ = skm.precision_recall_curve(y, s)
    return recall[::-1], precision[::-1]


def image_level_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Image-level detection: AUROC and AUPRC of the image score between healthy (0) and pathological (1).

    Args:
        scores: [N] image anomaly scores.
        labels: [N] in {0,1}.

    Returns:
        ``{'auroc', 'auprc', 'n_healthy', 'n_pathological'}`` (metrics NaN when one class only).
    """
    y = as_numpy(labels)
    return {
        "auroc": auroc(scores, labels),
        "auprc": average_precision(scores, labels),
        "n_healthy": float((y == 0).sum()),
        "n_pathological": float((y == 1).sum()),
    }


def tpr_at_fpr(scores: Any, labels: Any, fpr: float) -> dict[str, float]:
    """Sensitivity at a fixed false-positive rate: the threshold is set on the negatives (label 0) alone.

    The threshold is the smallest score value t with ``#{negatives with score > t} <= fpr * n_negative`` (the
    rule of the healthy thresholds: positive iff score > t); the TPR is the fraction of positives above it.

    Args:
        scores: [N] anomaly scores.
        labels: [N] in {0,1}.
        fpr: the target false-positive rate in (0, 1).

    Returns:
        ``tpr``, ``threshold``, ``achieved_fpr`` (<= fpr), ``n_positive``, ``n_negative``; the first three NaN
        (with a warning) when only one class is present.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"tpr_at_fpr: fpr must be in (0, 1), got {fpr!r}")
    y = as_numpy(labels)
    counts = {"n_positive": float((y == 1).sum()), "n_negative": float((y == 0).sum())}
    checked = _check(scores, labels, "tpr_at_fpr")
    if checked is None:
        return {"tpr": float("nan"), "threshold": float("nan"), "achieved_fpr": float("nan"), **counts}
    s, positive = checked
    negatives = np.sort(s[~positive])[::-1]
    allowed = int(np.floor(fpr * negatives.size + 1e-9))  # negatives that may lie above the threshold
    threshold = float(negatives[allowed])
    return {"tpr": float((s[positive] > threshold).mean()), "threshold": threshold,
            "achieved_fpr": float((negatives > threshold).mean()), **counts}
