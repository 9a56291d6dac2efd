"""Evaluation figures: they draw what they are given and save as PNG without a display."""

from types import SimpleNamespace

import numpy as np
import torch
from matplotlib.figure import Figure

from dl_utils.visualization import box_figure, example_strip, per_class_bars, roc_pr_figure


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
