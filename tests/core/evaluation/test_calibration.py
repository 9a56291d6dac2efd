"""The mask_calibration task: AutoDDPM's tau at a healthy FPR of c, computed as at test time, recorded everywhere."""

import json

import pytest
import torch

from core.evaluation import build_downstream, run_downstream
from core.evaluation.runner import execution_order
from core.evaluation.thresholds import MaskCalibration, ScoreCalibration, Thresholds
from dl_utils.run import Run
from tests.core.evaluation.fakes import FakeData, RecordingLogger, TinyModel, block
from tests.model_zoo.test_autoddpm import tiny_autoddpm

TASKS = {
    "thresholds": block("thresholding", fprs=[0.05]),
    "segmentation": block("segmentation", fpr=0.05, datasets=["lesions"]),
    "calibration": block("mask_calibration", fpr=0.1),  # last in YAML, still runs first
}


def _run(tmp_path, model, tasks=TASKS):
    data, log = FakeData(), RecordingLogger()
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=5, logger=log)
    results = run_downstream(build_downstream(tasks, data=data), model=model, data=data, run=run, progress=False)
    return results, run, data, log


def test_calibrated_tau_gives_the_target_fpr_of_c_at_test_time(tmp_path):
    model = tiny_autoddpm(tau="calibrated")
    results, run, data, log = _run(tmp_path, model)
    calibration = MaskCalibration.load(tmp_path / "checkpoints" / MaskCalibration.FILE_NAME)
    assert calibration.value == results["calibration"]["val"]["mask_threshold"]
    assert model.needs_mask_threshold and "calibrat" not in str(model.provenance())  # the model keeps nothing
    assert 0.05 < calibration.achieved_fpr <= 0.1 and calibration.n_images == 6
    # The c of the evaluation's own val inference (same seeding) exceeds tau on the calibrated fraction: exactly
    # for the first batch (same generator state), up to the reconstruction's later random draws for the rest
    # (test time also draws RePaint noise). Fails if calibration computed c otherwise (pooled statistics, other
    # images, another formula).
    generator = torch.Generator().manual_seed(5)
    fprs, first = [], None
    for batch in data.eval_dataloader("val"):
        c = model.get_anomaly(batch.image, generator=generator, mask_threshold=calibration.value).extras["c"]
        if first is None:
            first = c
            reference = model.mask_statistic(batch.image, generator=torch.Generator().manual_seed(5))
            assert torch.equal(first, reference)
        brain = batch.brain_mask > 0.5
        fprs += [float((c[i][brain[i]] > calibration.value).float().mean()) for i in range(c.shape[0])]
    assert sum(fprs) / len(fprs) == pytest.approx(calibration.achieved_fpr, abs=0.02)
    # Provenance: thresholds.json, the manifest, the report.
    thresholds = Thresholds.load(tmp_path / "checkpoints" / Thresholds.FILE_NAME)
    assert thresholds.mask_threshold["value"] == calibration.value
    assert json.loads((tmp_path / "checkpoints" / "thresholds.json").read_text())["mask_threshold"]["dataset"] == "val"
    assert run.manifest()["eval/calibration"]["mask_threshold"]["target_fpr"] == 0.1
    assert "Mask threshold tau" in (tmp_path / "report.md").read_text()
    # the evaluation, which holds the threshold, reports its value and source beside every result
    described = f"calibrated: {calibration.value:.4g} at FPR 0.1 on 'val' (6 images)"
    assert run.manifest()["backends"]["model_mask_threshold"] == described
    assert run.manifest()["eval/segmentation"]["model"]["model_mask_threshold"] == described


def test_every_call_of_the_evaluation_gets_the_calibrated_threshold(tmp_path):
    model = tiny_autoddpm(tau="calibrated")
    given = []
    get_anomaly = model.get_anomaly

    def recording(x, **kwargs):
        given.append(kwargs.get("mask_threshold"))
        return get_anomaly(x, **kwargs)

    model.get_anomaly = recording
    results, *_ = _run(tmp_path, model)
    assert len(given) >= 3 and set(given) == {results["calibration"]["val"]["mask_threshold"]}


def test_mask_calibration_runs_before_every_other_provider(tmp_path):
    # score_calibration (a provider) comes first in YAML, and would run the model before tau exists
    tasks = {"scores": block("score_calibration", reference=None), "c": block("mask_calibration", fpr=0.1)}
    assert [name for name, _ in execution_order(build_downstream(tasks))] == ["c", "scores"]
    results, *_ = _run(tmp_path, tiny_autoddpm(tau="calibrated"), tasks)
    scores = ScoreCalibration.load(tmp_path / "checkpoints" / ScoreCalibration.FILE_NAME)
    value = results["c"]["val"]["mask_threshold"]
    assert scores.model["model_mask_threshold"] == f"calibrated: {value:.4g} at FPR 0.1 on 'val' (6 images)"


def test_a_lower_target_fpr_gives_a_higher_tau(tmp_path):
    low, _, _, _ = _run(tmp_path / "a", tiny_autoddpm(tau="calibrated"), {"c": block("mask_calibration", fpr=0.02)})
    high, _, _, _ = _run(tmp_path / "b", tiny_autoddpm(tau="calibrated"), {"c": block("mask_calibration", fpr=0.3)})
    assert low["c"]["val"]["mask_threshold"] > high["c"]["val"]["mask_threshold"]


def test_fixed_tau_and_models_without_a_mask_are_refused(tmp_path):
    with pytest.raises(ValueError, match="set in the config"):
        _run(tmp_path / "a", tiny_autoddpm(tau=0.13), {"c": block("mask_calibration")})
    with pytest.raises(ValueError, match="no internal mask threshold"):
        _run(tmp_path / "b", TinyModel().eval(), {"c": block("mask_calibration")})


def test_uncalibrated_model_fails_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError, match="calibrate it on healthy data"):
        _run(tmp_path, tiny_autoddpm(tau="calibrated"), {"t": block("thresholding", fprs=[0.05])})
