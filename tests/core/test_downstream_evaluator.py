"""The evaluation runner: building blocks, thresholds as data, every task on a tiny model and fake data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import Tensor

from core.Configurator import ConfigError
from core.DataLoader import DatasetInfo
from core.DownstreamEvaluator import (
    TASKS,
    DownstreamEvaluator,
    EvalContext,
    build_downstream,
    run_downstream,
)
from data.batch import Sample, collate
from dl_utils.run import RunContext
from model_zoo.base import AnomalyModel, AnomalyOutput

SIZE = 32


# ------------------------------------------------------------------------------------------------ fakes
def _sample(rng: np.random.Generator, *, lesion: str | None, path: str, augmented: bool = False) -> Sample:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    brain = ((yy - 16) ** 2 + (xx - 16) ** 2 < 13 ** 2).astype(np.float32)
    image = brain * (0.4 + 0.05 * rng.random((SIZE, SIZE))).astype(np.float32)
    mask = np.zeros_like(brain)
    if lesion is not None:
        cy, cx, r = rng.integers(11, 21), rng.integers(11, 21), int(rng.integers(2, 5))
        if lesion == "pixel":
            mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).astype(np.float32)
        else:  # box annotation: the lesion is the disk, the label its bounding box
            mask[cy - r:cy + r, cx - r:cx + r] = 1.0
        image = np.where(((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2, 0.95, image).astype(np.float32)
    if augmented:
        image = np.ones_like(image)  # unmistakable: an augmented training image is all ones
    tissue = brain * (1 - mask) if lesion == "box" else brain
    return Sample(image=torch.from_numpy(image)[None], anomaly_mask=torch.from_numpy(mask)[None] if lesion else None,
                  brain_mask=torch.from_numpy(tissue)[None], label=int(lesion is not None), path=path)


class FakeData:
    """The DataModule surface the evaluator uses; its train loader marks augmented images."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.sets = {
            "train": [_sample(rng, lesion=None, path=f"train/{i}") for i in range(12)],
            "val": [_sample(rng, lesion=None, path=f"val/{i}") for i in range(6)],
            "healthy_test": [_sample(rng, lesion=None, path=f"healthy/{i}") for i in range(6)],
            "lesions": [_sample(rng, lesion="pixel", path=f"lesion/{i}") for i in range(6)],
            "boxes": [_sample(rng, lesion="box", path=f"box/{i}") for i in range(5)],
        }
        self.train_loader_calls = 0

    @property
    def test_set_names(self) -> list[str]:
        return ["healthy_test", "lesions", "boxes"]

    def dataset_info(self, name: str) -> DatasetInfo:
        annotation = {"lesions": "pixel", "boxes": "box"}.get(name)
        return DatasetInfo(name=name, pathological=annotation is not None, has_anomaly_mask=annotation is not None,
                    has_brain_mask=True, annotation=annotation, size=len(self.sets[name]))

    def eval_dataloader(self, name: str):
        items = self.sets[name]
        return [collate(items[i:i + 4]) for i in range(0, len(items), 4)]

    def train_dataloader(self, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.train_loader_calls += 1
        rng = np.random.default_rng(1)
        return [collate([_sample(rng, lesion=None, path=f"AUGMENTED/{i}", augmented=True) for i in range(4)])]


class TinyModel(AnomalyModel):
    """Restores bright lesions by capping intensities; adds generator noise to the map (a stochastic model)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[Tensor] = []

    def training_losses(self, batch):
        return {"loss": (self.scale * batch.image).mean()}

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        self.seen.append(x.detach().clone())
        recon = x.clamp(max=0.6) * self.scale
        noise = 0.01 * torch.rand(x.shape, generator=generator, device=x.device)
        amap = (x - recon).abs() + noise
        return AnomalyOutput(anomaly_map=amap, anomaly_score=amap.flatten(1).mean(1), reconstruction=recon)


class RecordingLogger:
    def __init__(self) -> None:
        self.evals: dict[tuple[str, str], dict] = {}
        self.figures: dict[str, object] = {}
        self.tables: dict[str, list] = {}
        self.manifest: dict = {}

    def log_eval(self, task, dataset, metrics):
        self.evals[(task, dataset)] = dict(metrics)

    def log_figure(self, key, figure, *, step=None):
        self.figures[key] = figure

    def log_table(self, key, rows):
        self.tables[key] = rows

    def update_manifest(self, **entries):
        self.manifest.update(entries)

    def log_scalars(self, values, *, step=None):
        pass


def block(task: str, **params) -> dict:
    return {"module_name": "core.DownstreamEvaluator", "class_name": "DownstreamEvaluator",
            "params": {"task": task, **params}}


ALL_TASKS = {
    "detection": block("detection"),
    "segmentation": block("segmentation", fpr=0.05),
    "localization": block("localization", fpr=0.05),
    "rqi": block("rqi", backend="random"),
    "ahi": block("ahi", backend="random", min_class_size=5),
    "caci": block("caci", backend="random"),
    "thresholds": block("thresholding", fprs=[0.01, 0.05]),  # last in YAML, still runs first
    "off": {**block("detection"), "enabled": False},
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = RunContext(run_dir=tmp_path_factory.mktemp("run"), device=torch.device("cpu"), seed=3)
    data, model, log = FakeData(), TinyModel().eval(), RecordingLogger()
    results = run_downstream(ALL_TASKS, model=model, data=data, logger=log, run=run, progress=False)
    return results, run, data, model, log


# ------------------------------------------------------------------------------------------------ building
def test_build_skips_disabled_and_validates_task_and_options():
    built = build_downstream(ALL_TASKS)
    assert "off" not in built and built["thresholds"].task == "thresholding"
    assert build_downstream(None) == {}
    with pytest.raises(ConfigError, match=r"downstream_tasks\.x.*'detektion'.*valid tasks: ahi, caci"):
        build_downstream({"x": block("detektion")})
    with pytest.raises(ConfigError, match=r"downstream_tasks\.seg.*params\.fp_rate.*valid options: datasets"):
        build_downstream({"seg": block("segmentation", fp_rate=0.05)})
    with pytest.raises(ConfigError, match=r"params\.region.*'brian' is not one of"):
        build_downstream({"seg": block("segmentation", region="brian")})
    with pytest.raises(ConfigError, match=r"params\.fprs.*expected a list"):
        build_downstream({"t": block("thresholding", fprs=0.05)})
    assert set(TASKS) >= {"thresholding", "detection", "segmentation", "localization", "rqi", "ahi", "caci"}


def test_missing_thresholds_file_is_a_clear_error(tmp_path):
    run = RunContext(run_dir=tmp_path, device=torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="enable a 'thresholding' task"):
        run_downstream({"seg": block("segmentation")}, model=TinyModel().eval(), data=FakeData(),
                       logger=RecordingLogger(), run=run, progress=False)


# ------------------------------------------------------------------------------------------------ running
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
    assert "random" in log.manifest["eval/rqi"]["lpips_backend"].lower()
    assert log.manifest["eval/ahi"]["fid_backend"] == "random"


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


def test_evaluation_never_sees_training_augmentation(evaluated):
    _, _, data, model, _ = evaluated
    assert data.train_loader_calls == 0
    assert model.seen and all(not bool((x == 1.0).all(dim=(1, 2, 3)).any()) for x in model.seen)


def test_fid_reference_set_comes_from_the_unaugmented_loader(tmp_path):
    data = FakeData()
    ctx = EvalContext(model=TinyModel().eval(), data=data, run=RunContext(run_dir=tmp_path, device="cpu"),
                      progress=False)
    feats, prov = ctx.features("random", None, "train", "input")
    train = ctx.images("train")
    assert data.train_loader_calls == 0 and len(feats) == 12 and prov["fid_backend"] == "random"
    assert not any(p.startswith("AUGMENTED") for p in train.path) and not bool((train.image == 1.0).all())


def test_inference_runs_once_per_dataset_and_is_seeded(tmp_path):
    run = RunContext(run_dir=tmp_path, device=torch.device("cpu"), seed=5)
    model = TinyModel().eval()
    ctx = EvalContext(model=model, data=FakeData(), run=run, progress=False)
    first = ctx.inference("val")
    again = ctx.inference("val")
    assert first is again and len(model.seen) == 2  # 6 images in 2 batches, run once
    other = EvalContext(model=TinyModel().eval(), data=FakeData(), run=run, progress=False).inference("val")
    assert torch.equal(first.anomaly_map, other.anomaly_map)  # same seed -> same stochastic maps
    assert ctx.images("train").anomaly_map is None and len(model.seen) == 2  # FID reference: no model run


def test_explicit_threshold_overrides_file(tmp_path):
    run = RunContext(run_dir=tmp_path, device=torch.device("cpu"))
    ctx = EvalContext(model=TinyModel().eval(), data=FakeData(), run=run, progress=False)
    result = DownstreamEvaluator(task="localization", threshold=0.2, datasets=["boxes"])(ctx)
    assert result.metrics["boxes"]["threshold"] == 0.2 and result.manifest["localization_threshold"]["source"] == "yaml"


def test_with_the_real_experiment_logger(tmp_path):
    from dl_utils.experiment_logger import ExperimentLogger

    run = RunContext(run_dir=tmp_path, device=torch.device("cpu"))
    log = ExperimentLogger(run_dir=tmp_path, mode="disabled")
    tasks = {"thresholds": block("thresholding"), "detection": block("detection"),
             "localization": block("localization", datasets=["boxes"])}
    run_downstream(tasks, model=TinyModel().eval(), data=FakeData(), logger=log, run=run, progress=False)
    log.close()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "eval/detection/lesions/auroc" in metrics and "eval/localization/boxes/f1_mean" in metrics
    assert (tmp_path / "figures").is_dir() and any((tmp_path / "figures").glob("*.png"))
    assert "eval/thresholds" in json.loads((tmp_path / "manifest.json").read_text())


def test_base_evaluation_yaml_builds_every_task():
    from pathlib import Path

    from core.Configurator import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "projects/normative_eval/configs/_base/evaluation.yaml")
    built = build_downstream(config["downstream_tasks"])
    assert {e.task for e in built.values()} == set(TASKS)
    assert built["thresholds"].options["dataset"] == "val" and built["ahi"].options["reference"] == "train"
    assert "segmentation_fpr1" not in built  # enabled: false
