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
from matplotlib import ticker
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


def subject_fpr_figure(fprs: Mapping[str, Any], targets: Mapping[str, float], *, title: str = "") -> Figure:
    """Per-subject healthy false-positive rates: one box (with the subjects as points) per operating point.

    Args:
        fprs: ``label -> [S] per-subject FPR`` in [0,1], one entry per healthy threshold.
        targets: ``label -> target FPR`` of that threshold (drawn as a red tick across its box).
        title: figure title.
    """
    fig = Figure(figsize=(max(4.0, 1.3 * len(fprs) + 2), 4))
    ax = fig.subplots()
    names = list(fprs)
    data = [np.asarray(_np(fprs[n]), dtype=np.float64).reshape(-1) for n in names]
    data = [d[np.isfinite(d)] for d in data]
    if names:
        ax.boxplot(data, tick_labels=names, showfliers=False)
        rng = np.random.default_rng(0)
        for i, (name, d) in enumerate(zip(names, data, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=8, alpha=0.6)
            if name in targets:
                ax.hlines(targets[name], i - 0.35, i + 0.35, colors="tab:red", linewidth=2,
                          label="target (healthy validation)" if i == 1 else None)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("false-positive rate per healthy subject")
    ax.set_title(title)
    return fig


def p_value_figure(p_values: Mapping[str, Any], alphas: Sequence[float], *, title: str = "") -> Figure:
    """Empirical distribution functions of p-values against the uniform diagonal (valid p-values on healthy data
    lie on or below it), the nominal levels ``alphas`` marked.

    Args:
        p_values: ``label -> [n] p-values`` in [0,1] (e.g. 'image', 'subject').
        alphas: nominal levels drawn as vertical lines.
        title: figure title.
    """
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="uniform")
    for name, values in p_values.items():
        p = np.sort(np.asarray(_np(values), dtype=np.float64).reshape(-1))
        if p.size:
            ax.step(np.r_[0.0, p, 1.0], np.r_[0.0, np.arange(1, p.size + 1) / p.size, 1.0], where="post",
                    label=f"{name} (n={p.size})")
    for alpha in alphas:
        ax.axvline(alpha, color="tab:red", linewidth=0.8, alpha=0.6)
    ax.set(xlabel="p-value", ylabel="fraction <= p", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def image_grid(images: Any, *, columns: int = 8, title: str = "") -> Figure:
    """A grid of images ([N,1,H,W] or [N,H,W] in [0,1], drawn in grey on [0,1]), ``columns`` per row."""
    values = _np(images).reshape(-1, *_np(images).shape[-2:])
    columns = max(1, min(columns, len(values)))
    rows = max(1, -(-len(values) // columns))
    fig = Figure(figsize=(1.4 * columns, 1.4 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, values, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=10)
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


MISSING = "–"


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell colour)."""
    luminance = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return "black" if luminance > 0.5 else "white"


def heatmap(values: Mapping[str, Mapping[str, float]], *, title: str, vmin: float = 0.0, vmax: float = 1.0,
            fmt: str = ".2f", cmap: str = "viridis") -> Figure:
    """An annotated table of numbers: one row per outer key (e.g. method), one column per inner key (e.g. class).

    Args:
        values: ``{row: {column: value}}``; rows in the mapping's order, columns the union of the inner keys in
            first-seen order. A missing or NaN cell is drawn grey and annotated "–".
        title: figure title.
        vmin, vmax: the colour scale's range (values outside it take the end colours; the annotation is exact).
        fmt: format spec of the cell annotations (``format(value, fmt)``).
        cmap: a matplotlib colormap name.

    The size grows with the number of rows and columns, capped at 14 x 10 inches.
    """
    rows = list(values)
    columns = list(dict.fromkeys(c for v in values.values() for c in v))
    data = np.array([[float(values[r].get(c, np.nan)) for c in columns] for r in rows],
                    dtype=np.float64).reshape(len(rows), len(columns))
    width = min(14.0, max(5.0, 2.5 + 0.9 * len(columns)))
    height = min(10.0, max(2.5, 1.4 + 0.35 * len(rows)))
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.set_title(title)
    if data.size == 0:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = data[i, j]
            if np.isfinite(value):
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                        color=_text_colour(colours(image.norm(value))))
            else:
                ax.text(j, i, MISSING, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(np.arange(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def cost_vs_quality(points: Mapping[str, tuple[float, float]], *, xlabel: str, ylabel: str, title: str,
                    logx: bool = True) -> Figure:
    """A scatter of one point per entry ``name -> (x, y)`` (e.g. wall seconds, image AUROC), each labelled.

    A point with a NaN (or infinite) coordinate, or with x <= 0 on a log x axis, cannot be drawn: it is left
    out and the title says how many were.
    """
    kept = {name: (float(x), float(y)) for name, (x, y) in points.items()
            if np.isfinite(x) and np.isfinite(y) and (not logx or x > 0)}
    left_out = len(points) - len(kept)
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    if kept:
        xs, ys = zip(*kept.values(), strict=True)
        ax.scatter(xs, ys, s=25)
    for name, (x, y) in kept.items():
        ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    if logx:
        ax.set_xscale("log")
        # plain numbers at 1, 2 and 5 per decade, no labels on the other ticks (they collide: "3x10^1 4x10^1")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    reason = "NaN or x <= 0" if logx else "NaN"
    ax.set_title(title + (f" ({left_out} of {len(points)} left out: {reason})" if left_out else ""))
    fig.tight_layout()
    return fig
