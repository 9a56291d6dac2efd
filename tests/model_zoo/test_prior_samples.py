"""``sample_prior`` of every model with a prior: [n,1,S,S] in [0,1], drawn from the caller's generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.Configurator import build
from dl_utils.reinit import randomize_zero_layers
from model_zoo.base import AnomalyModel
from model_zoo.registry import SIZE, method

PRIOR_MODELS = ("vae", "cevae", "fanogan", "sivae", "ra", "phanes", "ltm")
NO_PRIOR = ("ae", "dae", "mae", "morphaeus", "vqvae", "ddpm")


@pytest.mark.parametrize("name", PRIOR_MODELS)
def test_prior_samples_follow_the_generator(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(method(name).block(tmp_path), "model", base=AnomalyModel).eval()
    randomize_zero_layers(model)
    if name == "ltm":  # a random VQ-VAE decodes every token below 0 (clamped to 0): lift its output into (0, 1)
        last = [m for m in model.vqvae.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)][-1]
        torch.nn.init.constant_(last.bias, 0.5)
    samples = model.sample_prior(3, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (3, 1, SIZE, SIZE) and samples.dtype == torch.float32
    assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0
    again = model.sample_prior(3, generator=torch.Generator().manual_seed(1))
    other = model.sample_prior(3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(samples, again) and not torch.equal(samples, other)
    assert not torch.equal(samples[0], samples[1])  # each sample has its own latent


@pytest.mark.parametrize("name", NO_PRIOR)
def test_models_without_a_prior_do_not_pretend(name: str, tmp_path: Path) -> None:
    model = build(method(name).block(tmp_path), "model", base=AnomalyModel)
    assert not hasattr(model, "sample_prior")
