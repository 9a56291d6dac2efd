"""Soft-Intro VAE (Daniel & Tamar, 2021) and RA, the reversed autoencoder built on it (Bercea et al., 2023).

The methods: docs/methods.md#soft-intro-vae-si-vae and docs/methods.md#reversed-autoencoder-ra.

Two optimizer groups, ``encoder`` and ``decoder``; per batch (``training_step``),
with eps ~ N(0, I) drawn once, s = 1/(C H W), per-image sums over pixels and KL = -1/2 sum(1 + lv - mu^2 - e^lv):

* encoder step (decoder frozen by ``requires_grad``; both networks in the trainer's mode):
  ``x_f = D(eps)``; ``(mu, lv) = E(x)``, ``z`` sampled, ``x_r = D(z)``; re-encode ``x_r.detach()`` and
  ``x_f.detach()`` with sampling to ``x_rr``, ``x_ff``; ``e_r = sum (x_r - x_rr)^2`` (x_r *not* detached),
  ``e_f = sum (x_f - x_ff)^2``; ``expELBO_* = mean_b exp(-2 s (beta_rec e_* + beta_neg kl_*))``;
  ``L_E = s (beta_rec rec + beta_kl KL) + (expELBO_r + expELBO_f) / 4`` (RA adds ``embedding_weight * L_emb``).
* decoder step (encoder frozen), reusing eps and the encoder step's z (from before the encoder update):
  ``x_f = D(eps)``, ``x_r = D(z.detach())``; re-encode both (sampled) and decode the detached codes;
  ``L_D = s (beta_rec rec + beta_kl (KL_r + KL_f) / 2 + gamma_r beta_rec (r_r + r_f) / 2)``.

RA's ``L_emb`` = sum over the encoder's pooled feature levels of ``MSE(F_l(x), F_l(x_r)) / 2 + mean_b(1 - cos)``
with ``F(x_r)`` from the re-encoding pass of ``x_r.detach()`` (the reference ran the same encoder on the same
input once more, with the same output).

BatchNorm statistics: only the real passes of a batch, ``E(x)`` and its reconstruction ``D(z)`` in the encoder step,
update the running statistics that validation and test normalise with; every other pass (prior samples, re-encodings,
their decodings, the decoder step's repeat of ``D(z)``) runs inside :func:`model_zoo.batchnorm.keep_running_stats`
(batch statistics and gradients unchanged). The reference let all of them update the statistics, but it trained in
eval mode throughout (its base trainer called ``model.eval()`` in place), so its BatchNorm layers were a fixed affine
map of their initial running statistics; ``trainer.params.model_mode: reference`` reproduces that.

Anomaly maps (deterministic by default: z = mu; ``test_samples > 0`` averages that many sampled
reconstructions, drawn from the caller's generator): SI-VAE ``|x - x_hat|``; RA
``|C(x_hat) - C(x)| * G_2(LPIPS(x, x_hat)) * G_2(LPIPS(C(x_hat), C(x)))`` with C = per-image CLAHE and LPIPS the
spatial SqueezeNet distance (``perceptual: null`` switches the LPIPS factors off: "RA-noLPIPS"). Score = mean of
the map. Every operation is per image. Validation (``recon_mae``/``recon_mse``) reconstructs with z = mu.

Fixed predecessor bugs: schedulers step per epoch (the trainer), ResBlock projections compare widths by value
(the reference's ``is not`` added 1x1 projections to 512->512 blocks; no predecessor-checkpoint flag is kept),
the prior dimension follows ``zdim``, LPIPS is not a submodule, RA maps are [B,1,H,W] with per-image scores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.batch import Batch
from dl_utils.resample import working_size
from model_zoo.base import AnomalyModel, AnomalyOutput, StepContext
from model_zoo.batchnorm import keep_running_stats
from model_zoo.saliency import DEFAULT_LPIPS, SaliencyPerceptual, clahe, gaussian_blur
from model_zoo.vae import gaussian_kl
from optim.losses.perceptual import PerceptualSetting

logger = logging.getLogger(__name__)


class ResBlock(nn.Module):
    """conv3-BN-LReLU-conv3-BN plus identity (1x1 projection when the widths differ), then LeakyReLU(0.2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.main = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.LeakyReLU(0.2), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_out))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.main(x) + self.project(x))


