"""Fake data, a tiny stochastic model and a recording logger for the evaluation tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from core.data_module import DatasetInfo
from data.batch import Sample, collate
from model_zoo.base import AnomalyModel, AnomalyOutput

SIZE = 32


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


class CountingModel(TinyModel):
    """TinyModel that calls a named network twice per batch and reports a backend and an inference label."""

    PERCEPTUAL = "stlpips/alex standing in for 'squeeze' (fake)"
    LABEL = "fake inference: 2 network calls"

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Identity()

    def inference_label(self) -> str:
        return self.LABEL

    def provenance(self) -> dict[str, str]:
        return {"perceptual": self.PERCEPTUAL}

    def counted_network(self) -> torch.nn.Module:
        return self.net

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        return super().get_anomaly(self.net(self.net(x)), generator=generator)


class RecordingLogger:
    def __init__(self) -> None:
        self.evals: dict[tuple[str, str], dict] = {}
        self.figures: dict[str, object] = {}
        self.tables: dict[str, list] = {}
        self.config: dict = {}

    def log_eval(self, task, dataset, metrics):
        self.evals[(task, dataset)] = dict(metrics)

    def log_figure(self, key, figure, *, step=None):
        self.figures[key] = figure

    def log_table(self, key, rows):
        self.tables[key] = rows

    def update_config(self, **entries):
        self.config.update(entries)

    def log_scalars(self, values, *, step=None):
        pass


def block(task: str, **params) -> dict:
    return {"module_name": "core.evaluation", "class_name": "DownstreamEvaluator",
            "params": {"task": task, **params}}
