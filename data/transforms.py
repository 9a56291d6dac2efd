"""Training augmentation: ``Sample -> Sample`` transforms built from YAML blocks.

``DataModule`` applies the list given in ``data.params.augmentation`` to the **training split only**, after the
cache. Geometric transforms move the image and its masks together (masks with nearest-neighbour sampling, so
they stay in {0,1}); intensity transforms touch only the image and keep it in [0,1].

Randomness comes from torch's global generator: in the main process it follows the run's seed, in loader
workers torch seeds each worker from the loader's generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from data.batch import Sample

logger = logging.getLogger(__name__)


class SampleTransform(abc.ABC):
    """Base class of augmentation transforms (the slot ``data.params.augmentation[i]``)."""

    @abc.abstractmethod
    def __call__(self, sample: Sample) -> Sample:
        """Return a transformed copy; ``sample.image`` is [1,H,W] in [0,1], masks [1,H,W] in {0,1} or None."""


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


class RandomFlip(SampleTransform):
    """Flip image and masks left-right with probability ``p``.

    Args:
        p: probability of flipping.
    """

    def __init__(self, *, p: float = 0.5) -> None:
        _check_probability(p)
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample

        def flip(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.flip(t, dims=(-1,))

        return replace(sample, image=flip(sample.image), anomaly_mask=flip(sample.anomaly_mask),
                       brain_mask=flip(sample.brain_mask))


class RandomAffine(SampleTransform):
    """Random rotation, isotropic scaling and translation of image and masks (zero padding outside).

    Args:
        degrees: maximum absolute rotation angle in degrees.
        scale: (min, max) scale factor.
        translate: maximum shift as a fraction of the image size.
        p: probability of applying the transform.
    """

    def __init__(self, *, degrees: float = 10.0, scale: Sequence[float] = (0.95, 1.05), translate: float = 0.05,
                 p: float = 1.0) -> None:
        _check_probability(p)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale!r}")
        if degrees < 0 or translate < 0:
            raise ValueError(f"degrees and translate must be >= 0, got {degrees}, {translate}")
        self.degrees, self.scale, self.translate, self.p = degrees, (float(scale[0]), float(scale[1])), translate, p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        angle = math.radians(_uniform(-self.degrees, self.degrees))
        s = _uniform(*self.scale)
        tx, ty = (_uniform(-self.translate, self.translate) * 2 for _ in range(2))
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, *sample.image.shape], align_corners=False)

        def warp(t: torch.Tensor | None, mode: str) -> torch.Tensor | None:
            if t is None:
                return None
            return F.grid_sample(t[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]

        image = warp(sample.image, "bilinear")
        assert image is not None
        return replace(sample, image=image.clamp(0.0, 1.0), anomaly_mask=warp(sample.anomaly_mask, "nearest"),
                       brain_mask=warp(sample.brain_mask, "nearest"))


class RandomGamma(SampleTransform):
    """Gamma change of the image, ``x ** g`` with ``g`` uniform in ``gamma``; stays in [0,1].

    Args:
        gamma: (min, max) exponent.
        p: probability of applying the transform.
    """

    def __init__(self, *, gamma: Sequence[float] = (0.8, 1.25), p: float = 1.0) -> None:
        _check_probability(p)
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (min, max) with 0 < min <= max, got {gamma!r}")
        self.gamma, self.p = (float(gamma[0]), float(gamma[1])), p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        g = _uniform(*self.gamma)
        return replace(sample, image=sample.image.clamp(0.0, 1.0).pow(g))
