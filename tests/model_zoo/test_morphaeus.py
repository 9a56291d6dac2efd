"""MorphAEus: the smoothness term, the epoch-switched loss and beta ramp, the trainer's epoch hook, the warp
direction, and that the integrated deformation is invertible and does not fold where a plain displacement does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.losses import DiffusionLoss

from core.Trainer import Trainer
from data.batch import Batch
from model_zoo.morphaeus import MorphAEus, smoothness
from tests.core._trainer_fixtures import FakeData, TinyAE, make_run

pytestmark = [pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
              pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")]


def _tiny(**overrides) -> MorphAEus:
    torch.manual_seed(0)
    params = {"channels": [4, 8, 8, 8, 8], "deformer_channels": 4, "deform_start_epoch": 5,
              "beta_ramp_epochs": 10} | overrides
    return MorphAEus(**params)


def _jacobian_det(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) on interior pixels for a displacement u: [B,2,H,W] (rows, columns)."""
    du_r = (ddf[:, :, 2:, 1:-1] - ddf[:, :, :-2, 1:-1]) / 2  # d/d row of both components
    du_c = (ddf[:, :, 1:-1, 2:] - ddf[:, :, 1:-1, :-2]) / 2
    return (1 + du_r[:, 0]) * (1 + du_c[:, 1]) - du_c[:, 0] * du_r[:, 1]


def test_smoothness_is_half_the_mean_squared_central_difference() -> None:
    rows = torch.arange(8.0)[:, None].expand(8, 8)
    v = torch.stack([3.0 * rows, torch.zeros(8, 8)])[None]  # d(v_rows)/d row = 3, everything else 0
    torch.testing.assert_close(smoothness(v), torch.tensor(0.5 * (9.0 + 0.0) / 2))
    w = torch.randn(2, 2, 9, 7)
    torch.testing.assert_close(smoothness(w), 0.5 * DiffusionLoss()(w))


def test_deformation_terms_switch_on_at_the_configured_epoch_and_beta_ramps() -> None:
    model = _tiny().train()
    x = torch.rand(3, 1, 32, 32)
    model.on_train_epoch_start(4)
    before = model.training_losses(Batch(image=x))
    assert set(before) == {"mse", "ssim", "ncc", "smooth"}
    assert before["ncc"] == 0 and before["smooth"] == 0 and before["mse"] > 0 and before["ssim"] > 0
    for epoch, beta in ((5, 0.5), (0, 1e-3), (20, 1.0)):
        model.on_train_epoch_start(epoch)
        assert model.beta == pytest.approx(beta)
    model.on_train_epoch_start(5)
    after = model.training_losses(Batch(image=x))
    assert 0 < after["ncc"] < 2
    out = model.forward_all(x)
    torch.testing.assert_close(after["smooth"], 0.5 * smoothness(out["velocity"]))


def test_ncc_terms_also_train_the_autoencoder_after_the_switch() -> None:
    model = _tiny().train()
    x = torch.rand(3, 1, 32, 32)
    for epoch, expect_grad in ((0, False), (5, True)):
        model.zero_grad()
        model.on_train_epoch_start(epoch)
        model.training_losses(Batch(image=x))["ncc"].backward()
        grads = [p.grad for p in model.encoder.parameters()]
        has_grad = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert has_grad == expect_grad


def test_the_trainer_reports_each_epoch_to_the_model(tmp_path: Path) -> None:
    seen: list[int] = []

    class Recording(TinyAE):
        def on_train_epoch_start(self, epoch: int) -> None:
            seen.append(epoch)

    trainer = Trainer.from_options(model=Recording(), data=FakeData(), run=make_run(tmp_path),
                                   max_epochs=3, progress=False)
    trainer.fit()
    assert seen == [0, 1, 2]


def test_reconstruction_is_the_prior_sampled_at_the_displaced_grid() -> None:
    model = _tiny().eval()
    with torch.no_grad():
        model.flow.weight.zero_()
        model.flow.bias.copy_(torch.tensor([2.0, 0.0]))  # displacement of +2 rows everywhere
    x = torch.rand(2, 1, 32, 32)
    out = model.get_anomaly(x)
    prior = out.extras["prior"]
    # a constant field integrates to itself away from the (zero-padded) border: y(i, j) = P(i + 2, j)
    torch.testing.assert_close(out.reconstruction[:, :, 4:-4, 4:-4], prior[:, :, 6:-2, 4:-4])
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())


def test_integration_does_not_fold_and_minus_v_inverts_it() -> None:
    model = _tiny()
    cols = torch.arange(64.0)
    v = torch.zeros(1, 2, 64, 64)
    v[:, 1] = 4.0 * torch.sin(2 * torch.pi * cols / 16)  # column displacement with slope up to 1.57: folds if added
    assert _jacobian_det(v).min() < 0
    phi = model.integrate(v)
    assert _jacobian_det(phi)[:, 8:-8, 8:-8].min() > 0
    # phi(-v) o phi(v) ~ identity: u(x) + u_back(x + u(x)) ~ 0 in the interior
    back = model.integrate(-v)
    composed = phi + model.warp(back, phi)
    assert composed[:, :, 8:-8, 8:-8].abs().max() < 0.5  # measured 0.33 px (interpolation error of 7 squarings)
    plain = v + model.warp(-v, v)  # without integration the round trip is far off (measured 4.8 px)
    assert plain[:, :, 8:-8, 8:-8].abs().max() > 2.0


def test_validation_reports_the_deformed_and_the_prior_error() -> None:
    model = _tiny().eval()
    with torch.no_grad():
        model.flow.bias.copy_(torch.tensor([3.0, -2.0]))
    x = torch.rand(2, 1, 32, 32)
    metrics = model.validation_losses(Batch(image=x))
    out = model.forward_all(x)
    torch.testing.assert_close(metrics["prior_mse"], (out["prior"] - x).pow(2).mean())
    torch.testing.assert_close(metrics["recon_mse"], (out["reconstruction"] - x).pow(2).mean())
    assert metrics["prior_mse"] != metrics["recon_mse"]


def test_warping_and_losses_stay_float32_under_autocast() -> None:
    model = _tiny(deform_start_epoch=0).train()
    x = torch.rand(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_all(x)
        losses = model.training_losses(Batch(image=x))
    assert out["displacement"].dtype == out["reconstruction"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="deformer_levels"):
        _tiny(deformer_levels=5)
    with pytest.raises(ValueError, match="deform_start_epoch"):
        _tiny(deform_start_epoch=-1)
    with pytest.raises(ValueError, match="divisible by 32"):
        _tiny().eval().get_anomaly(torch.rand(1, 1, 48, 48))
