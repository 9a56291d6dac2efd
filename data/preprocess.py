"""Preprocessing of one decoded slice (docs/methods.md#protocol-and-data), identical for every split.

Images, in this order:

1. **Intensity to [0,1]** on the native slice, by one rule for every file of a run (``intensity``):
   ``'minmax'``: ``(x - min) / (max - min)`` per image; ``'percentile'``: per image, clip to the
   [0.5, 99.5] percentiles of all pixels, then min-max (robust to a few hot pixels); ``'unit'``: the files
   already hold values in fixed [0,1] units (the embedded benchmark, prepared NPY slices) and are used as
   they are; a value outside [0,1] is an error, never silently rescaled. With ``'minmax'``/``'percentile'`` a
   constant image becomes all zeros (never a division by zero).
2. **Pad to square** with zeros (the scaled background), centred (the extra pixel, if any, goes to the
   bottom/right).
3. **Resize** to ``target_size``: area averaging when shrinking, bilinear (``align_corners=False``) when
   enlarging; the result is clipped to [0,1].

Masks (anomaly labels, brain / healthy-tissue masks): any nonzero raw value is inside; padded with zeros
like their image, resized with **nearest** neighbour, then **binarised** to {0,1} float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Intensity = Literal["minmax", "percentile", "unit"]
INTENSITY_RULES: tuple[str, ...] = get_args(Intensity)
PERCENTILES = (0.5, 99.5)


def check_intensity(rule: str) -> None:
    """Raise ValueError unless ``rule`` is one of :data:`INTENSITY_RULES`."""
    if rule not in INTENSITY_RULES:
        raise ValueError(f"intensity {rule!r} is not one of {', '.join(INTENSITY_RULES)}")


def scale_intensity(image: np.ndarray, rule: Intensity) -> np.ndarray:
    """Scale a raw slice to [0,1].

    Args:
        image: [H,W] raw values.
        rule: ``'minmax'``, ``'percentile'`` or ``'unit'`` (see the module docstring).

    Returns:
        [H,W] float32 in [0,1].

    Raises:
        ValueError: with ``'unit'``, when a value lies outside [0,1].
    """
    check_intensity(rule)
    image = image.astype(np.float32, copy=False)
    if rule == "unit":
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"intensity 'unit' needs values in [0,1], got [{low:g}, {high:g}]")
        return image
    if rule == "percentile":
        low, high = np.percentile(image, PERCENTILES)
        image = np.clip(image, low, high)
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - low) / (high - low)).astype(np.float32)


def pad_to_square(array: np.ndarray) -> np.ndarray:
    """Zero-pad [H,W] to [S,S] with S = max(H, W), centred."""
    h, w = array.shape
    size = max(h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(array, ((top, size - h - top), (left, size - w - left)))


def _check_size(target_size: Sequence[int]) -> tuple[int, int]:
    if len(target_size) != 2 or not all(isinstance(s, int) and s > 0 for s in target_size):
        raise ValueError(f"target_size must be two positive integers (H, W), got {target_size!r}")
    return int(target_size[0]), int(target_size[1])


def resize_image(image: np.ndarray, target_size: Sequence[int]) -> np.ndarray:
    """Resize [H,W] in [0,1] to ``target_size``: area when shrinking, bilinear when enlarging; clipped to [0,1]."""
    size = _check_size(target_size)
    if image.shape == size:
        return image.astype(np.float32, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if size[0] <= image.shape[0] and size[1] <= image.shape[1]:
        y = F.interpolate(x, size=size, mode="area")
    else:
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return y[0, 0].clamp_(0.0, 1.0).numpy()


def resize_mask(mask: np.ndarray, target_size: Sequence[int]) -> np.ndarray:
    """Resize a mask [H,W] (nonzero = inside) with nearest neighbour and binarise; float32 in {0,1}."""
    size = _check_size(target_size)
    binary = (mask != 0).astype(np.float32)
    if binary.shape == size:
        return binary
    x = torch.from_numpy(binary)[None, None]
    y = F.interpolate(x, size=size, mode="nearest")
    return (y[0, 0] > 0.5).to(torch.float32).numpy()


def preprocess_image(image: np.ndarray, *, target_size: Sequence[int], intensity: Intensity) -> np.ndarray:
    """Raw [H,W] slice -> [target_H, target_W] float32 in [0,1] (scale, pad to square, resize)."""
    return resize_image(pad_to_square(scale_intensity(image, intensity)), target_size)


def preprocess_mask(mask: np.ndarray, *, target_size: Sequence[int]) -> np.ndarray:
    """Raw [H,W] mask -> [target_H, target_W] float32 in {0,1} (pad to square, nearest resize, binarise)."""
    return resize_mask(pad_to_square((mask != 0).astype(np.float32)), target_size)
