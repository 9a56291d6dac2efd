from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from data.batch import Batch
from model_zoo.vae import VAE, gaussian_kl


def _tiny(**overrides) -> VAE:
    torch.manual_seed(0)
    params = {"image_size": 32, "channels": [4, 8], "latent_dim": 6} | overrides
    return VAE(**params)


def test_kl_matches_hand_computation() -> None:
    mu = torch.tensor([[0.0, 1.0], [0.5, -2.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(4.0), math.log(0.25)]])
    # KL(N(m, s^2) || N(0, 1)) = 0.5 * (s^2 + m^2 - 1 - log s^2), summed over dimensions
    image0 = 0.0 + 0.5 * 1.0
    image1 = 0.5 * (4.0 + 0.25 - 1 - math.log(4.0)) + 0.5 * (0.25 + 4.0 - 1 - math.log(0.25))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.tensor([image0, image1]))


def test_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_training_losses_sum_per_image_and_weight_kl_by_beta(kind: str) -> None:
    model = _tiny(recon_loss=kind, beta=0.5)
    x = torch.rand(3, 1, 32, 32)
    torch.manual_seed(7)
    losses = model.training_losses(Batch(image=x))
    assert set(losses) == {"recon", "kl"}
    torch.manual_seed(7)
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    diff = model.decode(z) - x
    per_pixel = diff.abs() if kind == "l1" else 0.5 * diff.pow(2)
    torch.testing.assert_close(losses["recon"], per_pixel.sum(dim=(1, 2, 3)).mean())
    torch.testing.assert_close(losses["kl"], 0.5 * gaussian_kl(mu, logvar).mean())


def test_test_time_latent_is_the_mean_unless_sampling() -> None:
    x = torch.rand(2, 1, 32, 32)
    model = _tiny().eval()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    mu, _ = model.encode(x)
    torch.testing.assert_close(out.reconstruction, model.decode(mu))
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())

    sampled = _tiny(sample_at_test=True).eval()
    a = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(1))
    b = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(1))
    c = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.reconstruction, c.reconstruction)


def test_shapes_and_size_checks() -> None:
    model = _tiny()
    mu, logvar = model.encode(torch.rand(2, 1, 32, 32))
    assert mu.shape == logvar.shape == (2, 6)
    assert model.decode(mu).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="built for 32x32"):
        model.encode(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="image_size=48"):
        VAE(image_size=48, channels=[4, 8, 16, 32, 64])
    with pytest.raises(ValueError, match="beta=0"):
        VAE(beta=0)
    with pytest.raises(ValueError, match=r"act='gelu'.*'leakyrelu'"):
        VAE(act="gelu")


def test_training_reduces_loss() -> None:
    model = _tiny()
    grid = torch.linspace(-1, 1, 32)
    radius = (grid[None, :] ** 2 + grid[:, None] ** 2).sqrt()
    x = torch.stack([(radius < r).float()[None] for r in (0.3, 0.5, 0.7, 0.9)])  # structured, learnable disks
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(30):
        loss = sum(model.training_losses(Batch(image=x)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert sum(totals[-5:]) / 5 < 0.9 * totals[0]
