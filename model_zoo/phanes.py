"""PHANES, pseudo-healthy generative networks (Bercea et al., MICCAI 2023): RA + an AOT-GAN inpainter.

The method and where it departs from the study's code: docs/methods.md#pseudo-healthy-generative-networks-phanes.

Four optimizer groups, trained jointly from scratch on every batch: ``encoder`` and
``decoder`` (the RA coarse model, :class:`model_zoo.soft_intro.RA`), ``inpainter`` (AOT-GAN generator G) and
``discriminator`` (spectral-norm patch discriminator). With ``coarse_checkpoint`` the coarse model is instead a
finished RA run, loaded strictly and frozen (``model_zoo/stages.py``: eval mode, no gradient, path and SHA-256 in the
provenance), and only the last two groups train. Per batch, after RA's encoder and decoder steps (or, frozen, one
sampled reconstruction ``D(z)``, z from ``E(x)``):

1. ``m_syn``: per image ``n_ellipses`` filled ellipses (centres uniform in the middle half, semi-axes
   ``int(max(|N(2, 4)|, 2))`` scaled with the image size, any angle), drawn from the global RNG.
2. ``m_res``: ``|C(x_r) - C(x)| > 0.2`` per image (C = CLAHE, x_r = the decoder step's reconstruction), 8-connected
   components larger than 5 px kept (scipy on the CPU: the one host round trip), ``G_1.2 > 0.5``;
   ``m = clip(m_res + m_syn, 0, 1)``.
3. ``x_p = G(x (1 - m) + m, m)``, ``x_c = (1 - m) x + m x_p``;
   ``L_G = L1(x_p, x) + style_weight Style + perceptual_weight Perc`` (VGG19; L1 only without VGG19 weights),
   plus, with ``use_gen_adv``, ``adversarial_weight * mean(m_syn (Dis(x_c) - 1)^2) / mean(m_syn)``;
   ``L_Dis = MSE(Dis(x_c.detach()), blur(m_syn)) + MSE(Dis(x), 0)`` with the logits upsampled bilinearly to the
   image and ``blur`` a zero-padded Gaussian (``disc_blur_kernel``, ``disc_blur_sigma``).

Test map (per image, deterministic, z = mu): ``x0 = D(mu)``; ``r = |C(x0) - C(x)|`` divided by its per-image
95th percentile and capped at 1; ``a = r * G_2(LPIPS(x0, x))``; mask ``m``; ``x_f = (1 - m) x + m clamp(G(x (1 - m) +
m, m), 0, 1)``; map ``|x - x_f| * G_2(LPIPS(x_f, x))``, score its mean. Extras: ``coarse``, ``mask``, ``residual``.
Validation: ``phanes_val`` = (MSE(x_f, x) + MSE(x0, x)) / 2 through that pipeline.

The study's recipe (the defaults; the authors' standalone PHANES code does the same three things, so they produced
the study's numbers and are not slips of its port), each with a labelled alternative:

* ``e_step_detach: true``: the encoder step detaches the re-reconstructions ``x_rr``, ``x_ff`` (no gradient through
  the re-encoding into expELBO); ``false`` keeps it, as SI-VAE and RA.
* ``use_gen_adv: false``: no generator adversarial term (the study computed it and never back-propagated it);
  ``true`` adds it with ``adversarial_weight``, weighted by the synthetic mask as AOT-GAN intends.
* ``mask_filter: soft``: values of ``a`` above the per-image ``mask_quantile`` are set to 1, the rest kept, then
  ``G_1.2(.) > 0.1``; ``binary``: ``G_1.2(1[a > q95(a)]) > 0.1``. The binary mask has an inverted-area effect (a
  compact lesion dilates into a smaller mask than scattered healthy residuals), which the soft one avoids.

:meth:`PHANES.inference_label` names the recipe in use (manifest, wandb config, report).

Fixed predecessor bugs: every statistic (quantiles, CLAHE, blur) is per image, the inpainter ends in a sigmoid (the
reference's tanh put [-1,1] outputs against [0,1] data; not kept), nothing is tied to CUDA, the generator's
adversarial mask weighting is not a no-op. The VGG19 is built only when its weights are > 0, and like LPIPS is never
part of the state dict or an optimizer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from data.batch import Batch
from model_zoo import filters
from model_zoo.base import AnomalyOutput, StepContext
from model_zoo.saliency import gaussian_blur
from model_zoo.soft_intro import RA
from model_zoo.stages import keep_frozen_in_eval, load_frozen_stage
from optim.losses.vgg19 import Backend as VGGBackend
from optim.losses.vgg19 import build_vgg19_losses

logger = logging.getLogger(__name__)

MaskFilter = Literal["soft", "binary"]


# ------------------------------------------------------------------------------------------------ networks
class AOTBlock(nn.Module):
    """Aggregated contextual transformation: four dilated branches, fused, mixed with x through a learned gate."""

    def __init__(self, dim: int, rates: Sequence[int]) -> None:
        super().__init__()
        if dim % len(rates):
            raise ValueError(f"AOT width {dim} must be divisible by the number of rates {len(rates)}")
        self.branches = nn.ModuleList(
            nn.Sequential(nn.ReflectionPad2d(r), nn.Conv2d(dim, dim // len(rates), 3, dilation=r), nn.ReLU())
            for r in rates)
        self.fuse = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))
        self.gate = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3))

    def forward(self, x: Tensor) -> Tensor:
        fused = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        g = self.gate(x)
        mean, std = g.mean(dim=(2, 3), keepdim=True), g.std(dim=(2, 3), keepdim=True)
        g = torch.sigmoid(5 * (2 * (g - mean) / (std + 1e-9) - 1))
        return x * (1 - g) + fused * g


class InpaintGenerator(nn.Module):
    """AOT-GAN generator: (masked image, mask) [B,2,S,S] -> inpainting [B,1,S,S] in [0,1] (sigmoid)."""

    def __init__(self, *, channels: Sequence[int], n_blocks: int, rates: Sequence[int]) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.encoder = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(2, c0, 7), nn.ReLU(),
                                     nn.Conv2d(c0, c1, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU())
        self.middle = nn.Sequential(*(AOTBlock(c2, rates) for _ in range(n_blocks)))
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                     nn.Conv2d(c2, c1, 3, padding=1), nn.ReLU(),
                                     nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                     nn.Conv2d(c1, c0, 3, padding=1), nn.ReLU(), nn.Conv2d(c0, 1, 3, padding=1),
                                     nn.Sigmoid())
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.decoder(self.middle(self.encoder(torch.cat([x, mask], dim=1))))


class PatchDiscriminator(nn.Module):
    """Spectral-norm patch critic: [B,1,S,S] -> logits [B,1,h,w] (14x14 at 128 with the reference widths)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for index, c_out in enumerate(channels):
            stride = 2 if index < len(channels) - 1 else 1
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False)),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


