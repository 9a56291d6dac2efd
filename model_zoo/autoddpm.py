"""AutoDDPM ("mask, stitch and re-sample", Bercea et al., 2023): a trained DDPM plus in-painting at test time.

Per image, batched, on the input's device (METHODS.md section 3):

1. ``x_rec`` = partial-diffusion reconstruction from L_r (``inference.noise_level``, default 200), clamped to [0,1].
2. ``r = |x_rec - x|`` divided by its per-image ``percentile`` (95th) and capped at 1; ``p`` = spatial LPIPS
   (SqueezeNet) between x and x_rec; ``c = p * r`` (:meth:`AutoDDPM.mask_statistic`).
3. ``m = 1[c > tau]``, dilated once with a 3x3 kernel. ``tau``: a fixed number (the study's 0.13 was set for its
   data and its LPIPS), ``'calibrated'`` (set from healthy data with :meth:`AutoDDPM.set_mask_threshold`, e.g. at
   5 % FPR of brain pixels) or < 0 (the per-image 95th percentile of c). Thresholds are per image, never pooled
   over the batch.
4. Stitch: ``(1 - m) * x + m * x_rec`` (returned for figures); the re-sampling starts from x_rec noised to L_i.
5. RePaint re-sampling from L_i (``repaint.noise_level``, default 50) with U (``repaint.resample_steps``, default 5)
   repeats per step, for t = L_i..1 (L_i * U network calls), see :func:`model_zoo.diffusion.procedures.repaint`.
6. ``x_inp`` = the result; with ``x_hat = clamp(x_inp, 0, 1)`` the map is (``map_formula``)
   ``'study'`` (default, the study's code): ``|x - x_rec| * G_sigma(p) * |x - x_hat|`` with G a Gaussian of
   ``smoothing_sigma`` (2) applied per image over the two spatial axes (the study's code also smoothed across the
   batch axis, a bug, and did not clamp x_inp); ``'paper'`` (the AutoDDPM paper): ``|x - x_hat| * c``.
   Score = mean of the map.

The perceptual network is injected (built lazily from a typed ``perceptual`` setting, or given to
:meth:`AutoDDPM.set_perceptual`) and is deliberately not a registered submodule, so AutoDDPM's state dict is
exactly a DDPM's and DDPM checkpoints load strictly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.base import AnomalyOutput
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.procedures import repaint
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting
from optim.losses.perceptual import PerceptualSetting

logger = logging.getLogger(__name__)

MapFormula = Literal["study", "paper"]

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


def _pad_symmetric(x: Tensor, radius: int, dim: int) -> Tensor:
    """Pad ``dim`` by ``radius`` on both sides mirroring the edge sample too (scipy's 'reflect': d c b a | a b c d)."""
    n = x.shape[dim]
    if radius > n:
        raise ValueError(f"Gaussian kernel radius {radius} exceeds the image size {n} along dim {dim}")
    before = x.narrow(dim, 0, radius).flip(dim)
    after = x.narrow(dim, n - radius, radius).flip(dim)
    return torch.cat([before, x, after], dim=dim)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of each image and channel over the two spatial axes only.

    Same kernel and border rule as ``scipy.ndimage.gaussian_filter(..., sigma=(0, 0, sigma, sigma))`` (the study's
    smoothing, applied per image): kernel radius ``int(4 sigma + 0.5)``, symmetric ('reflect') borders.

    Args:
        x: [B,C,H,W].
        sigma: standard deviation in pixels (> 0).

    Returns:
        [B,C,H,W] smoothed.
    """
    radius = int(4.0 * sigma + 0.5)
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    out = F.conv2d(_pad_symmetric(x, radius, 3), kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(_pad_symmetric(out, radius, 2), kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class AutoDDPM(DDPM):
    """AutoDDPM on a trained DDPM (no extra training; same state dict as :class:`DDPM`).

    Args:
        repaint: the re-sampling: L_i (``noise_level``, reference 50) and U (``resample_steps``, reference 5).
        tau: mask threshold on c: a number (the study's 0.13; < 0: the per-image ``percentile`` of c) or
            ``'calibrated'``: :meth:`set_mask_threshold` must set it (from healthy data, at a target FPR) before
            :meth:`get_anomaly` runs.
        percentile: the per-image percentile (in %) used to normalise r and as the adaptive threshold (95).
        map_formula: ``'study'`` (default; the study's three-term product) or ``'paper'`` (``|x - x_inp| * c``).
        smoothing_sigma: sigma (pixels) of the Gaussian applied to the LPIPS map in the ``'study'`` formula (2).
        perceptual: the perceptual network with ``.spatial(x, y) -> [B,1,H,W]`` for x, y in [0,1], built on first
            use (default: SqueezeNet LPIPS, backend ``'auto'``); :meth:`set_perceptual` injects another one.
        **ddpm: the DDPM's options (``network``, ``schedule``, ``noise``, ``inference``, ``val_inference``, ...),
            passed to :class:`DDPM` unchanged (the network and schedule must match the trained DDPM); the
            reconstruction's ``inference`` defaults to the full chain from L_r = 200.
    """

    def __init__(
        self,
        *,
        repaint: RepaintSetting = REPAINT,
        tau: float | Literal["calibrated"] = 0.13,
        percentile: float = 95.0,
        map_formula: MapFormula = "study",
        smoothing_sigma: float = 2.0,
        perceptual: PerceptualSetting = SQUEEZE_LPIPS,
        **ddpm: Any,
    ) -> None:
        super().__init__(**{"inference": RECONSTRUCTION, **ddpm})
        repaint.check_noise_level(self.num_train_timesteps)
        if not (tau == "calibrated" or (isinstance(tau, int | float) and not isinstance(tau, bool))):
            raise ValueError(f"tau={tau!r} must be a number or 'calibrated'")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must be in (0, 100]")
        if map_formula not in get_args(MapFormula):
            raise ValueError(f"map_formula={map_formula!r} is not one of {', '.join(map(repr, get_args(MapFormula)))}")
        if smoothing_sigma <= 0:
            raise ValueError(f"smoothing_sigma={smoothing_sigma} must be > 0")
        if not isinstance(perceptual, PerceptualSetting):
            raise ValueError(f"perceptual must be a PerceptualSetting ({{net, backend, weights_path}}), "
                             f"got {perceptual!r}")
        self.repaint = repaint
        self.tau = tau
        self.percentile = percentile
        self.map_formula = map_formula
        self.smoothing_sigma = smoothing_sigma
        self.perceptual_setting = perceptual
        self._mask_threshold: float | None = None if tau == "calibrated" else float(tau)
        self._threshold_provenance: dict[str, Any] = (
            {} if tau == "calibrated" else {"rule": "per-image percentile", "percentile": percentile} if tau < 0
            else {"rule": "fixed", "value": float(tau), "source": "config"})
        # Not a submodule: LPIPS weights must stay out of the state dict (strict DDPM checkpoint loading).
        object.__setattr__(self, "_perceptual", None)

    def network_calls(self, inference: InferenceSetting | None = None) -> int:
        """UNet calls of one :meth:`get_anomaly` call: the reconstruction's plus the re-sampling's."""
        return network_calls(self._setting(inference), self.repaint)

    def inference_label(self, inference: InferenceSetting | None = None) -> str:
        """What :meth:`get_anomaly` computes: the reconstruction's label, the re-sampling's, the mask rule, the map."""
        if self.tau != "calibrated" and self.tau < 0:
            threshold = f"per-image {self.percentile:g}th percentile"
        else:
            threshold = "uncalibrated" if self._mask_threshold is None else f"{self._mask_threshold:g}"
        return (f"{super().inference_label(inference)}; {self.repaint.label}; "
                f"{self.network_calls(inference)} network calls in all; tau={self.tau} ({threshold}); "
                f"map={self.map_formula}")

    # ----------------------------------------------------------------------------------------- mask threshold
    @property
    def needs_calibration(self) -> bool:
        """True while ``tau='calibrated'`` and no threshold has been set."""
        return self.tau == "calibrated" and self._mask_threshold is None

    @property
    def mask_threshold(self) -> float | None:
        """The threshold on c in use (None: per-image percentile, or not calibrated yet)."""
        return None if self.tau != "calibrated" and self.tau < 0 else self._mask_threshold

    @property
    def mask_threshold_provenance(self) -> dict[str, Any]:
        """Where the threshold comes from (``{'rule': 'fixed' | 'per-image percentile' | 'calibrated', ...}``)."""
        return dict(self._threshold_provenance)

    def set_mask_threshold(self, value: float, provenance: Mapping[str, Any]) -> None:
        """Set the calibrated threshold on c (``tau='calibrated'`` only: an explicit YAML number wins).

        Args:
            value: the threshold, e.g. the value c exceeds on 5 % of the brain pixels of healthy validation images
                (c from :meth:`mask_statistic`, per image, under the same inference setting as the evaluation).
            provenance: how it was obtained (data set, n, target and achieved FPR, perceptual backend, ...);
                kept with ``rule='calibrated'`` and ``value`` for manifests and reports.
        """
        if self.tau != "calibrated":
            raise ValueError(f"set_mask_threshold: tau={self.tau!r} is set in the config; use tau: calibrated to "
                             "take the threshold from data")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"set_mask_threshold: value={value} must be a finite number >= 0 (c is >= 0)")
        self._mask_threshold = value
        self._threshold_provenance = {**provenance, "rule": "calibrated", "value": value}
        logger.info("AutoDDPM mask threshold tau = %g (%s)", value, self._threshold_provenance)

    # ----------------------------------------------------------------------------------------- perceptual network
    def set_perceptual(self, module: Any) -> None:
        """Use ``module`` (anything with ``.spatial(x, y) -> [B,1,H,W]``, usually an ``nn.Module``) as the
        perceptual network; a module is put in eval mode with gradients off."""
        if not callable(getattr(module, "spatial", None)):
            raise ValueError(f"perceptual network {type(module).__name__} has no spatial(x, y) method")
        if isinstance(module, nn.Module):
            module.eval()
            module.requires_grad_(False)
        object.__setattr__(self, "_perceptual", module)

    def provenance(self) -> dict[str, Any]:
        """The perceptual network actually used (once built) and the mask threshold's rule and source."""
        built = self._perceptual
        perceptual = getattr(built, "backend_name", type(built).__name__) if built is not None \
            else f"not built yet ({self.perceptual_setting})"
        source = self.mask_threshold_provenance
        if source.get("rule") == "calibrated":
            threshold = (f"calibrated: {source.get('value', float('nan')):.4g} at FPR {source.get('target_fpr')} on "
                         f"'{source.get('dataset')}' ({source.get('n_images')} images)")
        elif self.tau == "calibrated":
            threshold = "calibrated: not set yet"
        else:
            threshold = ", ".join(f"{k}={v}" for k, v in source.items())
        return {"perceptual": perceptual, "mask_threshold": threshold}

    @property
    def perceptual(self) -> Any:
        """The perceptual network, built from the ``perceptual`` setting on first use."""
        if self._perceptual is None:
            module = self.perceptual_setting.build()
            logger.info("AutoDDPM perceptual network: %s (backend %s)", type(module).__name__,
                        getattr(module, "backend_name", "unknown"))
            self.set_perceptual(module)
        return self._perceptual

    # ----------------------------------------------------------------------------------------- inference
    def _reconstruction_and_c(
        self, x: Tensor, generator: torch.Generator | None, inference: InferenceSetting | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_rec, p, c), each [B,1,H,W]: steps 1-2, the reconstruction drawing first from ``generator``."""
        x_rec = self.reconstruct(x, generator=generator, inference=inference)
        r = (x_rec - x).abs()
        r = (r / per_image_quantile(r, self.percentile / 100.0).clamp_min(1e-8)).clamp(max=1.0)
        perceptual = self.perceptual
        if isinstance(perceptual, nn.Module):
            perceptual = perceptual.to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = perceptual.spatial(x.float(), x_rec.float())
        if p.shape != r.shape:
            raise ValueError(f"perceptual network {type(perceptual).__name__}.spatial returned {tuple(p.shape)}, "
                             f"expected {tuple(r.shape)}")
        return x_rec, p, p * r

    @torch.no_grad()
    def mask_statistic(
        self, x: Tensor, *, generator: torch.Generator | None = None, inference: InferenceSetting | None = None
    ) -> Tensor:
        """c, the statistic the mask thresholds, computed exactly as in :meth:`get_anomaly` (per image).

        With the same generator state and setting, the result equals ``get_anomaly(x, ...).extras['c']`` (the
        reconstruction draws first), so a threshold calibrated on it applies unchanged at test time.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
            inference: the reconstruction's setting (None: the configured ``inference``).

        Returns:
            [B,1,H,W] c >= 0.
        """
        return self._reconstruction_and_c(x, generator, inference)[2]

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
            ``AnomalyOutput`` with ``reconstruction = clamp(x_inp, 0, 1)`` and extras ``x_rec``, ``c``, ``mask``,
            ``stitched`` (the start of the re-sampling before noising) and ``x_inp`` (unclamped), [B,1,H,W] each.

        Raises:
            RuntimeError: ``tau='calibrated'`` and :meth:`set_mask_threshold` has not been called.
        """
        if mask is None and self.needs_calibration:
            raise RuntimeError("AutoDDPM tau='calibrated' but no threshold is set: calibrate it on healthy data "
                               "(mask_statistic + set_mask_threshold) before computing anomaly maps")
        x_rec, p, c = self._reconstruction_and_c(x, generator, inference)
        if mask is None:
            threshold = per_image_quantile(c, self.percentile / 100.0) if self.mask_threshold is None \
                else self.mask_threshold
            mask = F.max_pool2d((c > threshold).to(x.dtype), kernel_size=3, stride=1, padding=1)
        elif mask.shape != x.shape:
            raise ValueError(f"mask override must have the input's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
        stitched = (1.0 - mask) * x + mask * x_rec
        x_inp = repaint(self.eps, x, x_rec, mask, noise_level=self.repaint.noise_level,
                        resample_steps=self.repaint.resample_steps, schedule=self.schedule, noise=self.noise,
                        generator=generator, clip=self.x0_clip)
        x_hat = x_inp.clamp(0.0, 1.0)
        if self.map_formula == "study":
            anomaly_map = (x - x_rec).abs() * gaussian_blur(p, self.smoothing_sigma) * (x - x_hat).abs()
        else:
            anomaly_map = (x - x_hat).abs() * c
        return AnomalyOutput(
            anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)), reconstruction=x_hat,
            extras={"x_rec": x_rec, "c": c, "mask": mask, "stitched": stitched, "x_inp": x_inp},
        )
