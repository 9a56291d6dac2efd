"""``predict`` with the training run's healthy calibration: p- and q-values, FDR flags, the intensity check, the
domain-shift test and the MOOD output (read back as MOOD's evaluation reads it)."""

import logging

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from core.evaluation.thresholds import ScoreCalibration
from core.prediction.calibrated import add_p_values, unit_volume
from optim.metrics import conformal, shift
from tests.core import test_predict
from tests.core.test_predict import AFFINE, _predict, _scores, _smooth_volume

run = test_predict.run  # the training-run fixture: a tiny AE checkpoint with thresholds.json


def _calibration(**changes):
    values = {"dataset": "val", "image_scores": tuple(range(1, 20)), "subject_scores": tuple(range(1, 20)),
              "aggregation": "mean", "pixel_quantiles": tuple(np.linspace(0.0, 0.5, 1001))}
    return ScoreCalibration(**{**values, **changes})


def test_p_and_q_values_by_hand():
    rows = [{"kind": "image", "input": "a", "score": 100.0},   # p = (1 + 0) / 20
            {"kind": "image", "input": "b", "score": 0.0},     # p = (1 + 19) / 20
            {"kind": "slice", "input": "c", "score": 10.0},    # p = (1 + 10) / 20, its own family
            {"kind": "volume", "input": "c", "score": 0.0, "subject_score": 19.0}]  # subjects: p = (1 + 1) / 20
    flags = add_p_values(rows, _calibration(), fdr=0.1, healthy=False)
    assert [r["p_value"] for r in rows] == pytest.approx([0.05, 1.0, 0.55, 0.1])
    # scans: p = (0.05, 1, 0.1) -> sorted x m / rank = (0.15, 0.15, 1) -> q = (0.15, 1, 0.15); the slice alone: q = p
    assert [r["q_value"] for r in rows] == pytest.approx([0.15, 1.0, 0.55, 0.15])
    assert [r["flagged_fdr0.1"] for r in rows] == [0, 0, 0, 0] and flags.n_flagged == 0 and flags.n_scans == 3
    flags = add_p_values(rows, _calibration(), fdr=0.2, healthy=False)
    assert [r["flagged_fdr0.2"] for r in rows] == [1, 0, 0, 1] and flags.flagged == ("a", "c")


def test_the_uniformity_test_runs_only_for_healthy_inputs():
    rows = [{"kind": "image", "input": str(i), "score": 100.0 + i} for i in range(8)]
    assert add_p_values([dict(r) for r in rows], _calibration(), fdr=0.05, healthy=False).uniformity_p is None
    assert add_p_values(rows, _calibration(), fdr=0.05, healthy=True).uniformity_p < 1e-6


def test_mood_voxel_scores_keep_the_ranking_and_are_zero_outside_the_brain():
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 0.1, size=(3, 8, 8)).astype(np.float32)
    brain = np.ones_like(maps, dtype=bool)
    brain[:, :2] = False
    unit = unit_volume(_calibration(), maps, brain)
    assert unit.dtype == np.float32 and unit.min() >= 0.0 and unit.max() < 1.0
    assert np.all(unit[~brain] == 0.0)
    inside = brain
    assert np.array_equal(np.argsort(unit[inside], kind="stable"), np.argsort(maps[inside], kind="stable"))


def _save_calibration(run, **changes):
    return _calibration(**changes).save(run["weights"].parent / ScoreCalibration.FILE_NAME)


