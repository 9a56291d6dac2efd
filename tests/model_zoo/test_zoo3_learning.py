"""Short CPU training runs of DAE, ceVAE, MAE and MorphAEus on the embedded benchmark (32x32, one core each).

Each method trains for a few hundred steps on healthy slices and must then score hypointense lesions above healthy
brain tissue: pixel AUROC (lesion pixels vs. brain pixels, pooled over the class) clearly above chance. The runs
are deterministic (fixed seeds), so the thresholds are margins, not luck; the AUROC reached is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.Configurator import build, load_config
from core.DataLoader import DataModule
from model_zoo.base import AnomalyModel
from model_zoo.cevae import CeVAE
from model_zoo.dae import DenoisingAE
from model_zoo.mae import MaskedAE
from model_zoo.morphaeus import MorphAEus
from optim.metrics import pixel_auroc_auprc

logger = logging.getLogger(__name__)
pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid"),
              pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "projects" / "normative_eval" / "configs" / "_base" / "embedded_data.yaml"
SIZE = 32


def _dae() -> AnomalyModel:
    return DenoisingAE(channels=(16, 32, 64), noise_resolution=4)


def _cevae() -> AnomalyModel:
    # 1024 pixels per 64 latent dimensions (the reference: 16384 per 256): the KL would weigh ~4x more per pixel,
    # and 300 steps need sharp reconstructions, hence the lower KL weight
    return CeVAE(image_size=SIZE, channels=(16, 32, 64), latent_dim=64, box_size=(6, 12), kl_weight=0.1)


def _mae() -> AnomalyModel:
    return MaskedAE(image_size=SIZE, patch_size=4, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                    decoder_hidden_size=32, decoder_mlp_dim=64, decoder_num_layers=1, decoder_num_heads=4,
                    test_maskings=10)


def _morphaeus() -> AnomalyModel:
    # 38 steps per epoch: the deformation phase starts after ~115 of the 200 steps
    return MorphAEus(channels=(8, 16, 32, 32, 32), deformer_channels=8, deform_start_epoch=3, beta_ramp_epochs=6)


# (id, model factory, optimizer steps, learning rate, minimum pixel AUROC)
CASES: list[tuple[str, Callable[[], AnomalyModel], int, float, float]] = [
    ("dae", _dae, 200, 1e-3, 0.7),
    ("cevae", _cevae, 300, 1e-3, 0.75),
    ("mae", _mae, 300, 1e-3, 0.7),
    ("morphaeus", _morphaeus, 200, 1e-3, 0.75),
]


def _train(model: AnomalyModel, data: DataModule, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step, epoch = 0, 0
    while step < steps:
        model.on_train_epoch_start(epoch)
        for batch in data.train_dataloader(seed=epoch):
            loss = sum(model.training_losses(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
        epoch += 1


@pytest.mark.slow
@pytest.mark.parametrize(("factory", "steps", "lr", "min_auroc"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_short_training_separates_hypointense_lesions(factory, steps, lr, min_auroc, one_thread) -> None:
    torch.manual_seed(0)
    config = load_config(DATA, [f"data.params.target_size=[{SIZE}, {SIZE}]", "data.params.batch_size=16"])
    data = build(config["data"], "data", base=DataModule)
    model = factory()
    model.train()
    _train(model, data, steps, lr)
    model.eval()
    maps, masks, brains = [], [], []
    generator = torch.Generator().manual_seed(0)
    for batch in data.eval_dataloader("hypointense_lesion"):
        maps.append(model.get_anomaly(batch.image, generator=generator).anomaly_map)
        masks.append(batch.anomaly_mask)
        brains.append(batch.brain_mask)
    region = torch.clamp(torch.cat(brains) + torch.cat(masks), 0, 1)
    result = pixel_auroc_auprc(torch.cat(maps), torch.cat(masks), region=region)
    logger.warning("%s: pixel AUROC on hypointense lesions %.3f", type(model).__name__, result["auroc_pooled"])
    assert result["auroc_pooled"] > min_auroc, result
