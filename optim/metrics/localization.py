"""Object-level localisation: the reference study's fastMRI+ box metric (docs/methods.md#object-level-localisation).

For one image with one annotated region (a box for fastMRI+, a lesion mask otherwise) and a threshold th:

* ``A`` = the anomaly map with every value below th set to 0 (values >= th are kept);
* TP = 1 if the supra-threshold pixels inside the region (``A > 0``) are more than ``min_fraction``
  (10 %) of the region's area, else 0;
* healthy mass ``a-`` = sum of A over the healthy-tissue mask; anomaly mass ``a+`` = sum of A inside the region;
* FP = floor(a- / max(a+, 1));
* precision = TP / max(TP + FP, 1), recall = TP, F1 = 2PR / (P + R) (0 when P + R = 0).

FP compares absolute masses (with the reference's ``max(a+, 1)`` floor), so it depends on the scale of the
anomaly map: the metric is kept exactly as the reference defines it, for comparability, not rescaled.

A pathology with k annotations on one image appears as k rows (images), each with one region, as in the
fastMRI+ split CSVs. Per class, report the means of precision/recall/F1 and "n of N detected".
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from optim.metrics.segmentation import per_image


def localization_per_image(maps: Any, regions: Any, healthy_masks: Any, threshold: float,
                           min_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The reference localisation metric for each image.

    Args:
        maps: [N,1,H,W] anomaly maps (>= 0).
        regions: [N,1,H,W] {0,1}, the annotated box (or lesion) of each row.
        healthy_masks: [N,1,H,W] {0,1}, the healthy-tissue mask (brain minus all annotations of the image).
        threshold: the healthy operating point th.
        min_fraction: the fraction of the region's area that must be supra-threshold for a TP (0.1).

    Returns:
        ``{'tp', 'fp', 'precision', 'recall', 'f1', 'mass_anomaly', 'mass_healthy'}``, each [N] float64.
        Rows with an empty region are NaN (with a warning).
    """
    m = per_image(maps, "maps")
    box = per_image(regions, "regions") > 0.5
    healthy = per_image(healthy_masks, "healthy_masks") > 0.5
    if not (m.shape == box.shape == healthy.shape):
        raise ValueError(f"localization: shapes differ: maps {m.shape}, regions {box.shape}, healthy {healthy.shape}")
    a = np.where(m >= threshold, m, 0.0)
    area = box.sum(axis=1)
    empty = area == 0
    if empty.any():
        warnings.warn(f"localization: {int(empty.sum())} image(s) with an empty region give NaN", RuntimeWarning,
                      stacklevel=2)
    inside = ((a > 0) & box).sum(axis=1)
    tp = (inside > min_fraction * area).astype(np.float64)
    mass_anomaly = (a * box).sum(axis=1)
    mass_healthy = (a * healthy).sum(axis=1)
    fp = np.floor(mass_healthy / np.maximum(mass_anomaly, 1.0))
    precision = tp / np.maximum(tp + fp, 1.0)
    recall = tp
    denom = precision + recall
    f1 = np.where(denom > 0, 2.0 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    out = {"tp": tp, "fp": fp, "precision": precision, "recall": recall, "f1": f1,
           "mass_anomaly": mass_anomaly, "mass_healthy": mass_healthy}
    return {k: np.where(empty, np.nan, v) for k, v in out.items()}


def localization_summary(per_image_values: dict[str, np.ndarray]) -> dict[str, float]:
    """Class-level means of :func:`localization_per_image` plus ``n_detected`` of ``n_total``."""
    tp = per_image_values["tp"]
    valid = ~np.isnan(tp)
    if not valid.any():
        warnings.warn("localization_summary: no valid image; returning NaN", RuntimeWarning, stacklevel=2)
    out = {}
    for key in ("precision", "recall", "f1", "fp"):
        out[f"{key}_mean"] = float(np.mean(per_image_values[key][valid])) if valid.any() else float("nan")
    out["n_detected"] = float(np.nansum(tp))
    out["n_total"] = float(valid.sum())
    return out
