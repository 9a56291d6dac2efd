"""Map post-processing shared by RA and PHANES: CLAHE, Gaussian smoothing and a spatial LPIPS.

Everything works per image on the input's device (no statistic is taken over the batch), in torch:

* :func:`clahe`: contrast-limited adaptive histogram equalisation after skimage's ``equalize_adapthist``
  defaults (kernel = 1/8 of the image side, clip limit 0.01, 256 bins), vectorised over the batch. Not
  bit-identical to skimage: the clipped excess is redistributed in one uniform pass (skimage iterates), and
  the tile mappings are interpolated bilinearly between tile centres (as skimage) with edge tiles extended.
  ``size`` S computes it on the image resized to S x S: on small slices a tile of 1/8 of the side holds too few
  pixels for a histogram (16 at 32x32, where the clip limit is one pixel and every pixel becomes about its rank
  among 16, so noise is stretched to the full range and dominates a CLAHE residual); at the study's 128x128 a tile
  holds 256.
* :func:`gaussian_blur`: separable Gaussian, mirror borders, radius ``ceil(4 sigma)`` (:mod:`model_zoo.filters`).
* :class:`SaliencyPerceptual`: the spatial perceptual distance (``optim.losses.perceptual.PerceptualDistance``,
  LPIPS-SqueezeNet with official weights from ``weights_path``/``$TORCH_HOME``, else ST-LPIPS) built with the
  host model from a typed setting (``{net, backend, weights_path}``), never a submodule (so never in a
  ``state_dict`` or an optimizer); ``None`` = the documented "term off" fallback (saliency = 1).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from dl_utils.resample import at_size
from model_zoo import filters
from optim.losses.perceptual import PerceptualSetting

logger = logging.getLogger(__name__)

DEFAULT_LPIPS = PerceptualSetting(net="squeeze", backend="auto")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """The RA family's smoothing of x: [B,C,H,W] (:func:`model_zoo.filters.gaussian_blur`, border ``mirror``, radius
    ``ceil(4 sigma)``, the cut kernel renormalised on small images); same shape, identity for sigma <= 0."""
    return filters.gaussian_blur(x, sigma, border="mirror", radius=filters.radius_for(sigma, "ceil"))


def clahe(x: Tensor, *, tiles: int = 8, clip_limit: float = 0.01, nbins: int = 256, size: int | None = None
          ) -> Tensor:
    """Contrast-limited adaptive histogram equalisation, per image.

    Args:
        x: [B,1,H,W]; each image is first rescaled to [0,1] by its min and max (as skimage does); H and W
            divisible by ``tiles``.
        tiles: tiles per side (skimage's default kernel of 1/8 of the side = 8 tiles).
        clip_limit: fraction of a tile's pixels a histogram bin may hold (skimage's normalised clip limit).
        nbins: histogram bins.
        size: None: on x as given. An int S (divisible by ``tiles``): on x resized to S x S (bilinear), the result
            area-resized back to H x W (the tiles keep their share of the field of view and hold (S/tiles)^2 pixels).

    Returns:
        [B,1,H,W] in [0,1] (rescaled per image to the full range, as skimage), float32.
    """
    if size is not None:
        return at_size(lambda work: clahe(work, tiles=tiles, clip_limit=clip_limit, nbins=nbins), size, x.float())
    b, c, h, w = x.shape
    if c != 1 or h % tiles or w % tiles:
        raise ValueError(f"clahe expects [B,1,H,W] with H, W divisible by tiles={tiles}, got {tuple(x.shape)}")
    th, tw = h // tiles, w // tiles
    bins = (_minmax(x.float()) * (nbins - 1)).round().long().view(b, h, w)
    tiled = bins.view(b, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4).reshape(b, tiles, tiles, th * tw)
    hist = torch.zeros(b, tiles, tiles, nbins, device=x.device).scatter_add_(
        3, tiled, torch.ones_like(tiled, dtype=torch.float32))
    limit = max(1.0, float(int(clip_limit * th * tw)))
    excess = (hist - limit).clamp(min=0).sum(dim=3, keepdim=True)
    hist = hist.clamp(max=limit) + excess / nbins
    cdf = hist.cumsum(dim=3) / (th * tw)  # [B, ty, tx, nbins] in (0, 1]
    # bilinear interpolation between the mappings of the four nearest tile centres
    gy = ((torch.arange(h, device=x.device) + 0.5) / th - 0.5).clamp(0, tiles - 1)
    gx = ((torch.arange(w, device=x.device) + 0.5) / tw - 0.5).clamp(0, tiles - 1)
    y0, x0 = gy.floor().long(), gx.floor().long()
    y1, x1 = (y0 + 1).clamp(max=tiles - 1), (x0 + 1).clamp(max=tiles - 1)
    wy, wx = (gy - y0).view(1, h, 1), (gx - x0).view(1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)

    def lookup(ty: Tensor, tx: Tensor) -> Tensor:
        return cdf[batch, ty.view(1, h, 1), tx.view(1, 1, w), bins]

    top = lookup(y0, x0) * (1 - wx) + lookup(y0, x1) * wx
    bottom = lookup(y1, x0) * (1 - wx) + lookup(y1, x1) * wx
    return _minmax((top * (1 - wy) + bottom * wy).unsqueeze(1))


def _minmax(x: Tensor) -> Tensor:
    """Per-image rescale of [B,1,H,W] to [0,1] (as skimage's rescale_intensity); constant images become 0."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp(min=1e-12), torch.zeros_like(x))


class SaliencyPerceptual:
    """A spatial perceptual distance built from ``setting`` at construction (so the host's provenance is fixed once
    it exists); ``setting=None`` = saliency off (ones).

    Not an ``nn.Module`` attribute of the host model (kept in a plain attribute), so it never enters the host's
    ``state_dict``, ``parameters()`` or an optimizer.

    Args:
        setting: a :class:`optim.losses.perceptual.PerceptualSetting` (``{net, backend, weights_path}`` in YAML),
            or None.
        yaml_path: the block's YAML path, for error messages.
    """

    def __init__(self, setting: PerceptualSetting | None, yaml_path: str) -> None:
        if setting is not None and not isinstance(setting, PerceptualSetting):
            raise ValueError(f"{yaml_path} must be a {{net, backend, weights_path}} mapping or null, got {setting!r}")
        self.setting, self.yaml_path = setting, yaml_path
        self.module: Any = None
        if setting is not None:
            self.module = setting.build()
            self.module.eval().requires_grad_(False)
            logger.info("%s: %s", yaml_path, self.description)

    @property
    def description(self) -> str:
        """What the saliency is: the network's ``backend_name``, or the fallback."""
        if self.module is None:
            return "off (saliency = 1; no perceptual network configured)"
        return str(getattr(self.module, "backend_name", type(self.module).__name__))

    def spatial(self, x: Tensor, y: Tensor) -> Tensor:
        """[B,1,H,W] perceptual distance map between x and y ([B,1,H,W] in [0,1]); ones when off."""
        if self.module is None:
            return torch.ones_like(x[:, :1])
        self.module.to(x.device)
        with torch.autocast(x.device.type, enabled=False):
            return self.module.spatial(x.float(), y.float())
