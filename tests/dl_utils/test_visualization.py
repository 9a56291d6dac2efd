"""Evaluation figures: they draw what they are given and save as PNG without a display."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from dl_utils.visualization import (
    box_figure,
    cost_vs_quality,
    example_strip,
    heatmap,
    image_grid,
    p_value_figure,
    per_class_bars,
    roc_pr_figure,
    subject_fpr_figure,
)


def _png(fig: Figure, tmp_path, name: str) -> int:
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    return path.stat().st_size


def test_example_strip_has_one_column_per_available_image(tmp_path):
    x = torch.rand(5, 1, 16, 16)
    full = SimpleNamespace(image=x, reconstruction=x * 0.5, anomaly_map=x, anomaly_mask=(x > 0.9).float())
    fig = example_strip(full, [0, 3], threshold=0.5, title="lesions")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["input", "reconstruction", "anomaly map", "map > 0.5", "ground truth"]
    assert len(fig.axes) == 2 * 5 and _png(fig, tmp_path, "strip") > 1000
    bare = SimpleNamespace(image=x, reconstruction=None, anomaly_map=x, anomaly_mask=None)
    assert len(example_strip(bare, [1]).axes) == 2  # input and map only


def test_roc_pr_figure_draws_one_line_per_set_and_skips_one_class_sets(tmp_path):
    rng = np.random.default_rng(0)
    curves = {"a": (rng.random(20), np.r_[np.zeros(10), np.ones(10)]), "b": (rng.random(4), np.ones(4))}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # set 'b' has one class: no curve
        fig = roc_pr_figure(curves, title="t")
    roc_ax, pr_ax = fig.axes
    assert len(roc_ax.lines) == 2  # curve 'a' + chance diagonal
    assert len(pr_ax.lines) == 1 and _png(fig, tmp_path, "roc") > 1000


def test_box_and_bar_figures(tmp_path):
    fig = box_figure({"x": np.array([0.1, 0.5, np.nan]), "y": torch.tensor([0.2, 0.3])}, ylabel="Dice")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["x", "y"]
    assert _png(fig, tmp_path, "box") > 1000
    bars = per_class_bars({"edema": {"F1": 0.5, "detected": 0.75}, "mass": {"F1": 0.2}}, title="loc")
    heights = sorted(round(p.get_height(), 3) for p in bars.axes[0].patches)
    assert heights == [0.0, 0.2, 0.5, 0.75]  # missing 'detected' for mass drawn as 0
    assert _png(bars, tmp_path, "bars") > 1000


def _cells(ax) -> dict[tuple[int, int], str]:
    """Annotation text per (row, column) cell, read from the text positions (x = column, y = row)."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_heatmap_annotates_every_cell_in_row_and_column_order(tmp_path):
    values = {"ae": {"all": 0.912, "edema": 0.5}, "vae": {"edema": 0.25, "all": float("nan"), "mass": 0.0751},
              "ddpm": {"mass": 1.0}}
    fig = heatmap(values, title="image AUROC", fmt=".3f")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ae", "vae", "ddpm"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "edema", "mass"]  # union, first seen
    assert _cells(ax) == {(0, 0): "0.912", (0, 1): "0.500", (0, 2): "–",
                          (1, 0): "–", (1, 1): "0.250", (1, 2): "0.075",
                          (2, 0): "–", (2, 1): "–", (2, 2): "1.000"}
    assert len(ax.texts) == 9 and ax.get_title() == "image AUROC"
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert _png(fig, tmp_path, "heatmap") > 1000


def test_heatmap_text_is_readable_and_missing_cells_are_grey():
    fig = heatmap({"m": {"low": 0.0, "high": 1.0, "none": float("nan")}}, title="t", cmap="gray")
    ax = fig.axes[0]
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours == {"0.00": "white", "1.00": "black", "–": "black"}  # white on black, black on white
    cell = ax.images[0].to_rgba(ax.images[0].get_array())[0]
    assert np.allclose(cell[2, :3], 0.85)  # the NaN cell: light grey, not a colour of the scale


