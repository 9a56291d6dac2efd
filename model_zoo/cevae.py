"""Context-encoding VAE (ceVAE; Zimmerer et al. 2018/2019), docs/methods.md#context-encoding-vae-cevae.

Network (15.2 M parameters at the reference sizes): no normalisation, LeakyReLU(0.01), convolutions without
bias (MONAI ``blocks.Convolution``). Encoder: one stride-2 4x4 convolution per entry of ``channels``
(128 -> 8 with four), then a convolution whose kernel covers the remaining map and outputs ``2 * latent_dim``
channels: the posterior mean ``mu`` and log-variance ``logvar``. Decoder: a transposed convolution of that kernel
size back to the map, stride-2 4x4 transposed convolutions mirroring the encoder, and a final one to one channel
with a **linear** output.

Training (one optimizer step per batch): ``x_ce`` is x with one zeroed rectangle per image (side lengths drawn
uniformly from ``{box_size[0], ..., box_size[1] - 1}``, top-left corner uniformly from
``{box_size[0], ..., S - 2 - side}`` in each direction, as the predecessor's ``SyntheticRect``; drawn from the
global RNG, seeded by the trainer). Terms, each summed per image and averaged over the batch
(``loss_balance='elbo'``, Zimmerer's balance):

* ``recon``: 0.5 * SSE(Dec(z), x) with z = mu + sigma * eps (the Gaussian NLL with unit variance);
* ``ce``: ``ce_weight`` * 0.5 * SSE(Dec(mu(x_ce)), x), the context-encoding term (deterministic decode);
* ``kl``: ``kl_weight`` * KL(N(mu, sigma^2) || N(0, I)).

``loss_balance='predecessor'`` uses pixel-mean squared errors for ``recon`` and ``ce`` instead (the predecessor's
balance, where the summed KL weighs ~10^4 x more). The predecessor's parameterisation bug is fixed: the encoder
outputs log sigma^2, sigma = exp(logvar / 2) is used once. ``legacy_double_exp=True`` reproduces the bug for
fidelity: the second half is read as s, sampling uses sigma = e^s, and the KL is computed for sigma = exp(e^s).

Test: ``test_samples=0`` (default): z = mu, deterministic; ``test_samples=N``: the reconstruction is the mean of N
decoded posterior samples drawn from the caller's generator (the predecessor used one sample). The reconstruction
is clamped to [0,1] (the output layer is linear); A = |x - x_rec|, score = mean of A. The original ceVAE's
combination with the ELBO's input gradient is not implemented (it is not in the predecessor).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.ae import check_choice
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.vae import encoder_bottom, gaussian_kl

logger = logging.getLogger(__name__)

LossBalance = Literal["elbo", "predecessor"]
_ACT = ("LEAKYRELU", {"negative_slope": 0.01})


def _conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, *, transposed: bool = False,
          act: bool = True) -> Convolution:
    return Convolution(spatial_dims=2, in_channels=c_in, out_channels=c_out, kernel_size=kernel, strides=stride,
                       padding=padding, bias=False, norm=None, act=_ACT if act else None, is_transposed=transposed,
                       output_padding=0 if transposed else None, conv_only=not act)


def erase_random_boxes(x: Tensor, *, min_size: int, max_size: int, generator: torch.Generator | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Zero one random axis-aligned rectangle per image (the ceVAE corruption).

    Args:
        x: [B,C,H,W].
        min_size, max_size: side lengths are drawn from {min_size, ..., max_size - 1} per axis; the top-left
            corner from {min_size, ..., H - 2 - side} (rows) and {min_size, ..., W - 2 - side} (columns).
        generator: source of the draws (on x.device); None = global RNG.

    Returns:
        (x with the rectangle zeroed [B,C,H,W], the rectangle mask [B,1,H,W] with 1 inside).
    """
    b, _, h, w = x.shape
    device = x.device

    def draw(extent: int) -> tuple[Tensor, Tensor]:
        side = torch.randint(min_size, max_size, (b,), generator=generator, device=device)
        n_starts = extent - 1 - side - min_size  # number of admissible corners: {min_size, ..., extent - 2 - side}
        u = torch.rand((b,), generator=generator, device=device)
        start = min_size + (u * n_starts).floor().long()
        return start, side

    r0, hr = draw(h)
    c0, wr = draw(w)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_rows = (rows >= r0[:, None]) & (rows < (r0 + hr)[:, None])  # [B,H]
    in_cols = (cols >= c0[:, None]) & (cols < (c0 + wr)[:, None])  # [B,W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(x.dtype)
    return x * (1 - mask), mask


