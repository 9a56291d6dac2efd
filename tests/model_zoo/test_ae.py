from __future__ import annotations

import pytest
import torch

from core.Configurator import ConfigError, build
from data.batch import Batch
from model_zoo.ae import AutoEncoder
from model_zoo.base import AnomalyModel


def _tiny(**overrides) -> AutoEncoder:
    torch.manual_seed(0)
    params = {"channels": [4, 8], "latent_channels": 8, "kernel_size": 3} | overrides
    return AutoEncoder(**params)


def test_latent_is_spatial_and_size_independent() -> None:
    model = _tiny()
    for shape in [(2, 1, 32, 32), (1, 1, 64, 48)]:
        x = torch.rand(shape)
        z = model.encoder(x)
        assert z.shape == (shape[0], 8, shape[2] // 8, shape[3] // 8)
        assert model.reconstruct(x).shape == shape


def test_reconstruction_in_unit_range_and_map_is_residual() -> None:
    model = _tiny().eval()
    x = torch.rand(3, 1, 32, 32)
    out = model.get_anomaly(x)
    assert 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())
    torch.testing.assert_close(out.anomaly_score, out.anomaly_map.mean(dim=(1, 2, 3)))
    assert not out.anomaly_map.requires_grad


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_recon_loss_matches_hand_computation(kind: str) -> None:
    model = _tiny(recon_loss=kind).eval()  # eval: batch norm uses running stats, so forward is repeatable
    x = torch.rand(2, 1, 32, 32)
    loss = model.training_losses(Batch(image=x))
    assert set(loss) == {"recon"}
    diff = model.reconstruct(x) - x
    expected = diff.abs().mean() if kind == "l1" else diff.pow(2).mean()
    torch.testing.assert_close(loss["recon"], expected)


def test_training_reduces_loss() -> None:
    model = _tiny(norm="group")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.training_losses(Batch(image=x))["recon"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_options_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"recon_loss='l3'.*'l1', 'l2'"):
        AutoEncoder(recon_loss="l3")
    with pytest.raises(ValueError, match="kernel_size=4"):
        AutoEncoder(kernel_size=4)
    with pytest.raises(ValueError, match="channels"):
        AutoEncoder(channels=[])
    with pytest.raises(ValueError, match="divisible by 8"):
        _tiny().reconstruct(torch.rand(1, 1, 36, 36))


def test_yaml_errors_name_the_path() -> None:
    block = {"module_name": "model_zoo.ae", "class_name": "AutoEncoder", "params": {"norm": "layer"}}
    with pytest.raises(ConfigError, match=r"model\.params\.norm.*'batch'"):
        build(block, "model", base=AnomalyModel)
    block = {"module_name": "model_zoo.ae", "class_name": "AutoEncoder", "params": {"chanels": [4]}}
    with pytest.raises(ConfigError, match="did you mean 'channels'"):
        build(block, "model", base=AnomalyModel)
