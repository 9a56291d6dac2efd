"""AutoDDPM ("mask, stitch and re-sample", Bercea et al., 2023): a trained DDPM plus in-painting at test time.

Per image, batched, on the input's device (docs/methods.md#autoddpm):

1. ``x_rec`` = partial-diffusion reconstruction from L_r (``inference.noise_level``, default 200), clamped to [0,1].
2. ``r = |x_rec - x|`` divided by its per-image ``percentile`` (95th) and capped at 1; ``p`` = spatial LPIPS
   (SqueezeNet) between x and x_rec; ``c = p * r`` (:meth:`AutoDDPM.mask_statistic`).
3. ``m = 1[c > tau]``, dilated once with a 3x3 kernel. ``tau``: a fixed number (the study's 0.13 was set for its
   data and its LPIPS), ``'calibrated'`` (from healthy data, e.g. at 5 % FPR of brain pixels: the evaluation's
   ``mask_calibration`` task computes it and passes it to every call, ``get_anomaly(x, mask_threshold=...)``; the
   model never stores it) or < 0 (the per-image 95th percentile of c). Thresholds are per image, never pooled
   over the batch.
4. Stitch: ``(1 - m) * x + m * x_rec`` (returned for figures); the re-sampling starts from x_rec noised to L_i.
5. RePaint re-sampling from L_i (``repaint.noise_level``, default 50) with U (``repaint.resample_steps``, default 5)
   repeats per step, for t = L_i..1 (L_i * U network calls), see :func:`model_zoo.diffusion.procedures.repaint`.
6. ``x_inp`` = the result; with ``x_hat = clamp(x_inp, 0, 1)`` the map is (``map_formula``)
   ``'study'`` (default, the study's code): ``|x - x_rec| * G_sigma(p) * |x - x_hat|`` with G a Gaussian of
   ``smoothing_sigma`` (2) applied per image over the two spatial axes (the study's code also smoothed across the
   batch axis, a bug, and did not clamp x_inp); ``'paper'`` (the AutoDDPM paper): ``|x - x_hat| * c``.
   Score = mean of the map.

The perceptual network is injected (built with the model from a typed ``perceptual`` setting, or given to
:meth:`AutoDDPM.set_perceptual`) and is deliberately not a registered submodule, so AutoDDPM's state dict is
exactly a DDPM's and DDPM checkpoints load strictly.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo import filters
from model_zoo.base import AnomalyOutput, MaskThresholdModel
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.procedures import repaint
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting
from optim.losses.perceptual import PerceptualSetting

logger = logging.getLogger(__name__)

MapFormula = Literal["study", "paper"]

#: AutoDDPM's defaults: reconstruction by the full DDPM chain from L_r = 200; RePaint from L_i = 50 with U = 5;
#: LPIPS with SqueezeNet (the study's), built with the model.
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
    """The study's AutoDDPM smoothing of x: [B,C,H,W], scipy's ``gaussian_filter(..., sigma=(0, 0, sigma, sigma))``
    per image (:func:`model_zoo.filters.gaussian_blur`, border ``symmetric``, radius ``int(4 sigma + 0.5)``)."""
    return filters.gaussian_blur(x, sigma, border="symmetric", radius=filters.radius_for(sigma, "scipy"))


class AutoDDPM(DDPM, MaskThresholdModel):
    """AutoDDPM on a trained DDPM (no extra training; same state dict as :class:`DDPM`).

    Args:
        repaint: the re-sampling: L_i (``noise_level``, reference 50) and U (``resample_steps``, reference 5).
        tau: mask threshold on c: a number (the study's 0.13; < 0: the per-image ``percentile`` of c) or
            ``'calibrated'``: every :meth:`get_anomaly` then takes it as ``mask_threshold`` (from healthy data, at a
            target FPR; see :meth:`mask_statistic`).
        percentile: the per-image percentile (in %) used to normalise r and as the adaptive threshold (95).
        map_formula: ``'study'`` (default; the study's three-term product) or ``'paper'`` (``|x - x_inp| * c``).
        smoothing_sigma: sigma (pixels) of the Gaussian applied to the LPIPS map in the ``'study'`` formula (2).
        perceptual: the perceptual network with ``.spatial(x, y) -> [B,1,H,W]`` for x, y in [0,1], built with the
            model (default: SqueezeNet LPIPS, backend ``'auto'``); :meth:`set_perceptual` injects another one.
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
        # Built now, so provenance() is fixed once the model exists. Not a submodule: LPIPS weights must stay out of
        # the state dict (strict DDPM checkpoint loading).
        object.__setattr__(self, "_perceptual", None)
        self.set_perceptual(perceptual.build())

    def network_calls(self, inference: InferenceSetting | None = None) -> int:
        """UNet calls of one :meth:`get_anomaly` call: the reconstruction's plus the re-sampling's."""
        return network_calls(self._setting(inference), self.repaint)

    def inference_label(self, inference: InferenceSetting | None = None) -> str:
        """What :meth:`get_anomaly` computes: the reconstruction's label, the re-sampling's, the mask rule, the map
        (the configured rule; a calibrated value is reported by whoever passes it)."""
        threshold = {"calibrated": "from healthy data", "per-image percentile": f"per-image {self.percentile:g}th "
                     "percentile", "fixed": "fixed"}[self.mask_threshold_rule["rule"]]
        return (f"{super().inference_label(inference)}; {self.repaint.label}; "
                f"{self.network_calls(inference)} network calls in all; tau={self.tau} ({threshold}); "
                f"map={self.map_formula}")

    # ----------------------------------------------------------------------------------------- mask threshold
    @property
    def needs_mask_threshold(self) -> bool:
        """True when ``tau='calibrated'``: every :meth:`get_anomaly` then needs ``mask_threshold`` (config only)."""
        return self.tau == "calibrated"

    @property
    def mask_threshold_rule(self) -> dict[str, Any]:
        """The configured rule: ``{'rule': 'fixed', 'value', 'source': 'config'}``, ``{'rule': 'per-image
        percentile', 'percentile'}`` or ``{'rule': 'calibrated'}`` (the value comes with each call)."""
        if self.tau == "calibrated":
            return {"rule": "calibrated"}
        if self.tau < 0:
            return {"rule": "per-image percentile", "percentile": self.percentile}
        return {"rule": "fixed", "value": float(self.tau), "source": "config"}

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
        """The perceptual network in use (its ``backend_name``, else its class name). The mask threshold's value and
        source are reported by the evaluation and the prediction, which hold it."""
        return {"perceptual": getattr(self._perceptual, "backend_name", type(self._perceptual).__name__)}

    @property
    def perceptual(self) -> Any:
        """The perceptual network (built from the ``perceptual`` setting with the model, or injected)."""
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

    def _threshold(self, mask_threshold: float | None, *, needed: bool) -> float | None:
        """The threshold on c of one call: the configured tau, the given calibrated value, or None (per-image
        percentile, or a mask override)."""
        if self.tau != "calibrated":
            if mask_threshold is not None:
                raise ValueError(f"get_anomaly: mask_threshold={mask_threshold} given but tau={self.tau!r} is set in "
                                 "the config; use tau: calibrated to take the threshold from data")
            return None if self.tau < 0 else float(self.tau)
        if mask_threshold is None:
            if needed:
                raise RuntimeError("AutoDDPM tau='calibrated' but no threshold is set: calibrate it on healthy data "
                                   "(the mask_calibration evaluation task, or mask_threshold.json beside the weights "
                                   "for predict) and pass get_anomaly(..., mask_threshold=value)")
            return None
        value = float(mask_threshold)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"get_anomaly: mask_threshold={value} must be a finite number >= 0 (c is >= 0)")
        return value

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
        mask: Tensor | None = None, mask_threshold: float | None = None,
    ) -> AnomalyOutput:
        """AutoDDPM's map and score.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
            inference: the reconstruction's setting for this call (None: the configured ``inference``); the
                re-sampling is ``repaint``'s.
            mask: [B,1,H,W] in {0,1} to re-sample instead of the computed (dilated) mask; for tests and
                ablations.
            mask_threshold: the calibrated threshold on c (finite, >= 0), required with ``tau='calibrated'``
                (unless ``mask`` is given) and refused with a configured tau (the YAML number wins).

        Returns:
            ``AnomalyOutput`` with ``reconstruction = clamp(x_inp, 0, 1)`` and extras ``x_rec``, ``c``, ``mask``,
            ``stitched`` (the start of the re-sampling before noising) and ``x_inp`` (unclamped), [B,1,H,W] each.

        Raises:
            RuntimeError: ``tau='calibrated'`` and no ``mask_threshold`` (nor ``mask``) is given.
            ValueError: a ``mask_threshold`` with a configured tau, or one that is not a finite number >= 0.
        """
        threshold = self._threshold(mask_threshold, needed=mask is None)
        x_rec, p, c = self._reconstruction_and_c(x, generator, inference)
        if mask is None:
            if threshold is None:
                threshold = per_image_quantile(c, self.percentile / 100.0)
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
