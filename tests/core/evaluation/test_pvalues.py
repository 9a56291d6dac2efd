"""Calibration scores (the artifact) and the calibrated p-values' validity check and power, by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.evaluation import DownstreamEvaluator, evaluate
from core.evaluation.context import EvalContext
from core.evaluation.runner import run_tasks
from core.evaluation.thresholds import ScoreCalibration
from tests.core.evaluation._slices import MapIsImage, Slices, make_slice

TASKS = {"p_values": DownstreamEvaluator(task="calibration_check", alphas=[0.05, 0.25]),
         "score_calibration": DownstreamEvaluator(task="score_calibration", aggregation="max",
                                                  reference=None)}  # still runs first


def _healthy(values, prefix: str, per_subject: int = 1):
    return [make_slice(v, f"{prefix}{i // per_subject}") for i, v in enumerate(values)]


def test_empirical_fpr_and_power_hand_computed():
    # Calibration: 19 images (scores k/32) of 19 subjects; healthy test: 4 images, one above every calibration
    # score (p = 1/20 <= 0.05), one between the 14th and 15th (p = 6/20 > 0.25), two low.
    calib = [k / 32 for k in range(1, 20)]
    data = Slices({"val": _healthy(calib, "v"), "healthy_test": _healthy([0.75, 14.5 / 32, 0.5 / 32, 1.5 / 32], "h"),
                   "lesions": [make_slice(0.8, f"p{i}", label=1) for i in range(3)]})
    out = evaluate(MapIsImage(), data, TASKS)
    m = out["p_values"]["healthy_test"]
    assert m["image_fpr_alpha5pct"] == pytest.approx(1 / 4) and m["image_fpr_n"] == 4
    assert m["image_fpr_alpha25pct"] == pytest.approx(1 / 4)  # p = 6/20 = 0.3 is above 0.25
    # 1 of 4 at alpha 0.05: Clopper-Pearson [0.0063, 0.806]; a valid calibration (k = 1 of n + 1 = 20) gives
    # K ~ BetaBinomial(4, 1, 19), whose central 95 % range is 0..1 of 4 -> valid.
    assert m["image_fpr_alpha5pct_low"] == pytest.approx(0.00631, abs=1e-5)
    assert (m["image_fpr_alpha5pct_accept_low"], m["image_fpr_alpha5pct_accept_high"]) == (0.0, 0.25)
    assert m["image_valid_alpha5pct"] == 1.0 and m["image_valid_alpha25pct"] == 1.0
    power = out["p_values"]["lesions"]
    assert power["image_power_alpha5pct"] == 1.0 and power["subject_power_alpha5pct"] == 1.0
    assert out["score_calibration"]["val"]["min_p_image"] == pytest.approx(1 / 20)


def test_the_check_fails_when_the_healthy_test_set_scores_higher():
    rng = np.random.default_rng(0)
    data = Slices({"val": _healthy(rng.uniform(0, 0.5, 40), "v"),
                   "healthy_test": _healthy(rng.uniform(0.3, 0.8, 40), "h")})  # a shifted "scanner"
    m = evaluate(MapIsImage(), data, TASKS)["p_values"]["healthy_test"]
    assert m["image_fpr_alpha5pct"] > m["image_fpr_alpha5pct_accept_high"]
    assert m["image_valid_alpha5pct"] == 0.0 and m["subject_valid_alpha5pct"] == 0.0


def test_exchangeable_healthy_scores_are_valid_at_both_levels():
    rng = np.random.default_rng(0)  # (a valid calibration still fails a 95 % check in about 1 of 20 draws)
    data = Slices({"val": _healthy(rng.uniform(0, 1, 90), "v", per_subject=3),
                   "healthy_test": _healthy(rng.uniform(0, 1, 90), "h", per_subject=3)})
    m = evaluate(MapIsImage(), data, TASKS)["p_values"]["healthy_test"]
    assert m["image_fpr_n"] == 90 and m["subject_fpr_n"] == 30
    assert all(m[f"{level}_valid_alpha{a}pct"] == 1.0 for level in ("image", "subject") for a in (5, 25))


def test_calibration_is_saved_beside_the_thresholds_and_read_back(tmp_path):
    data = Slices({"val": _healthy([0.1, 0.2, 0.4, 0.3], "v", per_subject=2), "healthy_test": _healthy([0.5], "h")})
    ctx = EvalContext(model=MapIsImage(), data=data, device="cpu", artifact_dir=tmp_path, progress=False)
    dict(run_tasks({"c": DownstreamEvaluator(task="score_calibration", aggregation="max", reference="val")}, ctx))
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["provenance"]["dataset"] == "val" and saved["provenance"]["aggregation"] == "max"
    calibration = ScoreCalibration.load(tmp_path / "calibration.json")
    assert calibration.image_scores == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert calibration.subject_scores == pytest.approx((0.2, 0.4))  # max of each subject's two slices
    assert calibration.subject_score([0.1, 0.7]) == pytest.approx(0.7)
    # The healthy maps' brain-pixel quantiles (map = image here: 0.1 .. 0.4 on the brain) and the intensity summary.
    assert len(calibration.pixel_quantiles) == 1001
    quantiles = calibration.pixel_quantiles
    assert (quantiles[0], quantiles[500], quantiles[-1]) == pytest.approx((0.1, 0.25, 0.4))
    assert calibration.intensity_dataset == "val" and set(calibration.intensity) >= {"mean", "p50", "foreground"}
    assert calibration.intensity["mean"][0] == pytest.approx(0.1, abs=0.01)
    # A later evaluation without a score_calibration block reads the saved file.
    later = EvalContext(model=MapIsImage(), data=data, device="cpu", artifact_dir=tmp_path, progress=False)
    results = dict(run_tasks({"p": DownstreamEvaluator(task="calibration_check")}, later))
    assert results["p"].metrics["healthy_test"]["subject_fpr_n"] == 1
    assert str(tmp_path / "calibration.json") in results["p"].manifest["calibration"]["source"]


def test_without_calibration_the_check_names_the_task_to_enable():
    data = Slices({"healthy_test": _healthy([0.5], "h")})
    with pytest.raises(FileNotFoundError, match="enable a 'score_calibration' task"):
        evaluate(MapIsImage(), data, {"p": DownstreamEvaluator(task="calibration_check")})
    with pytest.raises(ValueError, match="needs at least one score"):
        ScoreCalibration(dataset="val", image_scores=(), subject_scores=(0.1,), aggregation="mean")
