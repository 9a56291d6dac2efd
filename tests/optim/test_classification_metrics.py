"""Image-level / ranking metrics against hand-computed values and scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from optim.metrics.classification import auroc, average_precision, image_level_metrics, pr_curve, roc_curve


def test_auroc_hand_computed_with_tie():
    # positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs: (0.8>0.4) 1, (0.8>0.1) 1, (0.4=0.4) 0.5, (0.4>0.1) 1 -> 3.5/4
    assert auroc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_average_precision_hand_computed():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos) -> AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 7, 300).astype(float)  # many ties
    labels = rng.integers(0, 2, 300)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores))
    t = torch.from_numpy(scores).float()
    assert auroc(t, torch.from_numpy(labels)) == pytest.approx(roc_auc_score(labels, scores))


def test_one_class_gives_nan_and_warning():
    with pytest.warns(RuntimeWarning, match="one class"):
        assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(average_precision([0.1, 0.2], [0, 0]))


def test_constant_scores_are_chance():
    assert auroc([0.3] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)
    assert average_precision([0.3] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)


def test_curves_and_image_level_metrics():
    fpr, tpr = roc_curve([0.9, 0.1], [1, 0])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    recall, precision = pr_curve([0.9, 0.1], [1, 0])
    assert recall[-1] == 1 and precision.max() == 1
    out = image_level_metrics(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1]))
    assert out == {"auroc": 1.0, "auprc": 1.0, "n_healthy": 2.0, "n_pathological": 1.0}


def test_inputs_not_mutated_and_bad_labels_rejected():
    scores = np.array([0.3, 0.1, 0.2])
    auroc(scores, [1, 0, 0])
    assert scores.tolist() == [0.3, 0.1, 0.2]
    with pytest.raises(ValueError, match="labels must be 0/1"):
        auroc(scores, [2, 0, 0])


def test_tpr_at_fpr_hand_computed_and_with_ties():
    from optim.metrics.classification import tpr_at_fpr

    negatives = np.arange(10.0)  # at 20 % FPR two negatives (8, 9) may lie above the threshold -> t = 7
    out = tpr_at_fpr(np.r_[negatives, [7.5, 9.5, 3.0]], np.r_[np.zeros(10), np.ones(3)], 0.2)
    assert out["threshold"] == 7.0 and out["achieved_fpr"] == pytest.approx(0.2)
    assert out["tpr"] == pytest.approx(2 / 3) and out["n_negative"] == 10
    # Tied negatives: no threshold between the three 5s, so none may lie above it; 5 is not > 5.
    tied = tpr_at_fpr([5.0, 5.0, 5.0, 1.0, 5.0, 6.0], [0, 0, 0, 0, 1, 1], 0.5)
    assert tied["threshold"] == 5.0 and tied["achieved_fpr"] == 0.0 and tied["tpr"] == 0.5
    with pytest.warns(RuntimeWarning, match="one class"):
        assert np.isnan(tpr_at_fpr([0.1, 0.2], [0, 0], 0.1)["tpr"])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([0.1, 0.2], [0, 1], 1.0)
