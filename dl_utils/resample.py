"""Compute an image operation at a working size and bring its map back to the input's size.

Two map computations depend on the pixel count of their input: CLAHE's tiles (RA, PHANES) and the receptive fields
of a spatial LPIPS (:class:`optim.losses.perceptual.PerceptualDistance`). On small CPU slices (32x32, 64x64) they can
run at the study's 128x128 instead: inputs bilinearly resized to S x S, the operation, its map area-resized back (area
averaging keeps a map's mean over each output pixel's footprint). :func:`working_size` validates the YAML value the
same way for both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def working_size(value: object, *, name: str, minimum: int, multiple: int = 1) -> int | None:
    """``value`` if it is None or an int >= ``minimum`` divisible by ``multiple``, else a ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple:
        rule = f"an integer >= {minimum}" + (f" divisible by {multiple}" if multiple > 1 else "")
        raise ValueError(f"{name}={value!r} must be null or {rule}")
    return value


def at_size(fn: Callable[..., Tensor], size: int | None, *images: Tensor) -> Tensor:
    """``fn(*images)`` computed on the images bilinearly resized (align_corners=False) to ``size`` x ``size``.

    Args:
        fn: images [B,C,S,S] -> map [B,C',S,S].
        size: the working size; None, or the images' own size, calls ``fn`` on them as given.
        images: [B,C,H,W] each, the same H and W.

    Returns:
        ``fn``'s map, area-resized back to H x W when it was computed at another size.
    """
    shape = images[0].shape[-2:]
    if size is None or tuple(shape) == (size, size):
        return fn(*images)
    work = [F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False) for image in images]
    return F.interpolate(fn(*work), size=shape, mode="area")
