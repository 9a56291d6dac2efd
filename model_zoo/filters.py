"""Separable Gaussian smoothing of image batches, with the kernel radius and border rule of each method's reference.

One implementation, three border rules (scipy.ndimage's names in brackets, so each is checkable against it):

* ``mirror`` (scipy ``mirror``: ``c b | a b c``, the edge sample not repeated). On an image smaller than the
  kernel the pad is cut to ``size - 1`` and the cut kernel renormalised, so a constant image stays constant (RA's and
  PHANES's saliency and mask smoothing, SI-VAE's maps).
* ``symmetric`` (scipy ``reflect``: ``b a | a b c``, the edge sample repeated): the study's AutoDDPM smoothing,
  ``scipy.ndimage.gaussian_filter`` per image; the radius must not exceed the image size.
* ``zeros`` (scipy ``constant`` with ``cval=0``): AOT-GAN's soft discriminator targets (PHANES); mass leaks out at
  the borders, as in the reference.

The kernel is ``exp(-d^2 / (2 sigma^2))`` on ``d = -radius..radius``, computed in float64 and normalised, then cast
to the input's dtype. :func:`radius_for` gives the two radius rules in use (``ceil(4 sigma)`` and scipy's
``int(4 sigma + 0.5)``); a kernel of odd size ``k`` has radius ``k // 2``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Border = Literal["mirror", "symmetric", "zeros"]
RadiusRule = Literal["ceil", "scipy"]


def radius_for(sigma: float, rule: RadiusRule) -> int:
    """Kernel radius for ``sigma`` under ``rule``: ``'ceil'`` = max(1, ceil(4 sigma)), ``'scipy'`` = int(4 sigma + 0.5)
    (``scipy.ndimage.gaussian_filter``'s default truncate of 4)."""
    if rule == "ceil":
        return max(1, math.ceil(4.0 * sigma))
    if rule == "scipy":
        return int(4.0 * sigma + 0.5)
    raise ValueError(f"radius rule {rule!r} invalid; valid: {', '.join(get_args(RadiusRule))}")


def _kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _pad_symmetric(x: Tensor, radius: int, dim: int) -> Tensor:
    n = x.shape[dim]
    if radius > n:
        raise ValueError(f"Gaussian kernel radius {radius} exceeds the image size {n} along dim {dim} "
                         "(border 'symmetric' mirrors at most one image width)")
    before = x.narrow(dim, 0, radius).flip(dim)
    after = x.narrow(dim, n - radius, radius).flip(dim)
    return torch.cat([before, x, after], dim=dim)


def _along(x: Tensor, kernel: Tensor, dim: int, border: Border) -> Tensor:
    """Convolve every channel of x: [B,C,H,W] with ``kernel`` along ``dim`` (2 = H, 3 = W)."""
    channels, radius = x.shape[1], (kernel.numel() - 1) // 2
    shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
    if border == "zeros":
        padding = (radius, 0) if dim == 2 else (0, radius)
        return F.conv2d(x, kernel.view(shape).expand(channels, *shape[1:]), padding=padding, groups=channels)
    if border == "symmetric":
        return F.conv2d(_pad_symmetric(x, radius, dim), kernel.view(shape).expand(channels, *shape[1:]),
                        groups=channels)
    pad = min(radius, x.shape[dim] - 1)  # mirror: torch's 'reflect' pads at most size - 1
    cut = kernel[radius - pad: radius + pad + 1]
    padded = F.pad(x, (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0), mode="reflect") if pad else x
    out = F.conv2d(padded, cut.view(shape).expand(channels, *shape[1:]), groups=channels)
    return out / cut.sum()  # a cut kernel no longer sums to 1: renormalise so constants stay constant


def gaussian_blur(x: Tensor, sigma: float, *, border: Border, radius: int) -> Tensor:
    """Separable Gaussian smoothing of each image and channel over the two spatial axes.

    Args:
        x: [B,C,H,W].
        sigma: standard deviation in pixels; <= 0 returns ``x`` unchanged.
        border: ``'mirror'``, ``'symmetric'`` or ``'zeros'`` (module docstring).
        radius: kernel radius in pixels (>= 1), e.g. :func:`radius_for` or ``kernel_size // 2``.

    Returns:
        [B,C,H,W] smoothed, x's dtype.
    """
    if border not in get_args(Border):
        raise ValueError(f"border {border!r} invalid; valid: {', '.join(get_args(Border))}")
    if sigma <= 0:
        return x
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    kernel = _kernel(sigma, radius, x.dtype, x.device)
    return _along(_along(x, kernel, 2, border), kernel, 3, border)