def test_predict_writes_p_and_q_values_and_mood_files_read_back_as_moods_evaluation_does(run):
    calibration = _save_calibration(run)
    volume = _smooth_volume((14, 20, 6))
    nib.save(nib.Nifti1Image(volume, AFFINE), run["root"] / "case01.nii.gz")
    predict = {"inputs": [str(run["root"] / "case01.nii.gz")], "axial_range": [3, 15], "format": "mood", "fdr": 0.1}
    assert _predict(run, predict) == 0
    rows = _scores(run)
    slices, (scan,) = [r for r in rows if r["kind"] == "slice"], [r for r in rows if r["kind"] == "volume"]
    assert len(slices) == 13 and all(0.0 < float(r["p_value"]) <= 1.0 for r in rows)
    slice_scores = np.array([float(r["score"]) for r in slices])
    assert float(scan["subject_score"]) == pytest.approx(slice_scores.mean())  # the calibration's rule: mean
    assert float(scan["p_value"]) == pytest.approx(
        conformal.conformal_p_values(calibration.subject_scores, [slice_scores.mean()])[0])
    assert scan["flagged_fdr0.1"] == str(int(float(scan["q_value"]) <= 0.1))
    # MOOD's evaluation: the voxel file has the input's shape, values in [0, 1]; the sample file one float in [0, 1]
    out = run["root"] / "out" / "mood"
    pixel = nib.load(out / "pixel" / "case01.nii.gz")
    voxels = np.asarray(pixel.dataobj)
    assert pixel.shape == volume.shape and np.allclose(pixel.affine, AFFINE)
    assert voxels.min() >= 0.0 and voxels.max() <= 1.0 and voxels.max() > 0.0
    lines = (out / "sample" / "case01.nii.gz.txt").read_text().split()
    assert len(lines) == 1 and 0.0 <= float(lines[0]) <= 1.0
    assert float(lines[0]) == pytest.approx(conformal.unit_scores(calibration.subject_scores, [slice_scores.mean()])[0])
    raw = np.asarray(nib.load(run["root"] / "out" / "case01_anomaly_map.nii.gz").dataobj)
    labels = raw > np.quantile(raw[raw > 0], 0.9)  # any labelling: the [0, 1] map ranks voxels as the raw map does
    assert average_precision_score(labels.ravel(), voxels.ravel()) == pytest.approx(
        average_precision_score(labels.ravel(), raw.ravel()))
    assert np.all(voxels[:, :3] == 0.0) and np.all(voxels[:, 16:] == 0.0)  # slices outside axial_range


def _pngs(run, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = run["root"] / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_healthy_inputs_that_score_above_the_calibration_raise_a_domain_shift_warning(run, caplog):
    _save_calibration(run, image_scores=tuple(np.linspace(0.0, 1e-6, 19)))  # every new score is higher
    with caplog.at_level(logging.INFO):
        assert _predict(run, {"inputs": _pngs(run, 8), "healthy": True}) == 0
    assert "domain shift" in caplog.text
    assert all(float(r["p_value"]) == pytest.approx(0.05) for r in _scores(run))


def test_healthy_inputs_scored_like_the_calibration_raise_no_warning(run, caplog):
    inputs = _pngs(run, 8)
    with caplog.at_level(logging.INFO):  # first without a calibration: no p-value columns
        assert _predict(run, {"inputs": inputs}) == 0
    assert "p_value" not in _scores(run)[0] and "no calibration.json beside the weights" in caplog.text
    scores = [float(r["score"]) for r in _scores(run)]
    _save_calibration(run, image_scores=tuple(scores))  # the same population
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _predict(run, {"inputs": inputs, "healthy": True}, "--set", "predict.overwrite=true") == 0
    assert "domain shift" not in caplog.text and "consistent with uniform" in caplog.text


def test_inputs_unlike_the_training_data_are_named(run, caplog):
    summary = shift.training_summary({name: np.full(10, 0.9) for name in shift.STATISTICS})
    _save_calibration(run, intensity=summary)
    inputs = _pngs(run, 2)
    with caplog.at_level(logging.WARNING):
        assert _predict(run, {"inputs": inputs}) == 0
    assert f"{inputs[0]} does not look like the training data" in caplog.text
    assert all(r["intensity_check"].startswith("mean ") for r in _scores(run))


@pytest.mark.parametrize(("predict", "calibrated", "message"), [
    ({"format": "mood"}, True, "predict.format: 'mood' writes NIfTI volumes and needs NIfTI inputs"),
    ({"format": "mood", "inputs": "NIFTI"}, False, "predict.format: needs the training run's healthy calibration"),
    ({"healthy": True}, False, "predict.healthy: needs the training run's healthy calibration"),
    ({"calibration_file": "nowhere/calibration.json"}, False, "predict.calibration_file:"),
    ({"fdr": 1.5}, True, "predict.fdr: the false discovery rate must be in (0, 1)"),
    ({"format": "nifti"}, True, "predict.format"),
])
def test_bad_calibration_settings_are_refused_before_a_run_starts(run, caplog, predict, calibrated, message):
    if calibrated:
        _save_calibration(run)
    inputs = _pngs(run, 1)
    if predict.get("inputs") == "NIFTI":
        nib.save(nib.Nifti1Image(_smooth_volume((8, 8, 4)), AFFINE), run["root"] / "v.nii.gz")
        inputs = [str(run["root"] / "v.nii.gz")]
    with caplog.at_level(logging.ERROR):
        assert _predict(run, {**predict, "inputs": inputs}) == 2
    assert message in caplog.text
    assert not (run["root"] / "runs").exists()
