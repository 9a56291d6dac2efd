"""The mask_calibration task: AutoDDPM's tau at a healthy FPR of c, computed as at test time, recorded everywhere."""

import json

import pytest
import torch

from core.evaluation import build_downstream, run_downstream
from core.evaluation.thresholds import MaskCalibration, Thresholds
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
    assert model.mask_threshold == calibration.value == results["calibration"]["val"]["mask_threshold"]
    assert 0.05 < calibration.achieved_fpr <= 0.1 and calibration.n_images == 6
    # The c of the evaluation's own val inference (same seeding) exceeds tau on the calibrated fraction: exactly
    # for the first batch (same generator state), up to the reconstruction's later random draws for the rest
    # (test time also draws RePaint noise). Fails if calibration computed c otherwise (pooled statistics, other
    # images, another formula).
    generator = torch.Generator().manual_seed(5)
    fprs, first = [], None
    for batch in data.eval_dataloader("val"):
        c = model.get_anomaly(batch.image, generator=generator).extras["c"]
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
    assert model.mask_threshold_provenance["dataset"] == "val"


def test_a_lower_target_fpr_gives_a_higher_tau(tmp_path):
    low = tiny_autoddpm(tau="calibrated")
    _run(tmp_path / "a", low, {"c": block("mask_calibration", fpr=0.02)})
    high = tiny_autoddpm(tau="calibrated")
    _run(tmp_path / "b", high, {"c": block("mask_calibration", fpr=0.3)})
    assert low.mask_threshold > high.mask_threshold


def test_fixed_tau_and_models_without_a_mask_are_refused(tmp_path):
    with pytest.raises(ValueError, match="set in the config"):
        _run(tmp_path / "a", tiny_autoddpm(tau=0.13), {"c": block("mask_calibration")})
    with pytest.raises(ValueError, match="no internal mask threshold"):
        _run(tmp_path / "b", TinyModel().eval(), {"c": block("mask_calibration")})


def test_uncalibrated_model_fails_with_a_clear_message(tmp_path):
    with pytest.raises(RuntimeError, match="calibrate it on healthy data"):
        _run(tmp_path, tiny_autoddpm(tau="calibrated"), {"t": block("thresholding", fprs=[0.05])})