# ------------------------------------------------------------------------------------------------ masks
def ellipse_masks(batch: int, size: int, n_ellipses: int, *, device: torch.device,
                  generator: torch.Generator | None = None) -> Tensor:
    """Per image, the union of ``n_ellipses`` filled random ellipses: [B,1,S,S] in {0,1}.

    Centres uniform in [S/4, 3S/4), semi-axes ``int(max(|N(2, 4)|, 2)) * S / 128`` px (the reference's 2-8 px at
    128), angle uniform in [0, pi). Drawn from ``generator`` (the global RNG when None), on ``device``.
    """
    shape = (batch, n_ellipses, 1, 1)
    draw = {"generator": generator, "device": device}
    centre_y = torch.randint(size // 4, 3 * size // 4, shape, **draw).float()
    centre_x = torch.randint(size // 4, 3 * size // 4, shape, **draw).float()
    scale = size / 128
    axes = (2 + 4 * torch.randn((batch, n_ellipses, 2, 1, 1), **draw)).abs().clamp(min=2).floor() * scale
    angle = torch.rand(shape, **draw) * math.pi
    coords = torch.arange(size, device=device, dtype=torch.float32)
    dy, dx = coords.view(1, 1, -1, 1) - centre_y, coords.view(1, 1, 1, -1) - centre_x
    u = dx * angle.cos() + dy * angle.sin()
    v = -dx * angle.sin() + dy * angle.cos()
    inside = (u / axes[:, :, 0]).pow(2) + (v / axes[:, :, 1]).pow(2) <= 1
    return inside.any(dim=1, keepdim=True).float()


def residual_masks(residual: Tensor, *, threshold: float = 0.2, min_size: int = 6, sigma: float = 1.2) -> Tensor:
    """Training masks from a CLAHE residual: binarise, keep 8-connected components of >= ``min_size`` px, blur, > 0.5.

    Runs ``scipy.ndimage.label`` per image on the CPU (non-differentiable; the tensors come back to the input's
    device).

    Args:
        residual: [B,1,H,W] >= 0.

    Returns:
        [B,1,H,W] in {0,1} on ``residual.device``.
    """
    binary = (residual > threshold).squeeze(1).cpu().numpy()
    kept = np.zeros_like(binary)
    for index, image in enumerate(binary):
        labels, _ = ndimage.label(image, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())
        large = sizes >= min_size
        large[0] = False
        kept[index] = large[labels]
    mask = torch.from_numpy(kept).to(residual.device, torch.float32).unsqueeze(1)
    return (gaussian_blur(mask, sigma) > 0.5).float()


def zero_padded_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Gaussian blur with an odd ``kernel_size`` kernel and zero borders (AOT-GAN's soft discriminator targets)."""
    return filters.gaussian_blur(x, sigma, border="zeros", radius=kernel_size // 2)


# ------------------------------------------------------------------------------------------------ model
class PHANES(RA):
    """RA coarse model + AOT-GAN inpainter + patch discriminator; four optimizer groups (two on a frozen RA).

    Args:
        inpaint_channels: the inpainter's three widths (reference ``[64, 128, 256]``).
        aot_blocks: number of AOT blocks (8); ``aot_rates``: their dilation rates (1, 2, 4, 8).
        disc_channels: discriminator widths (reference ``[64, 128, 256, 512]``).
        n_ellipses: synthetic ellipses per training mask (10).
        residual_threshold: CLAHE-residual binarisation of the training masks (0.2).
        style_weight, perceptual_weight: VGG19 terms of L_G (250, 0.1); both 0 = VGG19 never built.
        vgg_backend: ``'auto'`` (weights from ``vgg_weights_path``/``$TORCH_HOME``, else the terms are off and
            L_G is L1 only, recorded in the provenance), ``'torchvision'`` (the file is required) or ``'random'``
            (wiring tests only).
        vgg_weights_path: torchvision's ``vgg19-dcbb9e9a.pth``; None = the torch hub cache.
        use_gen_adv: add the generator's adversarial term (default false, the study's recipe).
        adversarial_weight: its weight (0.01).
        disc_blur_kernel, disc_blur_sigma: soft discriminator target (71, 10 at 128).
        mask_quantile: per-image quantile of the test mask (0.95); ``mask_sigma``: its dilation blur (1.2).
        mask_filter: ``'soft'`` (the study's) or ``'binary'`` test mask, see the module docstring.
        e_step_detach: detach the re-reconstructions in the encoder step (default true, the study's recipe).
        coarse_checkpoint: a finished RA run's checkpoint (``best.pt``/``latest.pt``; EMA weights when it has them)
            with the same coarse-model parameters: loaded strictly into the encoder and decoder, which are then
            frozen in eval mode; only the inpainter and the discriminator train. None = train all four jointly.
        Others: as :class:`~model_zoo.soft_intro.RA` (``perceptual`` is the LPIPS of the maps).
    """

    def __init__(self, *, inpaint_channels: Sequence[int] = (64, 128, 256), aot_blocks: int = 8,
                 aot_rates: Sequence[int] = (1, 2, 4, 8), disc_channels: Sequence[int] = (64, 128, 256, 512),
                 n_ellipses: int = 10, residual_threshold: float = 0.2, style_weight: float = 250.0,
                 perceptual_weight: float = 0.1, vgg_backend: VGGBackend = "auto", vgg_weights_path: str | None = None,
                 use_gen_adv: bool = False, adversarial_weight: float = 0.01, disc_blur_kernel: int = 71,
                 disc_blur_sigma: float = 10.0, mask_quantile: float = 0.95, mask_sigma: float = 1.2,
                 mask_filter: MaskFilter = "soft", e_step_detach: bool = True, coarse_checkpoint: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(inpaint_channels) != 3:
            raise ValueError(f"inpaint_channels={inpaint_channels!r} must hold three widths")
        if min(style_weight, perceptual_weight, adversarial_weight) < 0 or not 0 < mask_quantile < 1:
            raise ValueError("style_weight, perceptual_weight and adversarial_weight must be >= 0 and mask_quantile in "
                             f"(0, 1), got {style_weight}, {perceptual_weight}, {adversarial_weight}, {mask_quantile}")
        if disc_blur_kernel < 1 or disc_blur_kernel % 2 == 0:
            raise ValueError(f"disc_blur_kernel={disc_blur_kernel} must be a positive odd number")
        if mask_filter not in get_args(MaskFilter):
            raise ValueError(f"mask_filter={mask_filter!r} is not one of {', '.join(map(repr, get_args(MaskFilter)))}")
        middle = self.image_size // 4  # the inpainter's two stride-2 convolutions
        if not aot_rates or min(aot_rates) < 1 or max(aot_rates) >= middle:
            raise ValueError(f"aot_rates={list(aot_rates)!r}: every dilation must be in [1, {middle - 1}], below the "
                             f"inpainter's {middle}x{middle} middle (image_size {self.image_size} / 4), which its "
                             "reflection padding needs")
        self.inpainter = InpaintGenerator(channels=inpaint_channels, n_blocks=aot_blocks, rates=aot_rates)
        self.discriminator = PatchDiscriminator(disc_channels)
        self.n_ellipses, self.residual_threshold = n_ellipses, residual_threshold
        self.style_weight, self.perceptual_weight = style_weight, perceptual_weight
        self.vgg_backend, self.vgg_weights_path = vgg_backend, vgg_weights_path
        self.use_gen_adv, self.adversarial_weight = use_gen_adv, adversarial_weight
        self.disc_blur_kernel, self.disc_blur_sigma = disc_blur_kernel, disc_blur_sigma
        self.mask_quantile, self.mask_sigma, self.mask_filter = mask_quantile, mask_sigma, mask_filter
        self.detach_rereconstructions = e_step_detach
        self._vgg: Any = None
        self._vgg_state = "not built" if style_weight or perceptual_weight else "off (weights 0)"
        self.stage1: dict[str, Any] = {}
        if coarse_checkpoint is not None:
            self.stage1 = load_frozen_stage({"encoder": self.encoder, "decoder": self.decoder}, coarse_checkpoint,
                                            stage_name="RA")
            self.train()

    @property
    def coarse_frozen(self) -> bool:
        """True when the coarse RA came from ``coarse_checkpoint`` (frozen, eval mode)."""
        return bool(self.stage1)

    def train(self, mode: bool = True) -> PHANES:
        """Train/eval mode; a frozen coarse RA always stays in eval mode."""
        super().train(mode)
        if self.coarse_frozen:
            keep_frozen_in_eval(self.encoder, self.decoder)
        return self

    def inference_label(self) -> str:
        """The recipe in use: mask filter, encoder-step detach, generator adversarial term, coarse model."""
        study = " (the study's)"
        other = " (not the study's)"
        mask = (f"soft test mask (a > q{self.mask_quantile:g} set to 1, G_{self.mask_sigma:g} > 0.1){study}"
                if self.mask_filter == "soft" else
                f"binary test mask (G_{self.mask_sigma:g}(a > q{self.mask_quantile:g}) > 0.1){other}")
        detach = ("encoder step detaches the re-reconstructions" + study if self.detach_rereconstructions
                  else "encoder step keeps the gradient through the re-reconstructions" + other)
        adv = (f"generator adversarial term on (weight {self.adversarial_weight:g}){other}" if self.use_gen_adv
               else "no generator adversarial term" + study)
        coarse = (f"coarse RA frozen from {self.stage1['path']}" if self.coarse_frozen
                  else "coarse RA trained jointly (the study's)")
        return f"PHANES: {mask}; {detach}; {adv}; {coarse}"

    # ------------------------------------------------------------------------------------------ extras
    def _vgg_losses(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(style, perceptual) VGG19 distances, zeros when the terms are off or no weights were found."""
        zero = a.new_zeros(())
        if not (self.style_weight or self.perceptual_weight):
            return zero, zero
        if self._vgg_state == "not built":
            # a plain attribute, not a submodule: never in the state dict, parameters() or an optimizer
            object.__setattr__(self, "_vgg", build_vgg19_losses(backend=self.vgg_backend,
                                                                weights_path=self.vgg_weights_path))
            if self._vgg is None:
                self._vgg_state = "unavailable: no VGG19 weights, style and perceptual terms off (L_G = L1 + adv)"
                logger.warning("PHANES VGG19 %s", self._vgg_state)
            else:
                self._vgg_state = self._vgg.backend_name
        if self._vgg is None:
            return zero, zero
        self._vgg.to(a.device)
        return self._vgg(a, b)

    def provenance(self) -> dict[str, Any]:
        stage1 = {"stage1_ra": dict(self.stage1)} if self.coarse_frozen else {}
        return {**super().provenance(), "vgg19": self._vgg_state, **stage1}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        coarse = {} if self.coarse_frozen else super().optimizer_groups()
        return {**coarse, "inpainter": list(self.inpainter.parameters()),
                "discriminator": list(self.discriminator.parameters())}

    # ------------------------------------------------------------------------------------------ training
    def _training_masks(self, x: Tensor, x_r: Tensor) -> tuple[Tensor, Tensor]:
        """(m_syn, m): synthetic ellipses and their union with the residual masks, [B,1,S,S] in {0,1}."""
        m_syn = ellipse_masks(x.shape[0], x.shape[-1], self.n_ellipses, device=x.device)
        residual = (self.clahe(x_r.detach().clamp(0, 1)) - self.clahe(x)).abs()
        m_res = residual_masks(residual, threshold=self.residual_threshold)
        return m_syn, (m_res + m_syn).clamp(0, 1)

    def _disc_logits(self, x: Tensor) -> Tensor:
        return F.interpolate(self.discriminator(x), size=x.shape[-2:], mode="bilinear", align_corners=True)

    def _inpainter_losses(self, x: Tensor, m_syn: Tensor, m: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x_p = self.inpainter(x * (1 - m) + m, m)
        x_c = (1 - m) * x + m * x_p
        style, perceptual = self._vgg_losses(x_p, x)
        l1 = F.l1_loss(x_p, x)
        generator_loss = l1 + self.style_weight * style + self.perceptual_weight * perceptual
        terms = {"inpaint_l1": l1.detach(), "style": style.detach(), "perceptual": perceptual.detach()}
        if self.use_gen_adv:
            weighted = (m_syn * (self._disc_logits(x_c) - 1).pow(2)).mean() / m_syn.mean().clamp(min=1e-8)
            generator_loss = generator_loss + self.adversarial_weight * weighted
            terms["generator_adv"] = weighted.detach()
        return generator_loss, x_c, terms

    def _discriminator_loss(self, x: Tensor, x_c: Tensor, m_syn: Tensor) -> Tensor:
        target = zero_padded_blur(m_syn, self.disc_blur_kernel, self.disc_blur_sigma)
        fake, real = self._disc_logits(x_c.detach()), self._disc_logits(x)
        return F.mse_loss(fake, target) + F.mse_loss(real, torch.zeros_like(real))

    def _frozen_reconstruction(self, x: Tensor) -> Tensor:
        """D(z), z sampled from E(x), of the frozen coarse RA: [B,1,S,S] in [0,1], no graph."""
        with torch.no_grad():
            mu, logvar, _ = self.encode(x)
            return self.decoder(self.sample(mu, logvar))

    @property
    def warmup_steps(self) -> int:
        """The coarse RA's plain-VAE warm-up; none on a frozen, finished RA (``coarse_checkpoint``)."""
        return 0 if self.coarse_frozen else self.vae_warmup_steps

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """RA's encoder and decoder steps (none on a frozen RA), then the inpainter and discriminator steps on the
        same batch."""
        x = batch.image
        if self.coarse_frozen:
            terms, x_r = {}, self._frozen_reconstruction(x)
        else:
            terms, x_r = self._intro_steps(x, ctx)
        m_syn, m = self._training_masks(x, x_r)
        with ctx.frozen_except("inpainter"), ctx.autocast():
            generator_loss, x_c, inpaint_terms = self._inpainter_losses(x, m_syn, m)
        with ctx.frozen_except("discriminator"), ctx.autocast():
            discriminator_loss = self._discriminator_loss(x, x_c, m_syn)
        ctx.backward_step("inpainter", generator_loss)
        ctx.backward_step("discriminator", discriminator_loss)
        return {**terms, "inpainter_loss": generator_loss.detach(), **inpaint_terms,
                "discriminator_loss": discriminator_loss.detach(), "mask_fraction": m.mean().detach()}

    # ------------------------------------------------------------------------------------------ inference
    def _quantile(self, a: Tensor) -> Tensor:
        return torch.quantile(a.flatten(1).float(), self.mask_quantile, dim=1).view(-1, 1, 1, 1)

    def test_mask(self, a: Tensor) -> Tensor:
        """The inpainting mask of a saliency-weighted residual a: [B,1,S,S] in [0,1] -> [B,1,S,S] in {0,1}, per image.

        ``soft`` (the study's): ``G(a with values above q(a) set to 1) > 0.1``; ``binary``: ``G(1[a > q(a)]) > 0.1``
        (q = the per-image ``mask_quantile``, G = Gaussian of ``mask_sigma``).
        """
        above = a > self._quantile(a)
        if self.mask_filter == "soft":  # the map itself, saturated above the quantile
            return (gaussian_blur(torch.where(above, torch.ones_like(a), a), self.mask_sigma) > 0.1).float()
        return (gaussian_blur(above.float(), self.mask_sigma) > 0.1).float()

    def pipeline(self, x: Tensor) -> dict[str, Tensor]:
        """Coarse reconstruction, residual, mask, inpainting and map of x: [B,1,S,S] in [0,1]; all per image."""
        x0 = self.reconstruct(x).clamp(0, 1)
        r = (self.clahe(x0) - self.clahe(x)).abs()
        r = (r / (self._quantile(r) + 1e-8)).clamp(max=1)
        a = r * gaussian_blur(self.perceptual.spatial(x0, x), self.saliency_sigma).clamp(min=0)
        mask = self.test_mask(a)
        x_p = self.inpainter(x * (1 - mask) + mask, mask).clamp(0, 1)
        x_f = (1 - mask) * x + mask * x_p
        saliency = gaussian_blur(self.perceptual.spatial(x_f, x), self.saliency_sigma).clamp(min=0)
        return {"coarse": x0, "residual": a, "mask": mask, "final": x_f, "map": (x - x_f).abs() * saliency}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Deterministic PHANES map of x: [B,1,S,S] in [0,1] (``generator`` unused).

        Returns:
            ``anomaly_map`` [B,1,S,S] >= 0, ``anomaly_score`` its mean [B], ``reconstruction`` the pseudo-healthy
            x_f in [0,1]; extras ``coarse`` [B,1,S,S] in [0,1], ``mask`` in {0,1}, ``residual`` in [0,1].
        """
        out = self.pipeline(x)
        return AnomalyOutput(anomaly_map=out["map"], anomaly_score=out["map"].mean(dim=(1, 2, 3)),
                             reconstruction=out["final"],
                             extras={"coarse": out["coarse"], "mask": out["mask"], "residual": out["residual"]})

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``phanes_val`` = (MSE(x_f, x) + MSE(x0, x)) / 2, and both parts."""
        out = self.pipeline(batch.image)
        final = (out["final"] - batch.image).pow(2).mean()
        coarse = (out["coarse"] - batch.image).pow(2).mean()
        return {"phanes_val": 0.5 * (final + coarse), "final_mse": final, "coarse_mse": coarse}
