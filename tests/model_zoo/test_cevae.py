"""ceVAE: the rectangle corruption, sigma exponentiated once (and the legacy double exp), loss balance, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from data.batch import Batch
from model_zoo.cevae import CeVAE, erase_random_boxes


def _tiny(**overrides) -> CeVAE:
    torch.manual_seed(0)
    params = {"image_size": 32, "channels": [4, 8], "latent_dim": 6, "box_size": [4, 8]} | overrides
    return CeVAE(**params)


def test_boxes_are_erased_single_rectangles_within_the_admissible_range() -> None:
    x = torch.rand(400, 1, 32, 32) + 0.1  # no zero pixel before corruption
    out, mask = erase_random_boxes(x, min_size=4, max_size=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out == 0, mask.bool())
    assert torch.equal(out[mask == 0], x[mask == 0])
    rows, cols = mask[:, 0].amax(dim=2), mask[:, 0].amax(dim=1)  # [B,H], [B,W] indicators
    assert torch.equal(mask[:, 0], rows[:, :, None] * cols[:, None, :])  # one axis-aligned rectangle
    for ind in (rows, cols):
        side = ind.sum(dim=1)
        first = ind.argmax(dim=1)
        assert set(side.long().tolist()) == {4, 5, 6, 7}
        assert torch.equal(ind[torch.arange(len(ind)), first + side.long() - 1], torch.ones(len(ind)))  # contiguous
        assert first.min() == 4  # the lowest corner is box_size[0]
        assert (first + side.long() - 1).max() == 32 - 3  # corner <= S - 2 - side: a box ends at S - 3 at most


def test_context_encoding_term_decodes_the_mean_of_the_erased_image(monkeypatch) -> None:
    model = _tiny()
    x = torch.rand(3, 1, 32, 32) + 0.1
    inputs = []
    encode = model.encode

    def spy(inp: torch.Tensor):
        inputs.append(inp)
        return encode(inp)

    monkeypatch.setattr(model, "encode", spy)
    torch.manual_seed(5)
    losses = model.training_losses(Batch(image=x))
    assert set(losses) == {"recon", "ce", "kl"}
    clean, corrupted = inputs
    assert torch.equal(clean, x)
    erased = corrupted == 0
    assert erased.flatten(1).sum(1).min() >= 16 and torch.equal(corrupted[~erased], x[~erased])
    mu_ce, _ = encode(corrupted)
    expected = 0.5 * (model.decode(mu_ce) - x).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(losses["ce"], expected)


@pytest.mark.parametrize("legacy", [False, True])
def test_kl_matches_torch_distributions(legacy: bool) -> None:
    model = _tiny(legacy_double_exp=legacy)
    gen = torch.Generator().manual_seed(0)
    mu, second = torch.randn(4, 6, generator=gen), 0.5 * torch.randn(4, 6, generator=gen)
    sigma = second.exp().exp() if legacy else (0.5 * second).exp()
    expected = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(model.kl(mu, second), expected)


@pytest.mark.parametrize(("legacy", "std"), [(False, 2.0), (True, 4.0)])
def test_sigma_is_exponentiated_once_when_sampling(legacy: bool, std: float, monkeypatch) -> None:
    model = _tiny(legacy_double_exp=legacy)
    b, z_dim = 8, 2000
    monkeypatch.setattr(model, "encode", lambda inp: (torch.zeros(b, z_dim), torch.full((b, z_dim), math.log(4.0))))
    seen = []
    monkeypatch.setattr(model, "decode", lambda z: seen.append(z) or torch.zeros(b, 1, 32, 32))
    torch.manual_seed(0)
    model.training_losses(Batch(image=torch.rand(b, 1, 32, 32)))
    sampled = seen[0]  # the clean pass samples; the corrupted pass decodes the mean
    assert abs(float(sampled.std()) - std) < 0.05 * std  # log sigma^2 = log 4 -> sigma 2; legacy reads s -> e^s = 4
    assert torch.equal(seen[1], torch.zeros(b, z_dim))


def test_loss_balance_sums_per_image_or_averages_pixels(monkeypatch) -> None:
    x = torch.rand(2, 1, 32, 32)
    values = {}
    for balance in ("elbo", "predecessor"):
        model = _tiny(loss_balance=balance)
        monkeypatch.setattr(model, "decode", lambda z: torch.zeros(z.shape[0], 1, 32, 32))
        values[balance] = model.training_losses(Batch(image=x))["recon"]
    torch.testing.assert_close(values["elbo"], 0.5 * x.pow(2).sum() / 2)
    torch.testing.assert_close(values["predecessor"], x.pow(2).mean())


def test_test_map_uses_the_mean_or_averages_generator_samples() -> None:
    x = torch.rand(2, 1, 32, 32)
    model = _tiny().eval()
    mu, _ = model.encode(x)
    out = model.get_anomaly(x)
    torch.testing.assert_close(out.reconstruction, model.decode(mu).clamp(0, 1))
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())

    sampled = _tiny(test_samples=3).eval()
    with torch.no_grad():
        sampled.encoder[-1].conv.weight.mul_(50)  # wide posteriors, so samples differ visibly from the mean
    first = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(1)).anomaly_map
    again = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(1)).anomaly_map
    other = sampled.get_anomaly(x, generator=torch.Generator().manual_seed(2)).anomaly_map
    assert torch.equal(first, again) and not torch.allclose(first, other)
    mixed = torch.cat([x[:1], torch.rand(1, 1, 32, 32)])
    torch.testing.assert_close(sampled.get_anomaly(mixed, generator=torch.Generator().manual_seed(1)).anomaly_map[0],
                               first[0])


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="loss_balance"):
        _tiny(loss_balance="mean")
    with pytest.raises(ValueError, match="box_size"):
        _tiny(box_size=[10, 30])
    with pytest.raises(ValueError, match="image_size"):
        _tiny(image_size=30)
