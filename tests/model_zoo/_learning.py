"""Helpers of the slow learning tests: the embedded benchmark at a small size, a short Trainer run, pixel AUROC."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from core.Configurator import build, load_config
from core.DataLoader import DataModule
from core.Trainer import Trainer
from model_zoo.base import AnomalyModel
from optim.metrics import pixel_auroc_auprc
from tests.core._trainer_fixtures import make_run

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "projects" / "normative_eval" / "configs" / "_base" / "embedded_data.yaml"
logger = logging.getLogger(__name__)


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
    trainer = Trainer(model=model, data=WithoutValidation(data), run=make_run(run_dir),
                      max_epochs=10_000, max_steps=steps, log_interval=10, progress=False, **params)
    trainer.fit()
    return trainer


@torch.no_grad()
def hypointense_auroc(model: AnomalyModel, data: DataModule, *, seed: int = 0) -> float:
    """Pooled pixel AUROC of the model's maps on the hypointense-lesion set, inside brain OR lesion."""
    model.eval()
    maps, masks, brains = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for batch in data.eval_dataloader("hypointense_lesion"):
        maps.append(model.get_anomaly(batch.image, generator=generator).anomaly_map)
        masks.append(batch.anomaly_mask)
        brains.append(batch.brain_mask)
    region = torch.clamp(torch.cat(brains) + torch.cat(masks), 0, 1)
    auroc = pixel_auroc_auprc(torch.cat(maps), torch.cat(masks), region=region)["auroc_pooled"]
    logger.warning("%s hypointense-lesion pixel AUROC %.3f", type(model).__name__, auroc)
    return auroc
