"""Does new data look like the training data? Intensity statistics of preprocessed slices and their training range.

Pure functions. A slice's statistics are computed on its preprocessed pixels (in [0,1], as the model sees them):

- ``mean``: the mean intensity;
- ``p50``, ``p90``, ``p99``: intensity percentiles;
- ``foreground``: the fraction of pixels above 0.05 (how much of the slice is head or brain).

The training summary keeps, per statistic, its 0.5th and 99.5th percentiles over the training slices. A new scan is
summarised by the median of its slices' statistics and flagged on a statistic that lies outside the training range
widened by half its width (at least 0.02) on either side (a coarse check: it catches another contrast, 8-bit
intensities against [0,1] training data, a wrong scaling rule, a scan of mostly background; it does not catch
subtle shifts, which the p-values' uniformity test on healthy inputs is for).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

STATISTICS = ("mean", "p50", "p90", "p99", "foreground")
FOREGROUND_LEVEL = 0.05
RANGE = (0.5, 99.5)  # percentiles of the training slices' statistics kept in the summary
MARGIN = 0.5  # the range is widened by this fraction of its width on either side ...
MIN_MARGIN = 0.02  # ... and by at least this much (intensities and fractions are in [0,1])


def slice_statistics(images: Any) -> dict[str, np.ndarray]:
    """Per-slice intensity statistics.

    Args:
        images: [N,1,H,W] or [N,H,W] preprocessed slices (numpy or torch), normally in [0,1].

    Returns:
        ``{statistic: [N] float64}`` for every name in :data:`STATISTICS`.
    """
    x = np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"slice_statistics: expected [N,1,H,W] or [N,H,W] with N >= 1, got shape {x.shape}")
    flat = x.reshape(x.shape[0], -1)
    p50, p90, p99 = np.percentile(flat, (50, 90, 99), axis=1)
    return {"mean": flat.mean(axis=1), "p50": p50, "p90": p90, "p99": p99,
            "foreground": (flat > FOREGROUND_LEVEL).mean(axis=1)}


def training_summary(statistics: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """``{statistic: [low, high]}``: the training slices' 0.5th and 99.5th percentiles of each statistic."""
    return {name: [float(v) for v in np.percentile(np.asarray(statistics[name], dtype=np.float64), RANGE)]
            for name in STATISTICS}


def out_of_range(summary: Mapping[str, Any], statistics: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float,
                                                                                                        float]]:
    """The statistics of one scan (the median over its slices) outside the widened training range.

    Args:
        summary: from :func:`training_summary`.
        statistics: the scan's :func:`slice_statistics`.

    Returns:
        ``{statistic: (scan value, allowed low, allowed high)}`` for each flagged statistic (empty: it matches).
    """
    flagged = {}
    for name in STATISTICS:
        if name not in summary:
            continue
        low, high = (float(v) for v in summary[name])
        pad = max(MARGIN * (high - low), MIN_MARGIN)
        value = float(np.median(statistics[name]))
        if not low - pad <= value <= high + pad:
            flagged[name] = (value, low - pad, high + pad)
    return flagged
