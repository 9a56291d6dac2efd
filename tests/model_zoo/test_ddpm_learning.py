"""A short DDPM training run on the embedded benchmark learns something useful (CPU, ~1 minute).

Checks the acceptance of the models issue at a small scale: the diffusion loss goes down, and AnoDDPM-style
partial-diffusion maps score synthetic lesions above healthy brain tissue (pixel AUROC clearly above 0.5).
Deterministic on the CPU (fixed seeds), so the thresholds below are margins, not luck.
"""

from pathlib import Path

import pytest
import torch

from core.Configurator import build, load_config
from core.DataLoader import DataModule
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.settings import InferenceSetting, UNetSetting
from optim.metrics import pixel_auroc_auprc

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "projects" / "normative_eval" / "configs" / "_base" / "embedded_data.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("noise_type", ["gaussian", "simplex"])
def test_short_ddpm_training_separates_lesions(noise_type):
    torch.manual_seed(0)
    config = load_config(DATA, ["data.params.target_size=[32, 32]", "data.params.batch_size=16"])
    data = build(config["data"], "data", base=DataModule)
    network = UNetSetting(channels=(16, 32, 32), attention_levels=(False, False, True), num_head_channels=32,
                          norm_num_groups=8, use_flash_attention=True)
    model = DDPM(network=network, noise=DiffusionNoise(noise_type=noise_type),
                 inference=InferenceSetting(sampler="strided", noise_level=250, steps=25))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    step = 0
    while step < 240:
        for batch in data.train_dataloader(seed=step):
            loss = sum(model.training_losses(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step >= 240:
                break
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.7 * first, f"loss did not go down: {first:.4f} -> {last:.4f}"

    model.eval()
    maps, masks, brains = [], [], []
    generator = torch.Generator().manual_seed(0)
    for batch in data.eval_dataloader("hypointense_lesion"):
        out = model.get_anomaly(batch.image, generator=generator)
        maps.append(out.anomaly_map)
        masks.append(batch.anomaly_mask)
        brains.append(batch.brain_mask)
    region = torch.clamp(torch.cat(brains) + torch.cat(masks), 0, 1)
    result = pixel_auroc_auprc(torch.cat(maps), torch.cat(masks), region=region)
    assert result["auroc_pooled"] > 0.6, result
