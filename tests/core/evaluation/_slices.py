"""Hand-made slices whose anomaly maps are the images themselves, for tests whose numbers are computed by hand."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from core.data_module import DatasetInfo
from data.batch import Sample, collate
from model_zoo.base import AnomalyModel, AnomalyOutput

SIZE = 6
_PATHS = itertools.count()


class MapIsImage(AnomalyModel):
    """anomaly_map = x, anomaly_score = mean of x: the test controls every number."""

    def training_losses(self, batch):
        raise NotImplementedError

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        return AnomalyOutput(anomaly_map=x.clone(), anomaly_score=x.flatten(1).mean(1), reconstruction=None)


def make_slice(value: float, subject: str, *, hot: int = 0, hot_value: float = 0.95, lesion: tuple | None = None,
               lesion_value: float = 0.9, label: int = 0) -> Sample:
    """A constant slice; ``hot`` brain pixels at ``hot_value``; optionally a lesion (rows, cols) at lesion_value."""
    image = np.full((SIZE, SIZE), value, np.float32)
    brain = np.zeros_like(image)
    brain[1:5, 1:5] = 1  # 16 brain pixels
    image.reshape(-1)[np.flatnonzero(brain)[:hot]] = hot_value
    mask = None
    if lesion is not None:
        mask = np.zeros_like(image)
        mask[lesion] = 1
        image[lesion] = lesion_value
    anomaly = None if mask is None else torch.from_numpy(mask)[None]
    return Sample(image=torch.from_numpy(image)[None], anomaly_mask=anomaly,
                  brain_mask=torch.from_numpy(brain)[None], label=label, path=f"slice{next(_PATHS)}.npy",
                  subject=subject)


class Slices:
    def __init__(self, sets: dict[str, list[Sample]], named: bool = True) -> None:
        self.sets, self.named = sets, named

    @property
    def test_set_names(self) -> list[str]:
        return list(self.sets)

    def dataset_info(self, name: str) -> DatasetInfo:
        samples = self.sets[name]
        has_mask = samples[0].anomaly_mask is not None
        return DatasetInfo(name=name, pathological=samples[0].label == 1, has_anomaly_mask=has_mask,
                           has_brain_mask=True, annotation="pixel" if has_mask else None, size=len(samples),
                           has_subjects=self.named)

    def eval_dataloader(self, name: str):
        items = self.sets[name]
        return [collate(items[i:i + 3]) for i in range(0, len(items), 3)]
