"""Intensity statistics of preprocessed slices, the training range and the out-of-range check, by hand."""

import numpy as np
import pytest

from optim.metrics.shift import out_of_range, slice_statistics, training_summary


def test_slice_statistics_hand_computed():
    image = np.zeros((1, 1, 10, 10))
    image[0, 0, :5] = 0.5  # half the slice at 0.5
    image[0, 0, 0, 0] = 1.0
    stats = slice_statistics(image)
    assert stats["mean"][0] == pytest.approx((49 * 0.5 + 1.0) / 100)
    assert stats["foreground"][0] == pytest.approx(0.5) and stats["p99"][0] == pytest.approx(0.505)
    assert stats["p50"][0] == pytest.approx(0.25)  # between the 50th (0) and 51st (0.5) value
    with pytest.raises(ValueError, match="expected"):
        slice_statistics(np.zeros((4, 4)))


def test_training_range_flags_another_scaling_but_not_a_similar_scan():
    rng = np.random.default_rng(0)
    train = rng.uniform(0.0, 1.0, (200, 16, 16)) * rng.uniform(0.8, 1.0, (200, 1, 1))
    summary = training_summary(slice_statistics(train))
    assert set(summary) == {"mean", "p50", "p90", "p99", "foreground"} and summary["mean"][0] < summary["mean"][1]
    similar = rng.uniform(0.0, 1.0, (5, 16, 16)) * 0.9
    assert out_of_range(summary, slice_statistics(similar)) == {}
    dark = similar * 0.2  # e.g. another contrast or scaling rule
    flagged = out_of_range(summary, slice_statistics(dark))
    assert {"mean", "p50", "p90", "p99"} <= set(flagged)
    value, low, high = flagged["mean"]
    assert value < low < high and value == pytest.approx(float(np.median(dark.reshape(5, -1).mean(1))))
    # A constant statistic (every training slice all foreground) still tolerates 0.02, not more.
    constant = training_summary(slice_statistics(np.ones((10, 10, 10))))
    almost = np.ones((1, 10, 10))
    almost[0, 0, :1] = 0.0  # 99 % foreground
    assert "foreground" not in out_of_range(constant, slice_statistics(almost))
    almost[0, :1] = 0.0  # 90 %
    assert "foreground" in out_of_range(constant, slice_statistics(almost))
