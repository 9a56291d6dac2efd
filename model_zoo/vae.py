"""Variational autoencoder with a dense Gaussian latent (after Zimmerer et al. 2019, the reference study's VAE).

Architecture: ``len(channels)`` stride-2 4x4 convolutions (no normalisation by default, LeakyReLU), then one
convolution whose kernel covers the remaining ``image_size / 2**len(channels)`` map and outputs ``2 * latent_dim``
channels: the posterior mean ``mu`` and log-variance ``logvar`` ([B,latent_dim] each). The decoder mirrors it with
transposed convolutions and ends with a sigmoid, so reconstructions are in [0,1] (the reference had no output
activation).

Loss (per image, then the mean over the batch; the trainer sums the terms):
    ``recon``: ``'l2'``: 0.5 * sum of squared errors (the Gaussian negative log-likelihood with unit variance
    without its constant, as the reference's ``rec_log_std=0``); ``'l1'``: sum of absolute errors (Laplace, unit
    scale).
    ``kl``: ``beta * KL(N(mu, exp(logvar)) || N(0, I)) = -0.5 * beta * sum(1 + logvar - mu^2 - exp(logvar))``,
    computed once from the log-variance (the predecessor exponentiated the scale twice).

At test time ``z = mu`` (deterministic) unless ``sample_at_test`` is set, in which case ``z = mu + sigma * eps`` with
``eps`` drawn from the caller's ``torch.Generator`` (which must live on the input's device). Anomaly map:
``|x - x_rec|``; score: its mean.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.ae import Act, Norm, check_choice, make_act, make_norm
from model_zoo.base import AnomalyModel, AnomalyOutput

logger = logging.getLogger(__name__)

ReconLoss = Literal["l1", "l2"]


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image.

    Args:
        mu: [B,...] posterior means.
        logvar: [B,...] posterior log-variances (log sigma^2), same shape.

    Returns:
        [B] KL divergences (nats), summed over every latent dimension.
    """
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())
    return kl.flatten(1).sum(dim=1)


def encoder_bottom(channels: Sequence[int], *, latent_dim: int, in_channels: int, image_size: int) -> int:
    """Side of the feature map after ``len(channels)`` stride-2 stages; checks the sizes fit.

    Raises:
        ValueError: a non-positive size, empty ``channels``, or ``image_size`` not a multiple of 2**len(channels).
    """
    if not channels or min(channels) < 1 or latent_dim < 1 or in_channels < 1:
        raise ValueError(f"channels={list(channels)!r}, latent_dim={latent_dim} and in_channels={in_channels} must "
                         "be positive (channels non-empty)")
    bottom = image_size // 2 ** len(channels)
    if bottom < 1 or bottom * 2 ** len(channels) != image_size:
        raise ValueError(f"image_size={image_size} must be a positive multiple of 2**len(channels) = "
                         f"{2 ** len(channels)} (channels={list(channels)!r})")
    return bottom


class VAE(AnomalyModel):
    """Convolutional VAE with a dense latent vector.

    Args:
        in_channels: image channels.
        image_size: square input size the model is built for (the dense latent fixes it); divisible by
            ``2 ** len(channels)``.
        channels: encoder widths, one stride-2 4x4 convolution each (decoder mirrors them).
        latent_dim: size of z.
        norm: ``'batch'``, ``'instance'``, ``'group'`` or ``'none'`` (the reference used none).
        act: ``'leakyrelu'`` (slope 0.2), ``'relu'`` or ``'silu'``.
        recon_loss: ``'l2'`` (0.5 * summed squared error) or ``'l1'`` (summed absolute error), per image.
        beta: weight of the KL term.
        sample_at_test: draw z from the posterior in :meth:`get_anomaly` (with the given generator) instead of
            using its mean.

    Raises:
        ValueError: inconsistent sizes, non-positive ``beta`` or an unknown option.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 128,
        channels: Sequence[int] = (16, 32, 64, 256, 256),
        latent_dim: int = 256,
        norm: Norm = "none",
        act: Act = "leakyrelu",
        recon_loss: ReconLoss = "l2",
        beta: float = 1.0,
        sample_at_test: bool = False,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, get_args(Norm))
        check_choice("act", act, get_args(Act))
        check_choice("recon_loss", recon_loss, get_args(ReconLoss))
        channels = list(channels)
        bottom = encoder_bottom(channels, latent_dim=latent_dim, in_channels=in_channels, image_size=image_size)
        if beta <= 0:
            raise ValueError(f"beta={beta} must be > 0")
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.recon_loss = recon_loss
        self.beta = float(beta)
        self.sample_at_test = sample_at_test

        widths = [in_channels, *channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), make_norm(norm, c_out), make_act(act)]
        encoder.append(nn.Conv2d(channels[-1], 2 * latent_dim, kernel_size=bottom))  # -> [B, 2Z, 1, 1]
        self.encoder = nn.Sequential(*encoder)

        up = list(reversed(channels))
        decoder: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, up[0], kernel_size=bottom), make_norm(norm, up[0]),
                                    make_act(act)]
        for c_in, c_out in zip(up[:-1], up[1:], strict=True):
            decoder += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), make_norm(norm, c_out), make_act(act)]
        decoder += [nn.ConvTranspose2d(up[-1], in_channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of x: [B,C,S,S] in [0,1] -> (mu, logvar), each [B,latent_dim]."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"VAE was built for {self.image_size}x{self.image_size} inputs (model.params.image_size), "
                             f"got input of shape {tuple(x.shape)}")
        mu, logvar = self.encoder(x).flatten(1).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Image of z: [B,latent_dim] -> [B,C,S,S] in [0,1]."""
        return self.decoder(z[:, :, None, None])

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'recon': ..., 'kl': beta * KL}``, each summed per image and averaged over the batch.

        ``z`` is drawn with the reparameterisation trick from the global RNG (seeded by the trainer).
        """
        x = batch.image
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        diff = self.decode(z) - x
        per_image = diff.abs() if self.recon_loss == "l1" else 0.5 * diff.pow(2)
        recon = per_image.flatten(1).sum(dim=1).mean()
        return {"recon": recon, "kl": self.beta * gaussian_kl(mu, logvar).mean()}

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I) (draws from ``generator``): [n,C,S,S] in [0,1]."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=next(self.parameters()).device)
        return self.decode(z)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual map of x: [B,1,S,S] in [0,1].

        Args:
            x: [B,1,S,S] in [0,1].
            generator: used only with ``sample_at_test``; must be on ``x.device``.

        Returns:
            ``anomaly_map`` |x - x_rec| [B,1,S,S] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction``
            [B,1,S,S] in [0,1].
        """
        mu, logvar = self.encode(x)
        z = mu
        if self.sample_at_test:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * (0.5 * logvar).exp()
        x_rec = self.decode(z)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)
