"""Per-subject aggregation, Dice, healthy FPR and distribution summaries, by hand."""

import numpy as np
import pytest
import torch

from optim.metrics.subjects import aggregate_scores, dice_per_subject, distribution, fpr_per_subject, group


def test_group_keeps_first_appearance_order():
    ids, index = group(["b", "a", "b", "c"])
    assert ids == ["b", "a", "c"] and index.tolist() == [0, 1, 0, 2]


def test_aggregate_scores_by_rule():
    scores, subjects = [1.0, 3.0, 10.0, 2.0, 4.0], ["x", "x", "y", "x", "y"]
    assert aggregate_scores(scores, subjects, "mean") == (["x", "y"], pytest.approx([2.0, 7.0]))
    assert aggregate_scores(torch.tensor(scores), subjects, "max")[1] == pytest.approx([3.0, 10.0])
    assert aggregate_scores(scores, subjects, "quantile", 0.5)[1] == pytest.approx([2.0, 7.0])
    assert aggregate_scores(scores, subjects, "quantile", 1.0)[1] == pytest.approx([3.0, 10.0])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_scores(scores, subjects, "median")
    with pytest.raises(ValueError, match="5 scores for 2 subject ids"):
        aggregate_scores(scores, ["x", "y"])


def test_dice_and_fpr_pool_pixels_over_a_subjects_slices():
    maps = np.zeros((3, 1, 2, 2))
    masks = np.zeros_like(maps)
    masks[0, 0, 0, 0] = 1
    maps[0, 0, 0, 0] = 1.0  # subject a, slice 0: hit
    masks[1, 0, 1, 1] = 1  # subject a, slice 1: missed; a per-slice mean would give (1 + 0) / 2
    maps[2, 0, 0] = 1.0  # subject b: two false positives, no lesion
    ids, dice = dice_per_subject(maps, masks, ["a", "a", "b"], 0.5)
    assert ids == ["a", "b"] and dice == pytest.approx([2 * 1 / (1 + 2), 0.0])
    ids, dice = dice_per_subject(np.zeros_like(maps), np.zeros_like(masks), ["a", "a", "b"], 0.5)
    assert np.isnan(dice).all()  # nothing predicted, nothing to find
    brain = np.ones_like(maps)
    brain[2, 0, 1] = 0  # b counts 2 pixels
    ids, fpr, false_pos = fpr_per_subject(maps, ["a", "a", "b"], 0.5, brain)
    assert fpr == pytest.approx([1 / 8, 1.0]) and false_pos.tolist() == [1.0, 2.0]
    assert fpr_per_subject(maps, ["a", "a", "b"], 0.5)[1] == pytest.approx([1 / 8, 2 / 4])
    assert np.isnan(fpr_per_subject(maps, ["a", "a", "b"], 0.5, np.zeros_like(maps))[1]).all()


def test_distribution_summary_and_empty_input():
    out = distribution([0.0, 1.0, 2.0, 3.0, np.nan], "x_")
    assert out["x_median"] == 1.5 and out["x_q25"] == 0.75 and out["x_iqr"] == 1.5 and out["x_n"] == 4
    assert out["x_mean"] == 1.5 and out["x_min"] == 0.0 and out["x_max"] == 3.0
    with pytest.warns(RuntimeWarning, match="no finite value"):
        empty = distribution([np.nan])
    assert np.isnan(empty["median"]) and empty["n"] == 0
