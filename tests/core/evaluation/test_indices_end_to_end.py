"""RQI and CACI end to end on the fake data: models built to score high or low must score so.

The bounds [0, 1] hold by construction; these tests instead fail if a task compared the wrong pair of images or
swapped the healthy-tissue and anomaly regions.
"""

import torch
from torch import Tensor

from core.evaluation import DownstreamEvaluator, evaluate
from model_zoo.base import AnomalyModel, AnomalyOutput
from tests.core.evaluation.fakes import FakeData, TinyModel


class Reconstructs(AnomalyModel):
    """Reconstruction = ``fn(x)``; map = |x - reconstruction|."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def training_losses(self, batch):
        raise NotImplementedError

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        rec = self.fn(x)
        amap = (x - rec).abs()
        return AnomalyOutput(anomaly_map=amap, anomaly_score=amap.flatten(1).mean(1), reconstruction=rec)


def _identity(x: Tensor) -> Tensor:
    return x


def _another_image(x: Tensor) -> Tensor:
    return torch.roll(x, shifts=(1, 6), dims=(0, 3))  # each image "restored" as its shifted neighbour


def _damages_healthy_tissue(x: Tensor) -> Tensor:
    ripple = 0.2 * torch.sin(torch.arange(x.shape[-1], dtype=x.dtype) * 1.3)
    return torch.where(x > 0.6, x, (x * 0.3 + ripple).clamp(0, 1))  # lesions (0.95) kept, tissue destroyed


def _index(model: AnomalyModel, task: str, dataset: str) -> float:
    tasks = {task: DownstreamEvaluator(task=task, backend="random")}
    results = evaluate(model.eval(), FakeData(), tasks, seed=0)
    return results[task][dataset][task]


def test_rqi_is_high_only_when_each_image_is_restored_to_itself():
    assert _index(Reconstructs(_identity), "rqi", "healthy_test") > 0.99
    assert _index(Reconstructs(_another_image), "rqi", "healthy_test") < 0.6


def test_caci_rewards_correcting_lesions_while_conserving_healthy_tissue():
    corrects = _index(TinyModel(), "caci", "all_annotated")  # caps the bright lesions, keeps the tissue
    conserves_only = _index(Reconstructs(_identity), "caci", "all_annotated")  # corrects nothing
    damages = _index(Reconstructs(_damages_healthy_tissue), "caci", "all_annotated")  # keeps lesions, breaks tissue
    assert corrects > 0.5
    assert conserves_only < 0.1 and damages < 0.2
