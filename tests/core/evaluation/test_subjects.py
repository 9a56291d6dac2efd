"""Per-subject tasks on hand-made slices whose maps are the images themselves (numbers computed by hand)."""

from __future__ import annotations

import pytest

from core.evaluation import DownstreamEvaluator, evaluate
from core.evaluation.context import EvalContext
from core.evaluation.thresholds import Thresholds
from optim.metrics.segmentation import ThresholdResult
from tests.core.evaluation._slices import MapIsImage, Slices, make_slice


def _thresholds(value: float = 0.5) -> Thresholds:
    point = ThresholdResult(threshold=value, target_fpr=0.05, achieved_fpr=0.05, region="foreground", n_images=4,
                            n_pixels=64)
    return Thresholds(dataset="val", region="foreground", n_images=4, points=(point,))


def _run(data: Slices, task: str, **options) -> dict:
    return evaluate(MapIsImage(), data, {task: DownstreamEvaluator(task=task, **options)},
                    thresholds=_thresholds())[task]


def test_subject_detection_aggregates_slice_scores_by_the_rule():
    # Dyadic values: the means are exact, so the ties are ties.
    data = Slices({"healthy_test": [make_slice(0.125, "h1"), make_slice(0.375, "h1"), make_slice(0.25, "h2"),
                                    make_slice(0.25, "h2")],
                   "lesions": [make_slice(0.3125, "p1", label=1), make_slice(0.875, "p1", label=1),
                               make_slice(0.4375, "p2", label=1), make_slice(0.0625, "p2", label=1)]})
    # mean: healthy 0.25, 0.25; pathological 0.59375, 0.25 (ties count 1/2) -> AUROC (2 + 1) / 4
    mean = _run(data, "subject_detection", aggregation="mean")
    assert mean["lesions"]["auroc"] == pytest.approx(0.75) and mean["lesions"]["n_pathological"] == 2
    # max: healthy 0.375, 0.25; pathological 0.875, 0.4375 -> every pair ordered
    peak = _run(data, "subject_detection", aggregation="max")
    assert peak["lesions"]["auroc"] == pytest.approx(1.0)
    assert peak["all_pathological"]["mood_sample_ap"] == pytest.approx(1.0)
    assert peak["healthy_test"] == {"n_subjects": 2.0, "n_slices": 4.0}
    low = _run(data, "subject_detection", aggregation="quantile", quantile=0.25)
    # 0.25 quantiles: healthy 0.1875, 0.25; pathological 0.453125, 0.15625 -> (2 + 0) / 4
    assert low["lesions"]["auroc"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="aggregation"):
        DownstreamEvaluator(task="subject_detection", aggregation="median")


def test_healthy_fpr_per_subject_distribution():
    # h1: 2 hot brain pixels over 32 counted; h2: none; h3: 16 of 16 (every brain pixel of its one slice)
    data = Slices({"healthy_test": [make_slice(0.1, "h1", hot=2), make_slice(0.1, "h1"), make_slice(0.1, "h2"),
                                    make_slice(0.1, "h2"), make_slice(0.1, "h3", hot=16)]})
    out = _run(data, "healthy_fpr")
    m = out["healthy_test"]
    assert m["n_subjects"] == 3 and m["n_slices"] == 5
    assert m["fpr5pct_median"] == pytest.approx(2 / 32) and m["fpr5pct_max"] == pytest.approx(1.0)
    assert m["fpr5pct_q25"] == pytest.approx(1 / 32) and m["fpr5pct_q75"] == pytest.approx((2 / 32 + 1) / 2)
    assert m["fpr5pct_any_fp"] == pytest.approx(2 / 3) and m["fpr5pct_pooled"] == pytest.approx(18 / 80)


def test_healthy_fpr_needs_thresholds():
    data = Slices({"healthy_test": [make_slice(0.1, "h1")]})
    with pytest.raises(FileNotFoundError, match="enable a 'thresholding' task"):
        evaluate(MapIsImage(), data, {"f": DownstreamEvaluator(task="healthy_fpr")})


def test_subject_dice_and_mood_voxel_ap():
    lesion = (slice(2, 4), slice(2, 4))  # 4 pixels
    outside = (slice(0, 1), slice(0, 4))  # 4 pixels above the lesion, outside it
    p2 = make_slice(0.1, "p2", lesion=lesion, lesion_value=0.6, label=1)
    p2.image[0][outside] = 0.6
    data = Slices({"healthy_test": [make_slice(0.1, "h1", hot=2), make_slice(0.1, "h1")],
                   "lesions": [make_slice(0.1, "p1", lesion=lesion, label=1),
                               make_slice(0.1, "p1", lesion=lesion, label=1), p2]})
    out = _run(data, "subject_segmentation", region="all")
    m = out["lesions"]
    # p1: 8 of 8 lesion pixels found, nothing else -> Dice 1; p2: 4 lesion + 4 false pixels -> 2*4 / (8 + 4)
    assert m["dice_subject_max"] == pytest.approx(1.0) and m["dice_subject_min"] == pytest.approx(2 / 3)
    assert m["dice_subject_n"] == 2
    # Pixels of all cases pooled: 0.95 (2 healthy negatives), 0.9 (8 positives), 0.6 (4 positives + 4 negatives):
    # AP = 8/12 * 8/10 + 4/12 * 12/18. Without the healthy case's pixels it would be 8/12 + 4/12 * 12/16.
    assert m["mood_voxel_ap"] == pytest.approx(8 / 12 * 8 / 10 + 4 / 12 * 12 / 18)
    assert out["all_annotated"]["mood_voxel_ap"] == pytest.approx(m["mood_voxel_ap"])


def test_sets_without_subjects_count_each_image_and_say_so():
    # No subject column: the ids default to the image paths, so every slice is a subject of its own.
    data = Slices({"healthy_test": [make_slice(0.1, "", hot=16), make_slice(0.1, "")]}, named=False)
    result = DownstreamEvaluator(task="healthy_fpr")(EvalContext(model=MapIsImage(), data=data, device="cpu",
                                                                 progress=False), thresholds=_thresholds())
    assert result.metrics["healthy_test"]["n_subjects"] == 2 and result.metrics["healthy_test"]["fpr5pct_any_fp"] == 0.5
    assert "each image is its own subject: healthy_test" in " ".join(result.notes)


def test_segmentation_reports_aupro_and_tpr_at_the_healthy_thresholds():
    lesion = (slice(2, 4), slice(2, 4))
    found = make_slice(0.1, "p1", lesion=lesion, label=1)
    missed = make_slice(0.1, "p2", lesion=lesion, lesion_value=0.3, label=1)  # below the 0.5 threshold
    data = Slices({"lesions": [found, missed]})
    m = _run(data, "segmentation", region="all")["lesions"]
    assert m["tpr_pooled"] == pytest.approx(0.5) and m["tpr_pooled_fpr5pct"] == pytest.approx(0.5)
    # Both regions are ranked above every normal pixel: PRO reaches 1 at FPR 0.
    assert m["aupro"] == pytest.approx(1.0) and m["aupro_n_regions"] == 2 and m["aupro_fpr_limit"] == 0.3
