"""The reference box localisation metric (docs/methods.md#object-level-localisation) on hand-built cases."""

import numpy as np
import pytest

from optim.metrics.localization import localization_per_image, localization_summary


def _case():
    maps = np.zeros((1, 1, 10, 10))
    box = np.zeros_like(maps)
    box[0, 0, 0:4, 0:5] = 1  # area 20
    healthy = 1 - box
    return maps, box, healthy


def test_true_positive_without_false_positives():
    maps, box, healthy = _case()
    maps[0, 0, 0:1, 0:3] = 2.0  # 3 supra-threshold pixels = 15 % > 10 % of the box; a+ = 6
    maps[0, 0, 9, 9] = 5.0  # healthy mass a- = 5 -> FP = floor(5 / 6) = 0
    maps[0, 0, 5, 5] = 0.4  # below threshold: set to 0, counts nowhere
    out = localization_per_image(maps, box, healthy, threshold=0.5)
    assert out["tp"][0] == 1 and out["fp"][0] == 0
    assert out["mass_anomaly"][0] == 6.0 and out["mass_healthy"][0] == 5.0
    assert out["precision"][0] == 1 and out["f1"][0] == 1


def test_false_positives_from_healthy_mass():
    maps, box, healthy = _case()
    maps[0, 0, 0, 0:3] = 1.0  # a+ = 3, TP (15 %)
    maps[0, 0, 6:8, 6:9] = 2.0  # a- = 12 -> FP = floor(12 / 3) = 4
    out = localization_per_image(maps, box, healthy, threshold=0.5)
    assert out["fp"][0] == 4 and out["precision"][0] == pytest.approx(1 / 5)
    assert out["f1"][0] == pytest.approx(2 * 0.2 / 1.2)


def test_missed_box_and_exactly_ten_percent_is_not_enough():
    maps, box, healthy = _case()
    maps[0, 0, 0, 0:2] = 1.0  # 2 of 20 = exactly 10 %: not "more than"
    out = localization_per_image(maps, box, healthy, threshold=0.5)
    assert out["tp"][0] == 0 and out["precision"][0] == 0 and out["f1"][0] == 0
    # a+ = 2 < 1? no: FP uses max(a+, 1); nothing healthy -> FP 0
    assert out["fp"][0] == 0


def test_empty_region_is_nan_and_summary_counts():
    maps, box, healthy = _case()
    maps[0, 0, 0, 0:3] = 1.0
    maps2 = np.concatenate([maps, maps])
    box2 = np.concatenate([box, np.zeros_like(box)])
    with pytest.warns(RuntimeWarning, match="empty region"):
        per = localization_per_image(maps2, box2, np.concatenate([healthy, healthy]), threshold=0.5)
    assert np.isnan(per["tp"][1])
    summary = localization_summary(per)
    assert summary["n_detected"] == 1 and summary["n_total"] == 1 and summary["f1_mean"] == 1


def test_constant_map_below_threshold_detects_nothing():
    maps, box, healthy = _case()
    out = localization_per_image(maps + 0.1, box, healthy, threshold=0.5)
    assert out["tp"][0] == 0 and out["mass_healthy"][0] == 0
