"""AutoDDPM ("mask, stitch and re-sample", Bercea et al., 2023): a trained DDPM plus in-painting at test time.

Per image, batched, on the input's device (METHODS.md section 3):

1. ``x_rec`` = partial-diffusion reconstruction from L_r (``noise_level``, default 200), clamped to [0,1].
2. ``r = |x_rec - x|`` divided by its per-image ``percentile`` (95th) and capped at 1; ``p`` = spatial LPIPS
   (SqueezeNet) between x and x_rec; ``c = p * r``.
3. ``m = 1[c > tau]`` (tau fixed, reference 0.13; ``tau < 0``: the per-image 95th percentile of c), dilated
   once with a 3x3 kernel. Thresholds are per image, never pooled over the batch.
4. Stitch: ``(1 - m) * x + m * x_rec`` (returned for figures); the re-sampling starts from x_rec noised to L_i.
5. RePaint re-sampling from L_i (``noise_level_inpaint``, default 50) with U (``resample_steps``, default 5)
   repeats per step, see :func:`model_zoo.diffusion.procedures.repaint`.
6. ``x_inp`` = the result; map = ``|x - clamp(x_inp, 0, 1)| * c`` (c smoothed with a Gaussian of
   ``c_smoothing_sigma`` when set), score = mean of the map.

The perceptual network is injected (a YAML block built lazily with the project's builder, or
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

from core.Configurator import build
from model_zoo.base import AnomalyOutput
from model_zoo.ddpm import DDPM, AutocastDtype, CompileMode
from model_zoo.diffusion.noise import NoiseType
from model_zoo.diffusion.procedures import InferenceMethod, repaint

logger = logging.getLogger(__name__)

DEFAULT_PERCEPTUAL: dict[str, Any] = {
    "module_name": "optim.losses.perceptual",
    "class_name": "PerceptualDistance",
    "params": {"net": "squeeze", "backend": "auto"},
}


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
        noise_level: L_r, the reconstruction's partial-diffusion step (reference 200).
        noise_level_inpaint: L_i, the re-sampling start step (reference 50).
        resample_steps: U, RePaint repeats per step (reference 5).
        tau: mask threshold on c (reference 0.13, <= 5 % FPR on healthy data); < 0: per-image ``percentile``.
        percentile: the per-image percentile (in %) used to normalise r and as the adaptive threshold (95).
        perceptual: ``{module_name, class_name, params}`` block of the perceptual network with
            ``.spatial(x, y) -> [B,1,H,W]`` for x, y in [0,1]; None: SqueezeNet LPIPS
            (``optim.losses.perceptual.PerceptualDistance(net='squeeze', backend='auto')``). Built on first use.
        c_smoothing_sigma: smooth c with a Gaussian of this sigma (pixels) in the final map; None: off.
        Other arguments: as :class:`DDPM` (the network and schedule must match the trained DDPM).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: tuple[int, ...] = (128, 256, 256),
        attention_levels: tuple[bool, ...] = (False, True, True),
        num_res_blocks: int = 1,
        num_head_channels: int | tuple[int, ...] = 256,
        norm_num_groups: int = 32,
        use_flash_attention: bool = False,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        x0_clip: tuple[float, float] | None = (-1.0, 1.0),
        noise_type: NoiseType = "gaussian",
        simplex_octaves: int = 6,
        simplex_persistence: float = 0.8,
        simplex_frequency: float = 64.0,
        noise_per_image: bool = True,
        noise_level: int = 200,
        inference: InferenceMethod = "ddpm",
        inference_steps: int = 50,
        ddim_eta: float = 0.0,
        val_noise_level: int | None = None,
        val_inference: InferenceMethod = "ddim",
        val_inference_steps: int = 25,
        val_seed: int = 0,
        autocast_dtype: AutocastDtype = "auto",
        channels_last: bool = False,
        torch_compile: bool = False,
        compile_mode: CompileMode = "default",
        noise_level_inpaint: int = 50,
        resample_steps: int = 5,
        tau: float = 0.13,
        percentile: float = 95.0,
        perceptual: dict[str, Any] | None = None,
        c_smoothing_sigma: float | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels, channels=channels, attention_levels=attention_levels,
            num_res_blocks=num_res_blocks, num_head_channels=num_head_channels, norm_num_groups=norm_num_groups,
            use_flash_attention=use_flash_attention, num_train_timesteps=num_train_timesteps,
            beta_start=beta_start, beta_end=beta_end, x0_clip=x0_clip, noise_type=noise_type,
            simplex_octaves=simplex_octaves, simplex_persistence=simplex_persistence,
            simplex_frequency=simplex_frequency, noise_per_image=noise_per_image, noise_level=noise_level,
            inference=inference, inference_steps=inference_steps, ddim_eta=ddim_eta,
            val_noise_level=val_noise_level, val_inference=val_inference, val_inference_steps=val_inference_steps,
            val_seed=val_seed, autocast_dtype=autocast_dtype, channels_last=channels_last,
            torch_compile=torch_compile, compile_mode=compile_mode,
        )
        if not 0 <= noise_level_inpaint < num_train_timesteps:
            raise ValueError(f"noise_level_inpaint={noise_level_inpaint} must be in [0, {num_train_timesteps})")
        if resample_steps < 1:
            raise ValueError(f"resample_steps={resample_steps} must be >= 1")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} must be in (0, 100]")
        if c_smoothing_sigma is not None and c_smoothing_sigma <= 0:
            raise ValueError(f"c_smoothing_sigma={c_smoothing_sigma} must be > 0 (or null to switch smoothing off)")
        if perceptual is not None and not isinstance(perceptual, dict):
            raise ValueError(f"perceptual must be a {{module_name, class_name, params}} mapping, got {perceptual!r}")
        self.noise_level_inpaint = noise_level_inpaint
        self.resample_steps = resample_steps
        self.tau = tau
        self.percentile = percentile
        self.c_smoothing_sigma = c_smoothing_sigma
        self.perceptual_block = dict(DEFAULT_PERCEPTUAL if perceptual is None else perceptual)
        # Not a submodule: LPIPS weights must stay out of the state dict (strict DDPM checkpoint loading).
        object.__setattr__(self, "_perceptual", None)

    @property
    def inference_label(self) -> str:
        """What :meth:`get_anomaly` computes: the reconstruction's label plus the re-sampling's."""
        calls = (self.noise_level_inpaint + 1) * self.resample_steps
        return (f"{super().inference_label}; RePaint from L_i={self.noise_level_inpaint} with U={self.resample_steps}, "
                f"{calls} network calls; tau={self.tau:g}")

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
        """The perceptual network, built from ``perceptual_block`` on first use."""
        if self._perceptual is None:
            module = build(self.perceptual_block, "model.params.perceptual", base=nn.Module)
            logger.info("AutoDDPM perceptual network: %s (backend %s)", type(module).__name__,
                        getattr(module, "backend_name", "unknown"))
            self.set_perceptual(module)
        return self._perceptual

    @torch.no_grad()
    def get_anomaly(
        self, x: Tensor, *, generator: torch.Generator | None = None, mask: Tensor | None = None
    ) -> AnomalyOutput:
        """AutoDDPM's map and score.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
            mask: [B,1,H,W] in {0,1} to re-sample instead of the computed (dilated) mask; for tests and
                ablations.

        Returns:
            ``AnomalyOutput`` with ``reconstruction = clamp(x_inp, 0, 1)`` and extras ``x_rec``, ``mask``,
            ``stitched``, ``x_inp`` (unclamped) and ``c`` ([B,1,H,W] each).
        """
        q = self.percentile / 100.0
        x_rec = self.reconstruct(x, generator=generator)
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
        x_inp = repaint(self.eps, x, x_rec, mask, noise_level=self.noise_level_inpaint,
                        resample_steps=self.resample_steps, schedule=self.schedule, noise=self.noise,
                        generator=generator, clip=self.x0_clip)
        weight = c if self.c_smoothing_sigma is None else gaussian_blur(c, self.c_smoothing_sigma)
        x_hat = x_inp.clamp(0.0, 1.0)
        anomaly_map = (x - x_hat).abs() * weight
        return AnomalyOutput(
            anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)), reconstruction=x_hat,
            extras={"x_rec": x_rec, "mask": mask, "stitched": stitched, "x_inp": x_inp, "c": c},
        )
