"""AutoDDPM ("mask, stitch and re-sample", Bercea et al., 2023): a trained DDPM plus in-painting at test time.

Per image, batched, on the input's device (METHODS.md section 3):

1. ``x_rec`` = partial-diffusion reconstruction from L_r (``inference.noise_level``, default 200), clamped to [0,1].
2. ``r = |x_rec - x|`` divided by its per-image ``percentile`` (95th) and capped at 1; ``p`` = spatial LPIPS
   (SqueezeNet) between x and x_rec; ``c = p * r``.
3. ``m = 1[c > tau]`` (tau fixed, reference 0.13; ``tau < 0``: the per-image 95th percentile of c), dilated
   once with a 3x3 kernel. Thresholds are per image, never pooled over the batch.
4. Stitch: ``(1 - m) * x + m * x_rec`` (returned for figures); the re-sampling starts from x_rec noised to L_i.
5. RePaint re-sampling from L_i (``repaint.noise_level``, default 50) with U (``repaint.resample_steps``, default 5)
   repeats per step, see :func:`model_zoo.diffusion.procedures.repaint`.
6. ``x_inp`` = the result; map = ``|x - clamp(x_inp, 0, 1)| * c`` (c smoothed with a Gaussian of
   ``c_smoothing_sigma`` when set), score = mean of the map.

The perceptual network is injected (built lazily from a typed ``perceptual`` setting, or given to
:meth:`AutoDDPM.set_perceptual`) and is deliberately not a registered submodule, so AutoDDPM's state dict is
exactly a DDPM's and DDPM checkpoints load strictly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.base import AnomalyOutput
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.procedures import repaint
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting
from optim.losses.perceptual import PerceptualSetting

logger = logging.getLogger(__name__)

#: AutoDDPM's defaults: reconstruction by the full DDPM chain from L_r = 200; RePaint from L_i = 50 with U = 5;
#: LPIPS with SqueezeNet (the study's), built on first use.
RECONSTRUCTION = InferenceSetting(sampler="ddpm", noise_level=200)
REPAINT = RepaintSetting(noise_level=50, resample_steps=5)
SQUEEZE_LPIPS = PerceptualSetting(net="squeeze", backend="auto")


def network_calls(reconstruction: InferenceSetting, repaint: RepaintSetting) -> int:
    """UNet calls of one AutoDDPM anomaly map (per batch): the reconstruction's plus the re-sampling's."""
    return reconstruction.network_calls + repaint.network_calls


def per_image_quantile(x: Tensor, q: float) -> Tensor:
    """Per-image quantile.

    Args:
        x: [B,...] values.
        q: quantile in [0,1].

    Returns:
        [B,1,1,1] (broadcastable to [B,C,H,W]) quantiles, one per image.
    """
    return torch.quantile(x.flatten(1).float(), q, dim=1).reshape(-1, 1, 1, 1).to(x.dtype)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing with reflect padding, kernel radius ceil(3 sigma).

    Args:
        x: [B,C,H,W].
        sigma: standard deviation in pixels (> 0).

    Returns:
        [B,C,H,W] smoothed.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class AutoDDPM(DDPM):
    """AutoDDPM on a trained DDPM (no extra training; same state dict as :class:`DDPM`).

    Args:
        repaint: the re-sampling: L_i (``noise_level``, reference 50) and U (``resample_steps``, reference 5).
        tau: mask threshold on c (reference 0.13, <= 5 % FPR on healthy data); < 0: per-image ``percentile``.
        percentile: the per-image percentile (in %) used to normalise r and as the adaptive threshold (95).
        perceptual: the perceptual network with ``.spatial(x, y) -> [B,1,H,W]`` for x, y in [0,1], built on first
            use (default: SqueezeNet LPIPS, backend ``'auto'``); :meth:`set_perceptual` injects another one.
        c_smoothing_sigma: smooth c with a Gaussian of this sigma (pixels) in the final map; None: off.
        **ddpm: the DDPM's options (``network``, ``schedule``, ``noise``, ``inference``, ``val_inference``, ...),
            passed to :class:`DDPM` unchanged (the network and schedule must match the trained DDPM); the
            reconstruction's ``inference`` defaults to the full chain from L_r = 200.
    """

    def __init__(
        self,
        *,
        repaint: RepaintSetting = REPAINT,
        tau: float = 0.13,
        percentile: float = 95.0,
        perceptual: PerceptualSetting = SQUEEZE_LPIPS,
        c_smoothing_sigma: float | None = None,
        **ddpm: Any,
    ) -> None:
        super().__init__(**{"inference": RECONSTRUCTION, **ddpm})
        repaint.check_noise_level(self.num_train_timesteps)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must be in (0, 100]")
        if c_smoothing_sigma is not None and c_smoothing_sigma <= 0:
            raise ValueError(f"c_smoothing_sigma={c_smoothing_sigma} must be > 0 (or null to switch smoothing off)")
        if not isinstance(perceptual, PerceptualSetting):
            raise ValueError(f"perceptual must be a PerceptualSetting ({{net, backend, weights_path}}), "
                             f"got {perceptual!r}")
        self.repaint = repaint
        self.tau = tau
        self.percentile = percentile
        self.c_smoothing_sigma = c_smoothing_sigma
        self.perceptual_setting = perceptual
        # Not a submodule: LPIPS weights must stay out of the state dict (strict DDPM checkpoint loading).
        object.__setattr__(self, "_perceptual", None)

    def network_calls(self, inference: InferenceSetting | None = None) -> int:
        """UNet calls of one :meth:`get_anomaly` call: the reconstruction's plus the re-sampling's."""
        return network_calls(self._setting(inference), self.repaint)

    def inference_label(self, inference: InferenceSetting | None = None) -> str:
        """What :meth:`get_anomaly` computes: the reconstruction's label plus the re-sampling's."""
        return (f"{super().inference_label(inference)}; {self.repaint.label}; "
                f"{self.network_calls(inference)} network calls in all; tau={self.tau:g}")

    def set_perceptual(self, module: Any) -> None:
        """Use ``module`` (anything with ``.spatial(x, y) -> [B,1,H,W]``, usually an ``nn.Module``) as the
        perceptual network; a module is put in eval mode with gradients off."""
        if not callable(getattr(module, "spatial", None)):
            raise ValueError(f"perceptual network {type(module).__name__} has no spatial(x, y) method")
        if isinstance(module, nn.Module):
            module.eval()
            module.requires_grad_(False)
        object.__setattr__(self, "_perceptual", module)

    @property
    def perceptual(self) -> Any:
        """The perceptual network, built from the ``perceptual`` setting on first use."""
        if self._perceptual is None:
            module = self.perceptual_setting.build()
            logger.info("AutoDDPM perceptual network: %s (backend %s)", type(module).__name__,
                        getattr(module, "backend_name", "unknown"))
            self.set_perceptual(module)
        return self._perceptual

    @torch.no_grad()
    def get_anomaly(
        self, x: Tensor, *, generator: torch.Generator | None = None, inference: InferenceSetting | None = None,
        mask: Tensor | None = None,
    ) -> AnomalyOutput:
        """AutoDDPM's map and score.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
            inference: the reconstruction's setting for this call (None: the configured ``inference``); the
                re-sampling is ``repaint``'s.
            mask: [B,1,H,W] in {0,1} to re-sample instead of the computed (dilated) mask; for tests and
                ablations.

        Returns:
            ``AnomalyOutput`` with ``reconstruction = clamp(x_inp, 0, 1)`` and extras ``x_rec``, ``mask``,
            ``stitched``, ``x_inp`` (unclamped) and ``c`` ([B,1,H,W] each).
        """
        q = self.percentile / 100.0
        x_rec = self.reconstruct(x, generator=generator, inference=inference)
        r = (x_rec - x).abs()
        r = (r / per_image_quantile(r, q).clamp_min(1e-8)).clamp(max=1.0)
        perceptual = self.perceptual
        if isinstance(perceptual, nn.Module):
            perceptual = perceptual.to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = perceptual.spatial(x.float(), x_rec.float())
        if p.shape != r.shape:
            raise ValueError(f"perceptual network {type(perceptual).__name__}.spatial returned {tuple(p.shape)}, "
                             f"expected {tuple(r.shape)}")
        c = p * r
        if mask is None:
            threshold = per_image_quantile(c, q) if self.tau < 0 else self.tau
            mask = F.max_pool2d((c > threshold).to(x.dtype), kernel_size=3, stride=1, padding=1)
        elif mask.shape != x.shape:
            raise ValueError(f"mask override must have the input's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
        stitched = (1.0 - mask) * x + mask * x_rec
        x_inp = repaint(self.eps, x, x_rec, mask, noise_level=self.repaint.noise_level,
                        resample_steps=self.repaint.resample_steps, schedule=self.schedule, noise=self.noise,
                        generator=generator, clip=self.x0_clip)
        weight = c if self.c_smoothing_sigma is None else gaussian_blur(c, self.c_smoothing_sigma)
        x_hat = x_inp.clamp(0.0, 1.0)
        anomaly_map = (x - x_hat).abs() * weight
        return AnomalyOutput(
            anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)), reconstruction=x_hat,
            extras={"x_rec": x_rec, "mask": mask, "stitched": stitched, "x_inp": x_inp, "c": c},
        )