class CeVAE(AnomalyModel):
    """Context-encoding VAE with a dense latent.

    Args:
        in_channels: image channels.
        image_size: square input size (the dense latent fixes it); divisible by ``2 ** len(channels)``.
        channels: encoder widths, one stride-2 4x4 convolution each (reference 16/64/256/256).
        latent_dim: size of z (256).
        box_size: (min, max) side of the erased rectangle, max exclusive (reference (25, 50) at 128x128).
        kl_weight: weight of the KL term.
        ce_weight: weight of the context-encoding term.
        loss_balance: ``'elbo'`` (per-image sums) or ``'predecessor'`` (pixel-mean reconstruction errors).
        legacy_double_exp: reproduce the predecessor's double exponentiation of sigma (fidelity only).
        test_samples: 0 = decode z = mu at test time; N > 0 = average N posterior samples from the generator.

    Raises:
        ValueError: inconsistent sizes, boxes that do not fit, negative weights or an unknown option.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 128,
        channels: Sequence[int] = (16, 64, 256, 256),
        latent_dim: int = 256,
        box_size: Sequence[int] = (25, 50),
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
        loss_balance: LossBalance = "elbo",
        legacy_double_exp: bool = False,
        test_samples: int = 0,
    ) -> None:
        super().__init__()
        check_choice("loss_balance", loss_balance, get_args(LossBalance))
        channels = list(channels)
        bottom = encoder_bottom(channels, latent_dim=latent_dim, in_channels=in_channels, image_size=image_size)
        box_min, box_max = (int(v) for v in box_size)
        if not 1 <= box_min < box_max or image_size - 1 - (box_max - 1) - box_min < 1:
            raise ValueError(f"box_size={list(box_size)!r} must be (min, max) with 1 <= min < max and leave room for "
                             f"a corner in [min, image_size - 2 - side] (image_size={image_size})")
        if kl_weight < 0 or ce_weight < 0 or test_samples < 0:
            raise ValueError(f"kl_weight={kl_weight}, ce_weight={ce_weight} and test_samples={test_samples} "
                             "must be >= 0")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.box_min, self.box_max = box_min, box_max
        self.kl_weight, self.ce_weight = float(kl_weight), float(ce_weight)
        self.loss_balance, self.legacy_double_exp, self.test_samples = loss_balance, legacy_double_exp, test_samples

        widths = [in_channels, *channels]
        encoder: list[nn.Module] = [_conv(a, b, 4, 2, 1) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        encoder.append(_conv(channels[-1], 2 * latent_dim, bottom, 1, 0, act=False))
        self.encoder = nn.Sequential(*encoder)
        up = list(reversed(channels))
        decoder: list[nn.Module] = [_conv(latent_dim, up[0], bottom, 1, 0, transposed=True)]
        decoder += [_conv(a, b, 4, 2, 1, transposed=True) for a, b in zip(up[:-1], up[1:], strict=True)]
        decoder.append(_conv(up[-1], in_channels, 4, 2, 1, transposed=True, act=False))
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of x: [B,C,S,S] -> (mu, second half) [B,latent_dim] each.

        The second half is log sigma^2, or s = log sigma of the sampling std with ``legacy_double_exp``.
        """
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"CeVAE was built for {self.image_size}x{self.image_size} inputs "
                             f"(model.params.image_size), got input of shape {tuple(x.shape)}")
        mu, second = self.encoder(x).flatten(1).chunk(2, dim=1)
        return mu, second

    def decode(self, z: Tensor) -> Tensor:
        """Image of z: [B,latent_dim] -> [B,C,S,S], linear output (not clamped)."""
        return self.decoder(z[:, :, None, None])

    def sampling_std(self, second: Tensor) -> Tensor:
        """Standard deviation used to sample z from the encoder's second half [B,latent_dim]."""
        return second.exp() if self.legacy_double_exp else (0.5 * second).exp()

    def kl(self, mu: Tensor, second: Tensor) -> Tensor:
        """[B] KL(N(mu, sigma^2) || N(0, I)) summed over the latent (sigma = exp(e^s) with ``legacy_double_exp``)."""
        logvar = 2.0 * second.exp() if self.legacy_double_exp else second
        return gaussian_kl(mu, logvar)

    def _reconstruction_error(self, x_rec: Tensor, x: Tensor) -> Tensor:
        sq = (x_rec - x).pow(2).flatten(1)
        return (0.5 * sq.sum(dim=1)).mean() if self.loss_balance == "elbo" else sq.mean()

    def _losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        mu, second = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * self.sampling_std(second)
        x_ce, _ = erase_random_boxes(x, min_size=self.box_min, max_size=self.box_max, generator=generator)
        mu_ce, _ = self.encode(x_ce)
        return {
            "recon": self._reconstruction_error(self.decode(z), x),
            "ce": self.ce_weight * self._reconstruction_error(self.decode(mu_ce), x),
            "kl": self.kl_weight * self.kl(mu, second).mean(),
        }

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'recon', 'ce', 'kl'}`` for x = ``batch.image`` [B,1,S,S] in [0,1] (see the module docstring).

        z and the rectangles are drawn from the global RNG (seeded by the trainer).
        """
        return self._losses(batch.image, None)

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``'total'``: the training loss (z and rectangles from ``generator``), plus the test-time MAE and MSE."""
        terms = self._losses(batch.image, generator)
        return {"total": sum(terms.values()), **super().validation_losses(batch, generator=generator)}

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I) (draws from ``generator``), clamped: [n,C,S,S] in [0,1]."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=next(self.parameters()).device)
        return self.decode(z).clamp(0.0, 1.0)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual map of x: [B,1,S,S] in [0,1].

        Args:
            x: [B,1,S,S] in [0,1].
            generator: used only with ``test_samples > 0``; must be on ``x.device``. The draws ([B, N, latent])
                do not depend on the images' content, so an image's map does not depend on the other images.

        Returns:
            ``anomaly_map`` |x - x_rec| [B,1,S,S] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction``.
        """
        mu, second = self.encode(x)
        if self.test_samples == 0:
            x_rec = self.decode(mu)
        else:
            b, n = mu.shape[0], self.test_samples
            eps = torch.randn((b, n, self.latent_dim), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu[:, None] + eps * self.sampling_std(second)[:, None]
            x_rec = self.decode(z.flatten(0, 1)).unflatten(0, (b, n)).mean(dim=1)
        x_rec = x_rec.clamp(0, 1)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)
