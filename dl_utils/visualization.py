"""Evaluation figures (matplotlib, Agg: figures are built with ``matplotlib.figure.Figure`` and never shown).

Every function returns a new :class:`matplotlib.figure.Figure`; the caller hands it to
``ExperimentLogger.log_figure`` (which saves and closes it). No pyplot state is used, so nothing depends
on the interactive backend or leaks figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from optim.metrics.classification import pr_curve, roc_curve

matplotlib.use("Agg")
logger = logging.getLogger(__name__)


def _np(image: Any) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    return np.asarray(image, dtype=np.float64).squeeze()


def example_strip(inf: Any, indices: Sequence[int], *, threshold: float | None = None, title: str = "") -> Figure:
    """Rows of (input, reconstruction, anomaly map, thresholded map, ground truth) for chosen images.

    Args:
        inf: an object with ``image``, ``reconstruction``, ``anomaly_map``, ``anomaly_mask`` ([N,1,H,W] tensors,
            the last three may be None), e.g. :class:`core.evaluation.context.Inference`.
        indices: which images (rows).
        threshold: draws the binary map ``anomaly_map > threshold`` when given.
        title: figure title.
    """
    columns: list[tuple[str, Any, dict[str, Any]]] = [("input", inf.image, {"cmap": "gray", "vmin": 0, "vmax": 1})]
    if inf.reconstruction is not None:
        columns.append(("reconstruction", inf.reconstruction, {"cmap": "gray", "vmin": 0, "vmax": 1}))
    if inf.anomaly_map is not None:
        vmax = float(np.percentile(_np(inf.anomaly_map[list(indices)]), 99.5)) if len(indices) else 1.0
        columns.append(("anomaly map", inf.anomaly_map, {"cmap": "inferno", "vmin": 0, "vmax": max(vmax, 1e-8)}))
        if threshold is not None:
            binary = {"cmap": "gray", "vmin": 0, "vmax": 1}
            columns.append((f"map > {threshold:.3g}", inf.anomaly_map > threshold, binary))
    if inf.anomaly_mask is not None:
        columns.append(("ground truth", inf.anomaly_mask, {"cmap": "gray", "vmin": 0, "vmax": 1}))
    rows = max(len(indices), 1)
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * rows + 0.4))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r, index in enumerate(indices):
        for c, (name, tensor, style) in enumerate(columns):
            axes[r, c].imshow(_np(tensor[index]), **style)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def roc_pr_figure(curves: Mapping[str, tuple[Any, Any]], *, title: str = "") -> Figure:
    """ROC (left) and precision-recall (right) curves, one line per entry ``name -> (scores, labels)``."""
    fig = Figure(figsize=(9, 4))
    roc_ax, pr_ax = fig.subplots(1, 2)
    for name, (scores, labels) in curves.items():
        fpr, tpr = roc_curve(scores, labels)
        recall, precision = pr_curve(scores, labels)
        if fpr.size:
            roc_ax.plot(fpr, tpr, label=name)
            pr_ax.step(recall, precision, where="post", label=name)
    roc_ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    if curves:
        pr_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    return fig


def box_figure(values: Mapping[str, Any], *, ylabel: str, title: str = "") -> Figure:
    """Box plots (with the points) of per-image values, one box per entry ``name -> [n] values``."""
    fig = Figure(figsize=(max(4.0, 1.2 * len(values) + 2), 4))
    ax = fig.subplots()
    names = list(values)
    data = [np.asarray(_np(values[n]), dtype=np.float64).reshape(-1) for n in names]
    data = [d[np.isfinite(d)] for d in data]
    if names:
        ax.boxplot(data, tick_labels=names, showfliers=False)
        rng = np.random.default_rng(0)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=6, alpha=0.5)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_title(title)
    return fig


def intermediate_strip(images: Mapping[str, Any], indices: Sequence[int], *, title: str = "") -> Figure:
    """Rows of a model's intermediate images for chosen images, one column per named [N,1,H,W] tensor.

    Args:
        images: ``{column name: [N,1,H,W] tensor}`` in plot order (e.g. input, AutoDDPM's ``x_rec``, ``c``,
            ``mask``, ``stitched``, ``x_inp``, the anomaly map). Columns whose values lie in [0,1] are drawn in grey
            on [0,1]; others (maps, statistics) with a per-column colour scale up to their 99.5th percentile.
        indices: which images (rows).
        title: figure title.
    """
    rows = max(len(indices), 1)
    fig = Figure(figsize=(2.0 * max(len(images), 1), 2.0 * rows + 0.4))
    axes = fig.subplots(rows, max(len(images), 1), squeeze=False)
    for c, (name, tensor) in enumerate(images.items()):
        values = _np(tensor[list(indices)]) if len(indices) else np.zeros((1, 1))
        unit = values.min() >= 0.0 and values.max() <= 1.0 and name not in ("anomaly map", "c")
        style = {"cmap": "gray", "vmin": 0, "vmax": 1} if unit else \
            {"cmap": "inferno", "vmin": 0, "vmax": max(float(np.percentile(values, 99.5)), 1e-8)}
        for r, index in enumerate(indices):
            axes[r, c].imshow(_np(tensor[index]), **style)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_bars(values: Mapping[str, Mapping[str, float]], *, title: str = "",
                   ylim: tuple[float, float] | None = (0, 1)) -> Figure:
    """Grouped bars: one group per class (or model), one bar per metric (``class -> {metric: value}``)."""
    classes = list(values)
    metrics = list(dict.fromkeys(m for v in values.values() for m in v))
    fig = Figure(figsize=(max(5.0, 0.6 * len(classes) * max(len(metrics), 1) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(classes))
    for k, metric in enumerate(metrics):
        heights = [float(values[c].get(metric, np.nan)) for c in classes]
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, np.nan_to_num(heights), width, label=metric)
    ax.set_xticks(x, classes, rotation=30, ha="right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if metrics:
        ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
