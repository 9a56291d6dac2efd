"""The runner: every task on a tiny model and fake data, ordering by products, the report, the public API."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.evaluation import TASKS, DownstreamEvaluator, build_downstream, evaluate, execution_order, run_downstream
from dl_utils.run import Run
from tests.core.evaluation.conftest import ALL_TASKS
from tests.core.evaluation.fakes import FakeData, RecordingLogger, TinyModel, block


def test_missing_thresholds_file_is_a_clear_error(tmp_path):
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), logger=RecordingLogger())
    with pytest.raises(FileNotFoundError, match="enable a 'thresholding' task"):
        run_downstream(build_downstream({"seg": block("segmentation")}), model=TinyModel().eval(), data=FakeData(),
                       run=run, progress=False)


def test_every_task_produced_numbers_and_figures(evaluated):
    results, run, _, _, log = evaluated
    assert set(results) == set(ALL_TASKS) - {"off"}
    for task, per_dataset in results.items():
        assert per_dataset, task
        for dataset, metrics in per_dataset.items():
            assert log.evals[(task, dataset)] == metrics
            assert all(isinstance(v, float) for v in metrics.values()), (task, dataset)
    seg = results["segmentation"]["lesions"]
    assert seg["auroc_pooled"] > 0.9 and seg["dice_pooled"] > 0.5 and 0 <= seg["oracle_best_dice_pooled"] <= 1
    binned = [k for k in seg if k.startswith("size_") and k.endswith("_n")]
    assert len(binned) == 3 and sum(seg[k] for k in binned) == 6  # every lesion image falls into one size bin
    assert any(k.startswith("size_") and k.endswith("_auprc_pooled") for k in seg)
    assert "boxes" in results["localization"] and results["localization"]["all_classes"]["n_total"] == 11
    assert results["detection"]["all_pathological"]["auroc"] > 0.9
    assert 0 <= results["rqi"]["healthy_test"]["rqi"] <= 1
    assert np.isfinite(results["ahi"]["all_pathological"]["fid_p"])
    assert results["ahi"]["healthy_test"]["n_reference"] == 12
    assert 0 <= results["caci"]["all_annotated"]["caci"] <= 1
    for key in ("eval/detection/roc_pr", "eval/segmentation/lesions/examples", "eval/segmentation/dice_per_image",
                "eval/localization/per_class", "eval/rqi/healthy_test/examples"):
        assert key in log.figures
    assert log.tables["eval/localization/per_class"][-1]["class"] == "all_classes"
    assert "random" in run.manifest()["eval/rqi"]["lpips_backend"].lower()
    assert run.manifest()["eval/ahi"]["fid_backend"] == "random"


def test_thresholds_file_and_report(evaluated):
    results, run, *_ = evaluated
    saved = json.loads((run.checkpoint_dir / "thresholds.json").read_text())
    assert saved["provenance"]["dataset"] == "val" and saved["provenance"]["region"] == "foreground"
    assert saved["provenance"]["n_images"] == 6 and set(saved["thresholds"]) == {"0.01", "0.05"}
    th = saved["thresholds"]["0.05"]["threshold"]
    assert results["segmentation"]["lesions"]["threshold"] == pytest.approx(th)
    report = (run.run_dir / "report.md").read_text()
    assert "## segmentation (task `segmentation`)" in report and "| lesions |" in report
    assert "oracle" in report and "upper bound" in report


def test_evaluation_never_sees_training_augmentation(evaluated):
    _, _, data, model, _ = evaluated
    assert data.train_loader_calls == 0
    assert model.seen and all(not bool((x == 1.0).all(dim=(1, 2, 3)).any()) for x in model.seen)


def test_with_the_real_experiment_logger(tmp_path):
    from dl_utils.experiment_logger import ExperimentLogger

    log = ExperimentLogger(run_dir=tmp_path, mode="disabled")
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), logger=log)
    tasks = {"thresholds": block("thresholding"), "detection": block("detection"),
             "localization": block("localization", datasets=["boxes"])}
    run_downstream(build_downstream(tasks), model=TinyModel().eval(), data=FakeData(), run=run, progress=False)
    log.close()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "eval/detection/lesions/auroc" in metrics and "eval/localization/boxes/f1_mean" in metrics
    assert (tmp_path / "figures").is_dir() and any((tmp_path / "figures").glob("*.png"))
    assert "eval/thresholds" in json.loads((tmp_path / "manifest.json").read_text())


def test_base_evaluation_yaml_builds_every_task():
    from core.Configurator import load_config

    root = Path(__file__).resolve().parents[3]
    config = load_config(root / "projects/normative_eval/configs/_base/evaluation.yaml")
    built = build_downstream(config["downstream_tasks"])
    # Every task but the model-specific mask calibration and intermediates, which the AutoDDPM configs add.
    assert {e.task for e in built.values()} == set(TASKS) - {"mask_calibration", "intermediates"}
    autoddpm = build_downstream(load_config(root / "projects/normative_eval/configs/autoddpm.yaml")["downstream_tasks"])
    assert {"mask_calibration", "intermediates"} <= {e.task for e in autoddpm.values()}
    assert built["thresholds"].options["dataset"] == "val" and built["ahi"].options["reference"] == "train"
    assert "segmentation_fpr1" not in built  # enabled: false


# ------------------------------------------------------------------------------------------------ ordering
def test_providers_run_before_the_tasks_that_require_them_then_yaml_order():
    order = [name for name, _ in execution_order(build_downstream(ALL_TASKS))]
    assert order == ["thresholds", "detection", "segmentation", "localization", "rqi", "ahi", "caci"]
    # a provider that nobody needs keeps the front; with no provider, YAML order is kept as it is
    only = [name for name, _ in execution_order(build_downstream({"d": block("detection"),
                                                                   "s": block("segmentation", threshold=0.3)}))]
    assert only == ["d", "s"]


def test_the_order_does_not_depend_on_a_task_name():
    evaluators = build_downstream({"s": block("segmentation"), "t": block("thresholding")})
    evaluators["t"].task = "renamed"  # ordering reads the declared products, never the name
    assert [name for name, _ in execution_order(evaluators)] == ["t", "s"]


# ------------------------------------------------------------------------------------------------ public API
def test_evaluate_matches_a_run_without_writing_anything(evaluated, tmp_path, monkeypatch):
    results, run, *_ = evaluated
    monkeypatch.chdir(tmp_path)
    tasks = {"thresholds": DownstreamEvaluator(task="thresholding", fprs=[0.01, 0.05]),
             "segmentation": DownstreamEvaluator(task="segmentation", fpr=0.05),
             "detection": DownstreamEvaluator(task="detection")}
    got = evaluate(TinyModel(), FakeData(), tasks, seed=run.seed)
    for name in tasks:  # json.dumps: NaN entries (empty size bins) compare equal
        assert json.dumps(got[name], sort_keys=True) == json.dumps(results[name], sort_keys=True)
    assert list(tmp_path.iterdir()) == []
    other_seed = evaluate(TinyModel(), FakeData(), {"s": tasks["segmentation"]}, seed=run.seed + 1,
                          thresholds=_thresholds_of(run))
    # the given thresholds are used; another seed draws other noise, so the maps (and numbers) differ
    assert other_seed["s"]["lesions"]["threshold"] == results["segmentation"]["lesions"]["threshold"]
    assert json.dumps(other_seed["s"], sort_keys=True) != json.dumps(results["segmentation"], sort_keys=True)


def _thresholds_of(run):
    from core.evaluation import Thresholds

    return Thresholds.load(run.checkpoint_dir / "thresholds.json")