def test_heatmap_size_grows_with_the_table_and_is_capped():
    small = heatmap({"a": {"x": 0.5}}, title="t").get_size_inches()
    wide = {f"m{i}": {f"class {j}": 0.5 for j in range(8)} for i in range(16)}
    medium = heatmap(wide, title="t").get_size_inches()
    huge = heatmap({f"m{i}": {f"c{j}": 0.5 for j in range(60)} for i in range(80)}, title="t").get_size_inches()
    assert small[0] < medium[0] <= 14 and small[1] < medium[1] <= 10
    assert tuple(huge) == (14, 10)
    empty = heatmap({}, title="nothing")
    assert [t.get_text() for t in empty.axes[0].texts] == ["no values"]


def test_cost_vs_quality_labels_each_drawn_point_and_counts_the_left_out(tmp_path):
    points = {"ae": (120.0, 0.7), "ddpm": (3600.0, 0.9), "broken": (float("nan"), 0.5),
              "no_eval": (50.0, float("nan"))}
    fig = cost_vs_quality(points, xlabel="wall s", ylabel="AUROC", title="cost")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["ae", "ddpm"]
    assert {t.get_text(): tuple(t.xy) for t in ax.texts} == {"ae": (120.0, 0.7), "ddpm": (3600.0, 0.9)}
    assert np.allclose(ax.collections[0].get_offsets(), [[120.0, 0.7], [3600.0, 0.9]])
    assert ax.get_xscale() == "log" and ax.get_title() == "cost (2 of 4 left out: NaN or x <= 0)"
    assert _png(fig, tmp_path, "scatter") > 1000
    fig.canvas.draw()  # the log axis is labelled with plain numbers at 1, 2, 5 per decade, none colliding
    shown = [t.get_text() for t in ax.get_xticklabels() if ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert shown == ["200", "500", "1000", "2000"], shown
    linear = cost_vs_quality({"a": (0.0, 0.5)}, xlabel="x", ylabel="y", title="t", logx=False).axes[0]
    assert [t.get_text() for t in linear.texts] == ["a"] and linear.get_title() == "t"
    logx = cost_vs_quality({"a": (0.0, 0.5), "b": (1.0, float("nan"))}, xlabel="x", ylabel="y", title="t").axes[0]
    assert len(logx.texts) == 0 and logx.get_title() == "t (2 of 2 left out: NaN or x <= 0)"  # 0 on a log axis


def test_subject_fpr_figure_marks_each_target(tmp_path):
    fig = subject_fpr_figure({"fpr1pct": np.array([0.0, 0.02, np.nan]), "fpr5pct": np.array([0.04, 0.1])},
                             {"fpr1pct": 0.01, "fpr5pct": 0.05}, title="healthy")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fpr1pct", "fpr5pct"]
    from matplotlib.collections import LineCollection, PathCollection

    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert sorted(float(seg[0][1]) for c in lines for seg in c.get_segments()) == [0.01, 0.05]
    points = [len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)]
    assert points == [2, 2]  # the finite subjects of each box (the NaN one is left out)
    assert _png(fig, tmp_path, "fpr") > 1000


def test_p_value_figure_draws_the_uniform_line_each_ecdf_and_the_alphas(tmp_path):
    fig = p_value_figure({"image": np.array([0.1, 0.5, 0.9]), "subject": np.array([0.3])}, [0.01, 0.05])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["uniform", "image (n=3)", "subject (n=1)"]
    image = next(line for line in ax.get_lines() if line.get_label() == "image (n=3)")
    assert list(image.get_ydata()) == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    assert sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_label().startswith("_")) == [0.01, 0.05]
    assert _png(fig, tmp_path, "p") > 1000


def test_image_grid_fills_rows_and_hides_empty_cells(tmp_path):
    fig = image_grid(torch.rand(5, 1, 8, 8), columns=3, title="samples")
    assert len(fig.axes) == 6 and sum(1 for ax in fig.axes if ax.images) == 5
    assert all(ax.images[0].get_clim() == (0, 1) for ax in fig.axes if ax.images)
    assert _png(fig, tmp_path, "grid") > 1000
