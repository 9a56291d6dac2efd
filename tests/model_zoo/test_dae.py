"""DAE: the coarse noise, the denoising loss against the clean image, and the Kascenas post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from data.batch import Batch
from model_zoo.dae import DenoisingAE, coarse_noise, median_filter

CPU = torch.device("cpu")


def _tiny(**overrides) -> DenoisingAE:
    torch.manual_seed(0)
    return DenoisingAE(**({"channels": [4, 8], "noise_resolution": 4} | overrides))


def test_coarse_noise_is_the_rolled_upsampled_grid() -> None:
    noise = coarse_noise((3, 1, 8, 8), std=0.5, resolution=4, device=CPU, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn((3, 1, 4, 4), generator=gen) * 0.5
    up = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=True)
    dy, dx = torch.randint(0, 8, (3,), generator=gen), torch.randint(0, 8, (3,), generator=gen)
    expected = torch.stack([torch.roll(up[i], (int(dy[i]), int(dx[i])), dims=(1, 2)) for i in range(3)])
    torch.testing.assert_close(noise, expected)


def test_coarse_noise_is_low_frequency_and_differs_between_images() -> None:
    noise = coarse_noise((8, 1, 128, 128), std=0.2, resolution=16, device=CPU,
                         generator=torch.Generator().manual_seed(1))
    centred = noise - noise.mean(dim=(2, 3), keepdim=True)
    lag1 = (centred[..., 1:] * centred[..., :-1]).mean() / centred.pow(2).mean()
    assert lag1 > 0.95  # white noise would give ~0; one grid cell spans ~8.5 pixels
    assert 0.1 < float(noise.std()) < 0.25
    assert not torch.allclose(noise[0], noise[1])


@pytest.mark.parametrize("loss", ["masked_mse", "l1"])
def test_loss_compares_the_denoised_noisy_input_with_the_clean_image(loss: str, monkeypatch) -> None:
    model = _tiny(loss=loss)
    x = torch.rand(2, 1, 16, 16)
    x[:, :, :4] = 0.0  # background rows: never noised, ignored by the masked loss
    seen = {}

    def identity(inp: torch.Tensor) -> torch.Tensor:
        seen["input"] = inp
        return inp

    monkeypatch.setattr(model, "denoise", identity)
    value = model.training_losses(Batch(image=x))["denoising"]
    noisy = seen["input"]
    assert torch.equal(noisy[:, :, :4], x[:, :, :4])
    assert (noisy[:, :, 4:] != x[:, :, 4:]).float().mean() > 0.99
    diff = noisy - x  # an identity "denoiser" is penalised by exactly the noise it left in
    expected = diff.pow(2).mean() if loss == "masked_mse" else diff.abs().mean()
    torch.testing.assert_close(value, expected)
    assert value > 0


def test_median_filter_matches_scipy_mirror_padding() -> None:
    x = torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, 5, 5), mode="mirror")  # torch 'reflect' = scipy 'mirror'
    np.testing.assert_allclose(median_filter(x, 5).numpy(), expected)


def test_kascenas_postprocessing_erodes_the_brain_mask_and_median_filters() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 8:24] = 0.5
    plain = _tiny().eval()
    post = _tiny(postprocess="kascenas").eval()
    residual = plain.get_anomaly(x).anomaly_map
    out = post.get_anomaly(x).anomaly_map
    eroded = torch.zeros_like(x)
    eroded[..., 10:22, 10:22] = 1.0  # a 5x5 window fits entirely inside the 16x16 square only here
    torch.testing.assert_close(out, median_filter(residual * eroded, 5))
    assert out[..., :8, :].abs().max() == 0


def test_map_of_one_image_does_not_depend_on_the_batch() -> None:
    model = _tiny().eval()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(model.get_anomaly(x[1:2]).anomaly_map, model.get_anomaly(x).anomaly_map[1:2])


def test_validation_noise_comes_from_the_generator() -> None:
    model = _tiny().eval()
    batch = Batch(image=torch.rand(2, 1, 16, 16))
    first = model.validation_losses(batch, generator=torch.Generator().manual_seed(3))["denoising"]
    again = model.validation_losses(batch, generator=torch.Generator().manual_seed(3))["denoising"]
    other = model.validation_losses(batch, generator=torch.Generator().manual_seed(4))["denoising"]
    assert first == again and first != other


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="loss"):
        DenoisingAE(loss="mse")
    with pytest.raises(ValueError, match="postprocess"):
        DenoisingAE(postprocess="median")
    with pytest.raises(ValueError, match="divisible by 4"):
        _tiny(channels=[4, 8, 8]).get_anomaly(torch.rand(1, 1, 18, 18))