class Encoder(nn.Module):
    """[B,1,S,S] -> (mu, logvar) [B,zdim] each, and the pooled features of every level."""

    def __init__(self, *, channels: Sequence[int], zdim: int, image_size: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 5, padding=2, bias=False), nn.BatchNorm2d(channels[0]),
                                  nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(ResBlock(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True))
        self.pool = nn.AvgPool2d(2)
        self.last = ResBlock(channels[-1], channels[-1])
        side = image_size // 2 ** len(channels)
        self.head = nn.Linear(channels[-1] * side**2, 2 * zdim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        h = self.pool(self.stem(x))
        features = [h]
        for block in self.blocks:
            h = self.pool(block(h))
            features.append(h)
        mu, logvar = self.head(self.last(h).flatten(1)).chunk(2, dim=1)
        return mu, logvar, features


class Decoder(nn.Module):
    """[B,zdim] -> [B,1,S,S] in [0,1] (sigmoid)."""

    def __init__(self, *, channels: Sequence[int], zdim: int, image_size: int) -> None:
        super().__init__()
        self.side = image_size // 2 ** len(channels)
        self.top = channels[-1]
        self.project = nn.Sequential(nn.Linear(zdim, channels[-1] * self.side**2), nn.ReLU())
        widths = [channels[-1], *reversed(channels)]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [ResBlock(a, b), nn.Upsample(scale_factor=2, mode="nearest")]
        layers += [ResBlock(channels[0], channels[0]), nn.Conv2d(channels[0], 1, 5, padding=2), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(z.shape[0], self.top, self.side, self.side))


def _sum_sq(a: Tensor, b: Tensor) -> Tensor:
    """Per-image sum of squared differences: [B,...] x2 -> [B]."""
    return (a - b).pow(2).flatten(1).sum(dim=1)


class SoftIntroVAE(AnomalyModel):
    """Soft-Intro VAE with separate encoder and decoder optimizers.

    Args:
        image_size: square input size, divisible by ``2 ** len(channels)``.
        channels: encoder widths; one average pooling per entry (reference ``[64, 128, 256, 512, 512]``: 4^2).
        zdim: latent size (reference 128).
        beta_kl, beta_rec, beta_neg: Soft-Intro weights (1, 0.5, 128 at 128^2; keep ``s * beta_neg`` when
            changing the image size).
        gamma_r: weight of the decoder's re-reconstruction term (1e-8).
        test_samples: 0 = reconstruct with z = mu at test time (deterministic); n > 0 = average the maps of n
            sampled reconstructions (draws from the caller's generator, in batch order).
        vae_warmup_steps: train the first this many batches as a plain VAE (the official Soft-Intro VAE's
            ``num_vae`` warm-up, counted in batches): an encoder step on ``s (beta_rec rec + beta_kl kl)``, then a
            decoder step on ``s beta_rec rec`` of D(z) with z from that encoder step (a subclass's extra encoder
            terms, e.g. RA's feature embedding, included); no introspective terms (logged as 0). About 4 network
            passes per batch instead of about 12. 0 (default, the reference) starts introspective at once.
    """

    def __init__(self, *, image_size: int = 128, channels: Sequence[int] = (64, 128, 256, 512, 512), zdim: int = 128,
                 beta_kl: float = 1.0, beta_rec: float = 0.5, beta_neg: float = 128.0, gamma_r: float = 1e-8,
                 test_samples: int = 0, vae_warmup_steps: int = 0) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1 or zdim < 1:
            raise ValueError(f"channels={channels!r} must be non-empty and positive, zdim={zdim} >= 1")
        side = image_size // 2 ** len(channels)
        if side < 1 or side * 2 ** len(channels) != image_size:
            raise ValueError(f"image_size={image_size} must be a multiple of 2**len(channels) = {2 ** len(channels)}")
        if isinstance(vae_warmup_steps, bool) or not isinstance(vae_warmup_steps, int) or vae_warmup_steps < 0:
            raise ValueError(f"vae_warmup_steps={vae_warmup_steps!r} must be an integer >= 0")
        if min(beta_kl, beta_rec, beta_neg) <= 0 or gamma_r < 0 or test_samples < 0:
            raise ValueError(f"beta_kl={beta_kl}, beta_rec={beta_rec}, beta_neg={beta_neg} must be > 0, "
                             f"gamma_r={gamma_r} and test_samples={test_samples} >= 0")
        self.image_size, self.zdim = image_size, zdim
        self.beta_kl, self.beta_rec, self.beta_neg, self.gamma_r = beta_kl, beta_rec, beta_neg, gamma_r
        self.scale = 1.0 / image_size**2
        self.test_samples = test_samples
        self.vae_warmup_steps = vae_warmup_steps
        self.detach_rereconstructions = False  # PHANES' recipe sets it (e_step_detach)
        self.encoder = Encoder(channels=channels, zdim=zdim, image_size=image_size)
        self.decoder = Decoder(channels=channels, zdim=zdim, image_size=image_size)

    # ------------------------------------------------------------------------------------------ pieces
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """x: [B,1,S,S] in [0,1] -> (mu, logvar) [B,zdim] and the pooled feature maps."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{type(self).__name__} was built for {self.image_size}x{self.image_size} inputs "
                             f"(model.params.image_size), got {tuple(x.shape)}")
        return self.encoder(x)

    @staticmethod
    def sample(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = mu + sigma * eta, eta from ``generator`` (global RNG when None)."""
        eta = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eta * (0.5 * logvar).exp()

    def _encoder_loss(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """L_E (plus the extra terms of subclasses), the sampled z of x, and the logged terms."""
        with self._not_real():
            x_f = self.decoder(eps)
        mu, logvar, features = self.encode(x)  # the real passes: E(x) and D(z)
        z = self.sample(mu, logvar)
        x_r = self.decoder(z)
        rec = _sum_sq(x_r, x).mean()
        kl = gaussian_kl(mu, logvar).mean()
        with self._not_real():
            mu_r, lv_r, features_r = self.encode(x_r.detach())
            mu_f, lv_f, _ = self.encode(x_f.detach())
            x_rr = self.decoder(self.sample(mu_r, lv_r))
            x_ff = self.decoder(self.sample(mu_f, lv_f))
        if self.detach_rereconstructions:  # PHANES' recipe: no gradient through the re-reconstructions
            x_rr, x_ff = x_rr.detach(), x_ff.detach()
        s = self.scale
        elbo_r = self.beta_rec * _sum_sq(x_r, x_rr) + self.beta_neg * gaussian_kl(mu_r, lv_r)
        elbo_f = self.beta_rec * _sum_sq(x_f, x_ff) + self.beta_neg * gaussian_kl(mu_f, lv_f)
        exp_r, exp_f = (-2 * s * elbo_r).exp().mean(), (-2 * s * elbo_f).exp().mean()
        loss = s * (self.beta_rec * rec + self.beta_kl * kl) + 0.25 * (exp_r + exp_f)
        terms = {"rec": rec.detach(), "kl": kl.detach(), "exp_elbo_real": exp_r.detach(),
                 "exp_elbo_fake": exp_f.detach()}
        extra = self._extra_encoder_terms(features, features_r)
        for name, value in extra.items():
            loss = loss + value
            terms[name] = value.detach()
        return loss, z, terms

    def _extra_encoder_terms(self, features: list[Tensor], features_r: list[Tensor]) -> dict[str, Tensor]:
        return {}

    def _not_real(self) -> contextlib.AbstractContextManager[None]:
        """Passes of anything but the batch's real images (and its one reconstruction D(z)) leave the BatchNorm
        running statistics of the encoder and decoder as they were."""
        return keep_running_stats(self.encoder, self.decoder)

    def _decoder_loss(self, x: Tensor, eps: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """L_D and the reconstruction D(z.detach()) [B,1,S,S] it used.

        No pass here updates BatchNorm statistics: D(z.detach()) repeats the encoder step's D(z) (same z, same decoder
        weights), every other pass is of a fake or a reconstruction.
        """
        with self._not_real():
            x_f = self.decoder(eps)
            x_r = self.decoder(z.detach())
            mu_r, lv_r, _ = self.encode(x_r)
            mu_f, lv_f, _ = self.encode(x_f)
            x_rr = self.decoder(self.sample(mu_r, lv_r).detach())
            x_ff = self.decoder(self.sample(mu_f, lv_f).detach())
        rec = _sum_sq(x_r, x).mean()
        kl = 0.5 * (gaussian_kl(mu_r, lv_r).mean() + gaussian_kl(mu_f, lv_f).mean())
        rerec = 0.5 * (_sum_sq(x_r.detach(), x_rr).mean() + _sum_sq(x_f.detach(), x_ff).mean())
        return self.scale * (self.beta_rec * rec + self.beta_kl * kl + self.gamma_r * self.beta_rec * rerec), x_r

    # ------------------------------------------------------------------------------------------ training
    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters())}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Encoder step (decoder frozen), then decoder step (encoder frozen) with the same eps and z."""
        return self._intro_steps(batch.image, ctx)[0]

    @property
    def warmup_steps(self) -> int:
        """The plain-VAE warm-up (``vae_warmup_steps``): validations during it never choose ``best.pt``."""
        return self.vae_warmup_steps

    def _intro_steps(self, x: Tensor, ctx: StepContext) -> tuple[dict[str, Tensor], Tensor]:
        """The encoder and decoder sub-steps of one batch (plain VAE ones during the warm-up); returns their logged
        terms and the reconstruction."""
        if ctx.step < self.vae_warmup_steps:
            return self._vae_steps(x, ctx)
        eps = torch.randn(x.shape[0], self.zdim, device=x.device)
        with ctx.frozen_except("encoder"), ctx.autocast():
            encoder_loss, z, terms = self._encoder_loss(x, eps)
        ctx.backward_step("encoder", encoder_loss)
        with ctx.frozen_except("decoder"), ctx.autocast():
            decoder_loss, x_r = self._decoder_loss(x, eps, z)
        ctx.backward_step("decoder", decoder_loss)
        return {"encoder_loss": encoder_loss.detach(), "decoder_loss": decoder_loss.detach(), **terms}, x_r

    def _vae_steps(self, x: Tensor, ctx: StepContext) -> tuple[dict[str, Tensor], Tensor]:
        """One warm-up batch: the ELBO's encoder step (decoder frozen), then its decoder step on D(z.detach())."""
        with ctx.frozen_except("encoder"), ctx.autocast():
            mu, logvar, features = self.encode(x)
            z = self.sample(mu, logvar)
            x_z = self.decoder(z)
            rec = _sum_sq(x_z, x).mean()
            kl = gaussian_kl(mu, logvar).mean()
            encoder_loss = self.scale * (self.beta_rec * rec + self.beta_kl * kl)
            with self._not_real():
                features_r = self.encode(x_z.detach())[2]
            extra = self._extra_encoder_terms(features, features_r)
            for value in extra.values():
                encoder_loss = encoder_loss + value
        ctx.backward_step("encoder", encoder_loss)
        with ctx.frozen_except("decoder"), ctx.autocast(), self._not_real():  # repeats the encoder step's D(z)
            x_r = self.decoder(z.detach())
            decoder_loss = self.scale * self.beta_rec * _sum_sq(x_r, x).mean()
        ctx.backward_step("decoder", decoder_loss)
        zero = torch.zeros((), device=x.device)  # the introspective terms are not computed in the warm-up
        return {"encoder_loss": encoder_loss.detach(), "decoder_loss": decoder_loss.detach(), "rec": rec.detach(),
                "kl": kl.detach(), "exp_elbo_real": zero, "exp_elbo_fake": zero,
                **{name: value.detach() for name, value in extra.items()}}, x_r

    # ------------------------------------------------------------------------------------------ inference
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None, *, sample: bool = False) -> Tensor:
        """x: [B,1,S,S] in [0,1] -> D(mu) (or D(z), z sampled from ``generator``) in [0,1]."""
        mu, logvar, _ = self.encode(x)
        return self.decoder(self.sample(mu, logvar, generator) if sample else mu)

    def residual_map(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """|x - x_hat| ([B,1,S,S] each in [0,1]); subclasses replace it."""
        return (x - x_hat).abs()

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I) (draws from ``generator``): [n,1,S,S] in [0,1]."""
        z = torch.randn(n, self.zdim, generator=generator, device=next(self.parameters()).device)
        return self.decoder(z)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Map and score of x: [B,1,S,S] in [0,1].

        Returns:
            ``anomaly_map`` [B,1,S,S] >= 0, ``anomaly_score`` its per-image mean [B], ``reconstruction`` [B,1,S,S]
            in [0,1] (the last one drawn when sampling).
        """
        if self.test_samples == 0:
            x_hat = self.reconstruct(x)
            anomaly_map = self.residual_map(x, x_hat)
        else:
            maps = []
            for _ in range(self.test_samples):
                x_hat = self.reconstruct(x, generator, sample=True)
                maps.append(self.residual_map(x, x_hat))
            anomaly_map = torch.stack(maps).mean(dim=0)
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_hat)

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``recon_mae``/``recon_mse`` of D(mu) (no perceptual network needed)."""
        diff = self.reconstruct(batch.image) - batch.image
        return {"recon_mae": diff.abs().mean(), "recon_mse": diff.pow(2).mean()}


class RA(SoftIntroVAE):
    """Reversed autoencoder: Soft-Intro VAE + a feature-embedding loss, CLAHE/LPIPS-weighted residual maps.

    Args:
        embedding_weight: weight of L_emb in the encoder loss (0.005, not scaled by s).
        perceptual: spatial perceptual network block (default LPIPS-SqueezeNet, official weights from
            ``weights_path``/``$TORCH_HOME`` or else ST-LPIPS, see ``optim/losses/perceptual.py``); null = off.
        saliency_sigma: Gaussian sigma of the LPIPS maps (2).
        clahe_clip_limit: CLAHE clip limit (0.01).
        clahe_size: None (default): CLAHE on the images as given. An int S: on the images resized to S x S and back
            (:func:`model_zoo.saliency.clahe`), so that small slices are equalised as the study's 128x128 ones were.
        Others: as :class:`SoftIntroVAE`.
    """

    def __init__(self, *, embedding_weight: float = 0.005, perceptual: PerceptualSetting | None = DEFAULT_LPIPS,
                 saliency_sigma: float = 2.0, clahe_clip_limit: float = 0.01, clahe_size: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedding_weight < 0 or saliency_sigma < 0 or clahe_clip_limit <= 0:
            raise ValueError(f"embedding_weight={embedding_weight} and saliency_sigma={saliency_sigma} must be >= 0, "
                             f"clahe_clip_limit={clahe_clip_limit} > 0")
        self.embedding_weight, self.saliency_sigma, self.clahe_clip_limit = (embedding_weight, saliency_sigma,
                                                                             clahe_clip_limit)
        self.clahe_size = working_size(clahe_size, name="clahe_size", minimum=8, multiple=8)  # CLAHE's 8 x 8 tiles
        self.perceptual = SaliencyPerceptual(perceptual, "model.params.perceptual")

    def _extra_encoder_terms(self, features: list[Tensor], features_r: list[Tensor]) -> dict[str, Tensor]:
        total = features[0].new_zeros(())
        for f, f_r in zip(features, features_r, strict=True):
            cosine = F.cosine_similarity(f.flatten(1), f_r.flatten(1), dim=1)
            total = total + 0.5 * F.mse_loss(f, f_r) + (1.0 - cosine).mean()
        return {"embedding": self.embedding_weight * total}

    def clahe(self, x: Tensor) -> Tensor:
        """C(x): the method's CLAHE of x: [B,1,S,S] (clip limit ``clahe_clip_limit``, at ``clahe_size``), in [0,1]."""
        return clahe(x, clip_limit=self.clahe_clip_limit, size=self.clahe_size)

    def residual_map(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """``|C(x_hat) - C(x)| * G(LPIPS(x, x_hat)) * G(LPIPS(C(x_hat), C(x)))``, per image, [B,1,S,S] >= 0."""
        x, x_hat = x.clamp(0, 1), x_hat.clamp(0, 1)
        c_x, c_hat = self.clahe(x), self.clahe(x_hat)
        saliency = gaussian_blur(self.perceptual.spatial(x, x_hat), self.saliency_sigma)
        saliency = saliency * gaussian_blur(self.perceptual.spatial(c_hat, c_x), self.saliency_sigma)
        return (c_hat - c_x).abs() * saliency.clamp(min=0)

    def provenance(self) -> dict[str, Any]:
        where = "on the input" if self.clahe_size is None else f"at {self.clahe_size}x{self.clahe_size}"
        return {"saliency_perceptual": self.perceptual.description,
                "clahe": f"clip limit {self.clahe_clip_limit:g}, 8x8 tiles, {where}"}
