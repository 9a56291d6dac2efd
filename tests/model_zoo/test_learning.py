"""Short CPU training runs of DAE, ceVAE, MAE and MorphAEus on the embedded benchmark (32x32, one core each).

They train with the project's Trainer (``tests.model_zoo._learning.train``).

Each method trains for a few hundred steps on healthy slices and must then score hypointense lesions above healthy
brain tissue: pixel AUROC (lesion pixels vs. brain pixels, pooled over the class) clearly above chance, and image
AUROC (lesion images vs healthy test images) at least 0.55, so a backwards image score fails. The runs are
deterministic (fixed seeds), so the thresholds are margins, not luck; the AUROCs reached are logged.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from model_zoo.base import AnomalyModel
from model_zoo.cevae import CeVAE
from model_zoo.dae import DenoisingAE
from model_zoo.mae import MaskedAE
from model_zoo.morphaeus import MorphAEus
from tests.model_zoo._learning import embedded_data, hypointense_separation, train

pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid"),
              pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]

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


@pytest.mark.slow
@pytest.mark.parametrize(("factory", "steps", "lr", "min_auroc"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_short_training_separates_hypointense_lesions(factory, steps, lr, min_auroc, tmp_path, one_thread) -> None:
    torch.manual_seed(0)
    data = embedded_data(SIZE)
    adam = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": lr}}
    trainer = train(factory(), data, tmp_path, steps=steps, optimizer=adam)
    hypointense_separation(trainer.model, data).check(type(trainer.model).__name__, min_pixel=min_auroc)
