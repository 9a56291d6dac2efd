"""Helpers of the slow learning tests: the embedded benchmark at a small size, a short Trainer run, pixel and image
AUROC on the hypointense lesions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.Configurator import build, load_config
from core.data_module import DataModule
from core.Trainer import Trainer
from model_zoo.base import AnomalyModel
from optim.metrics import auroc, pixel_auroc_auprc
from tests.core._trainer_fixtures import make_run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "projects" / "normative_eval" / "configs" / "_base" / "embedded_data.yaml"
logger = logging.getLogger(__name__)
# Every learning guard's image-level floor: an image score that ranks lesions below healthy images fails (#21).
MIN_IMAGE_AUROC = 0.55


def embedded_data(size: int, batch_size: int = 16) -> DataModule:
    """The embedded benchmark resized to ``size`` x ``size`` (cached after the first build)."""
    config = load_config(DATA, [f"data.params.target_size=[{size}, {size}]", f"data.params.batch_size={batch_size}"])
    return build(config["data"], "data", base=DataModule)


class WithoutValidation:
    """A data module's training loader without its validation loader (short learning runs skip validation)."""

    def __init__(self, data: DataModule) -> None:
        self.data = data

    def train_dataloader(self, **kwargs: Any) -> Any:
        return self.data.train_dataloader(**kwargs)

    def val_dataloader(self) -> None:
        return None


def train(model: AnomalyModel, data: DataModule, run_dir: Path, *, steps: int, **params: Any) -> Trainer:
    """``steps`` optimizer batches with the project's Trainer (no validation loader), returning the trainer."""
    trainer = Trainer.from_options(model=model, data=WithoutValidation(data), run=make_run(run_dir),
                                   max_epochs=10_000, max_steps=steps, log_interval=10, progress=False, **params)
    trainer.fit()
    return trainer


@dataclass(frozen=True)
class Separation:
    """How well a model's outputs separate the hypointense-lesion class from healthy tissue and images."""

    pixel_auroc: float  # lesion pixels vs brain pixels, pooled over the class (inside brain OR lesion)
    image_auroc: float  # anomaly_score of the class's images vs the healthy test images

    def check(self, name: str, *, min_pixel: float, min_image: float = MIN_IMAGE_AUROC) -> None:
        """Assert both numbers (a backwards image score fails here even when the maps are fine)."""
        logger.warning("%s: hypointense pixel AUROC %.3f, image AUROC %.3f", name, self.pixel_auroc, self.image_auroc)
        assert self.pixel_auroc > min_pixel, f"{name}: pixel AUROC {self.pixel_auroc:.3f} <= {min_pixel}"
        assert self.image_auroc >= min_image, f"{name}: image AUROC {self.image_auroc:.3f} < {min_image}"


@torch.no_grad()
def hypointense_separation(model: AnomalyModel, data: DataModule, *, seed: int = 0, **per_call: Any) -> Separation:
    """Pixel and image AUROC of the model on the embedded benchmark's hypointense lesions (healthy test images as the
    image-level negatives); the model in eval mode, one generator for every stochastic inference, ``per_call``
    passed to every ``get_anomaly`` (AutoDDPM's calibrated ``mask_threshold``)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    maps, masks, brains, scores = [], [], [], {}
    for name in ("healthy_test", "hypointense_lesion"):
        scores[name] = []
        for batch in data.eval_dataloader(name):
            out = model.get_anomaly(batch.image, generator=generator, **per_call)
            scores[name].append(out.anomaly_score.float())
            if name == "hypointense_lesion":
                maps.append(out.anomaly_map)
                masks.append(batch.anomaly_mask)
                brains.append(batch.brain_mask)
    region = torch.clamp(torch.cat(brains) + torch.cat(masks), 0, 1)
    pixel = pixel_auroc_auprc(torch.cat(maps), torch.cat(masks), region=region)["auroc_pooled"]
    healthy, lesion = torch.cat(scores["healthy_test"]), torch.cat(scores["hypointense_lesion"])
    image = auroc(torch.cat([healthy, lesion]), torch.cat([torch.zeros_like(healthy), torch.ones_like(lesion)]))
    return Separation(pixel_auroc=float(pixel), image_auroc=float(image))
