"""Augmentation transforms move masks with images and keep ranges."""

from __future__ import annotations

import pytest
import torch

from data.batch import Sample
from data.transforms import RandomAffine, RandomFlip, RandomGamma


def _sample() -> Sample:
    image = torch.linspace(0, 1, 16 * 16).reshape(1, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 2:6] = 1
    return Sample(image=image, anomaly_mask=mask, brain_mask=torch.ones(1, 16, 16), label=1, path="x")


def test_flip_moves_image_and_masks_together() -> None:
    s = _sample()
    out = RandomFlip(p=1.0)(s)
    assert torch.equal(out.image, s.image.flip(-1))
    assert torch.equal(out.anomaly_mask, s.anomaly_mask.flip(-1))
    assert RandomFlip(p=0.0)(s) is s


def test_affine_keeps_masks_binary_and_image_in_range() -> None:
    torch.manual_seed(0)
    out = RandomAffine(degrees=20, scale=(0.9, 1.1), translate=0.1, p=1.0)(_sample())
    assert out.image.shape == (1, 16, 16)
    assert 0.0 <= out.image.min() and out.image.max() <= 1.0
    assert set(out.anomaly_mask.unique().tolist()) <= {0.0, 1.0}
    assert out.anomaly_mask.sum() > 0
    assert not torch.equal(out.image, _sample().image)


def test_gamma_changes_only_the_image() -> None:
    s = _sample()
    out = RandomGamma(gamma=(2.0, 2.0), p=1.0)(s)
    torch.testing.assert_close(out.image, s.image**2)
    assert out.anomaly_mask is s.anomaly_mask


@pytest.mark.parametrize("make", [lambda: RandomFlip(p=1.5), lambda: RandomAffine(scale=(1.2, 1.0)),
                                  lambda: RandomGamma(gamma=(0.0, 1.0))])
def test_invalid_parameters(make) -> None:  # noqa: ANN001
    with pytest.raises(ValueError):
        make()
