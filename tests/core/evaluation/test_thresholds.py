"""Thresholds as data: the requested FPR on healthy data, the file round trip, hand-over, explicit override."""

import json
import math

import pytest
import torch

from core.evaluation import DownstreamEvaluator, EvalContext, Thresholds, build_downstream, run_tasks
from core.evaluation.thresholds import operating_point
from data.batch import collate
from dl_utils.run import Run
from optim.metrics.segmentation import ThresholdResult
from tests.core.evaluation.fakes import FakeData, TinyModel, block


def _point(fpr: float, threshold: float) -> ThresholdResult:
    return ThresholdResult(threshold=threshold, target_fpr=fpr, achieved_fpr=fpr * 0.9, region="foreground",
                           n_images=4, n_pixels=1000)


def test_threshold_gives_requested_fpr_on_the_healthy_data(evaluated):
    _, run, data, model, _ = evaluated
    saved = json.loads((run.checkpoint_dir / "thresholds.json").read_text())
    batch = collate(data.sets["val"])
    g = torch.Generator().manual_seed(run.seed)
    amap = model.get_anomaly(batch.image, generator=g).anomaly_map
    inside = batch.brain_mask > 0.5
    per_image_fpr = [((amap[i] > saved["thresholds"]["0.05"]["threshold"]) & inside[i]).sum() / inside[i].sum()
                     for i in range(len(batch))]
    assert float(torch.stack(per_image_fpr).mean()) <= 0.05
    assert float(torch.stack(per_image_fpr).mean()) == pytest.approx(saved["thresholds"]["0.05"]["achieved_fpr"])


def test_explicit_threshold_overrides_file(tmp_path):
    run = Run(run_dir=tmp_path, device=torch.device("cpu"))
    ctx = EvalContext.from_run(model=TinyModel().eval(), data=FakeData(), run=run, progress=False)
    result = DownstreamEvaluator(task="localization", threshold=0.2, datasets=["boxes"])(ctx)
    assert result.metrics["boxes"]["threshold"] == 0.2 and result.manifest["localization_threshold"]["source"] == "yaml"


def test_save_load_round_trip_keeps_values_and_provenance(tmp_path):
    thresholds = Thresholds(dataset="val", region="foreground", n_images=4,
                            points=(_point(0.01, 0.7312345678901234), _point(0.05, 0.25)), created="2026-11-28T19:00")
    saved = thresholds.save(tmp_path / "sub" / "thresholds.json")
    assert saved.source == str(tmp_path / "sub" / "thresholds.json") and thresholds.source == "computed"
    loaded = Thresholds.load(tmp_path / "sub" / "thresholds.json")
    assert loaded == saved
    assert loaded.values == {0.01: 0.7312345678901234, 0.05: 0.25}  # float keys, exact values
    raw = json.loads((tmp_path / "sub" / "thresholds.json").read_text())
    assert set(raw) == {"provenance", "thresholds"} and set(raw["thresholds"]) == {"0.01", "0.05"}
    assert raw["provenance"]["dataset"] == "val" and raw["thresholds"]["0.05"]["threshold"] == 0.25


def test_lookup_is_by_float_and_names_the_available_fprs():
    thresholds = Thresholds(dataset="val", region="all", n_images=4, points=(_point(0.02, 0.4),))
    assert thresholds.at(0.1 / 5).threshold == 0.4  # 0.020000000000000004: the same target FPR
    with pytest.raises(ValueError, match=r"no threshold at fpr 0.05; available: 0.02"):
        thresholds.at(0.05)
    with pytest.raises(ValueError, match="distinct"):
        Thresholds(dataset="val", region="all", n_images=4, points=(_point(0.02, 0.4), _point(0.02, 0.5)))
    th, provenance = operating_point(thresholds, fpr=0.02, explicit=None)
    assert th == 0.4 and provenance["source"] == "computed" and provenance["dataset"] == "val"
    assert operating_point(thresholds, fpr=0.02, explicit=0.9) == (0.9, {"source": "yaml", "threshold": 0.9})


def test_thresholds_are_handed_to_the_tasks_that_declare_them(tmp_path):
    ctx = EvalContext(model=TinyModel(), data=FakeData(), device="cpu", seed=1, artifact_dir=tmp_path,
                      progress=False)
    evaluators = build_downstream({"seg": block("segmentation", fpr=0.02, datasets=["lesions"]),
                                   "det": block("detection"),
                                   "t": block("thresholding", fprs=[0.02])})
    seen = {}
    for name in ("seg", "det", "t"):
        spec_fn = evaluators[name].spec.fn

        def spy(ctx, _fn=spec_fn, _name=name, **kwargs):
            seen[_name] = kwargs.get("thresholds", "not declared")
            return _fn(ctx, **kwargs)

        evaluators[name].spec = type(evaluators[name].spec)(**{**vars(evaluators[name].spec), "fn": spy})
    results = dict(run_tasks(evaluators, ctx))
    produced = results["t"].artifacts[0]
    assert isinstance(seen["seg"], Thresholds) and seen["seg"].values == produced.values
    assert seen["seg"].source == str(tmp_path / "thresholds.json")
    assert seen["det"] == "not declared" and seen["t"] == "not declared"
    assert results["seg"].metrics["lesions"]["threshold"] == produced.values[0.02]
    assert Thresholds.load(tmp_path / "thresholds.json").values == produced.values


def test_explicit_yaml_threshold_wins_over_computed_thresholds(tmp_path):
    ctx = EvalContext(model=TinyModel(), data=FakeData(), device="cpu", seed=1, progress=False)
    evaluators = build_downstream({"t": block("thresholding", fprs=[0.05]),
                                   "seg": block("segmentation", threshold=0.123, datasets=["lesions"])})
    results = dict(run_tasks(evaluators, ctx))
    assert not math.isclose(results["t"].artifacts[0].values[0.05], 0.123)
    assert results["seg"].metrics["lesions"]["threshold"] == 0.123
    assert results["seg"].manifest["segmentation_threshold"]["source"] == "yaml"
    assert list(tmp_path.iterdir()) == []  # no artifact folder: nothing written


def test_a_saved_file_serves_a_later_evaluation_without_a_thresholding_task(tmp_path):
    Thresholds(dataset="val", region="foreground", n_images=4, points=(_point(0.05, 0.31),)).save(
        tmp_path / "thresholds.json")
    ctx = EvalContext(model=TinyModel(), data=FakeData(), device="cpu", artifact_dir=tmp_path, progress=False)
    (name, result), = run_tasks(build_downstream({"loc": block("localization", datasets=["boxes"])}), ctx)
    assert result.metrics["boxes"]["threshold"] == 0.31
    assert result.manifest["localization_threshold"]["source"] == str(tmp_path / "thresholds.json")
