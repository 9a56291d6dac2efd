"""f-AnoGAN (Schlegl et al., 2019): a WGAN-GP (stage 1), then an izi_f encoder into its frozen latent space (stage 2).

The method: docs/methods.md#f-anogan. Networks (after the PyTorch-GAN port the reference study used):

* generator G: Linear ``latent -> generator_channels[0] * s0^2`` (s0 = image_size / 2^(n-1)), BN, then per further
  width: nearest x2, conv3, BN, LeakyReLU(0.2); conv3 to 1 channel and the output activation.
* critic D: per ``critic_channels`` width: conv3 stride 2, LeakyReLU(0.2), Dropout2d(0.25), BN (none in the first
  block); flattened trunk output = the feature vector f(x); Linear -> 1 score.
* encoder E: a critic trunk of its own, Linear -> latent, tanh (as the reference; ``encoder_output='linear'``
  drops it).

Choices where the reference is buggy (docs/methods.md#f-anogan):

* BatchNorm: the reference passes 0.8 positionally, i.e. ``eps=0.8``; by default this uses eps 1e-5 with the
  Keras momentum 0.8 the port meant (PyTorch ``momentum=0.2``); ``legacy_bn_eps=True`` restores eps 0.8.
* Output range: with ``output='tanh'`` (default) the GAN works on images mapped to [-1,1] (``2x - 1``) and maps
  back for the anomaly map; ``'sigmoid'`` works on [0,1] directly. All losses are computed in the GAN's range.
* Stage 2 keeps G and D frozen *in eval mode* (so did the reference, by accident: its trainer left every model in
  eval mode, see ``trainer.params.model_mode``).
* BatchNorm statistics (critic and generator): only the critic's pass of the real batch and the generator's first
  pass of the batch's z update the running statistics that stage 2 normalises with; the critic's passes of fakes and
  gradient-penalty interpolates and the generator step's repeat run inside
  :func:`model_zoo.batchnorm.keep_running_stats` (batch statistics and gradients unchanged).

Anomaly map (stage 2): ``|x - x_hat|`` with ``x_hat = G(E(x))`` mapped to [0,1]; score: its mean
(``score_mode='residual'``) or the paper's izi_f score ``MSE(x_hat, x) + kappa * MSE(f(x_hat), f(x))`` per image
(``'izif'``). Deterministic and per image (eval-mode BN), so independent of batch composition.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.ae import check_choice
from model_zoo.base import AnomalyModel, AnomalyOutput, StepContext, TrainableModel
from model_zoo.batchnorm import keep_running_stats
from model_zoo.stages import keep_frozen_in_eval, load_frozen_stage
from optim.losses.adversarial import gradient_penalty

logger = logging.getLogger(__name__)

Output = Literal["tanh", "sigmoid"]
CriticNorm = Literal["batch", "none"]
EncoderOutput = Literal["tanh", "linear"]
ScoreMode = Literal["residual", "izif"]


def _bn(channels: int, legacy_bn_eps: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=0.8) if legacy_bn_eps else nn.BatchNorm2d(channels, momentum=0.2)


class Generator(nn.Module):
    """z: [B,latent] -> image [B,1,S,S] in [-1,1] (tanh) or [0,1] (sigmoid)."""

    def __init__(self, *, image_size: int, latent_dim: int, channels: Sequence[int], output: Output,
                 legacy_bn_eps: bool) -> None:
        super().__init__()
        channels = list(channels)
        self.start = image_size // 2 ** (len(channels) - 1)
        if self.start < 1 or self.start * 2 ** (len(channels) - 1) != image_size:
            raise ValueError(f"image_size={image_size} must be a multiple of 2**(len(generator_channels) - 1) = "
                             f"{2 ** (len(channels) - 1)}")
        self.c0 = channels[0]
        self.project = nn.Linear(latent_dim, channels[0] * self.start**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       _bn(c_out, legacy_bn_eps), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(channels[-1], 1, 3, padding=1), nn.Tanh() if output == "tanh" else nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(z.shape[0], self.c0, self.start, self.start))


class CriticTrunk(nn.Module):
    """Strided conv blocks: [B,1,S,S] -> flattened features [B, channels[-1] * (S / 2^n)^2]."""

    def __init__(self, *, channels: Sequence[int], norm: CriticNorm, legacy_bn_eps: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for index, c_out in enumerate(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Dropout2d(0.25)]
            if index > 0 and norm == "batch":
                layers.append(_bn(c_out, legacy_bn_eps))
            c_in = c_out
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)


class Critic(nn.Module):
    """WGAN critic: ``features(x)`` [B,F] and ``forward(x)`` [B] unbounded scores (higher = more real)."""

    def __init__(self, *, image_size: int, channels: Sequence[int], norm: CriticNorm, legacy_bn_eps: bool) -> None:
        super().__init__()
        self.trunk = CriticTrunk(channels=channels, norm=norm, legacy_bn_eps=legacy_bn_eps)
        side = image_size // 2 ** len(channels)
        if side < 1 or side * 2 ** len(channels) != image_size:
            raise ValueError(f"image_size={image_size} must be a multiple of 2**len(critic_channels) = "
                             f"{2 ** len(channels)}")
        self.head = nn.Linear(channels[-1] * side**2, 1)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).squeeze(1)


class _GANSpace(TrainableModel):
    """Shared architecture options and the [0,1] <-> GAN-range mapping of both stages."""

    def __init__(self, *, image_size: int, latent_dim: int, generator_channels: Sequence[int],
                 critic_channels: Sequence[int], critic_norm: CriticNorm, output: Output, legacy_bn_eps: bool) -> None:
        super().__init__()
        check_choice("output", output, ("tanh", "sigmoid"))
        check_choice("critic_norm", critic_norm, ("batch", "none"))
        if latent_dim < 1 or not generator_channels or not critic_channels:
            raise ValueError(f"latent_dim={latent_dim} must be >= 1 and generator_channels={generator_channels!r}, "
                             f"critic_channels={critic_channels!r} non-empty")
        self.image_size, self.latent_dim, self.output = image_size, latent_dim, output
        self.generator = Generator(image_size=image_size, latent_dim=latent_dim, channels=generator_channels,
                                   output=output, legacy_bn_eps=legacy_bn_eps)
        self.critic = Critic(image_size=image_size, channels=critic_channels, norm=critic_norm,
                             legacy_bn_eps=legacy_bn_eps)

    def to_gan(self, x: Tensor) -> Tensor:
        """[0,1] images -> the generator's range ([-1,1] for tanh)."""
        self._check_size(x)
        return 2.0 * x - 1.0 if self.output == "tanh" else x

    def from_gan(self, y: Tensor) -> Tensor:
        """The generator's range -> [0,1] (clamped)."""
        return ((y + 1.0) / 2.0 if self.output == "tanh" else y).clamp(0.0, 1.0)

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n generator images of z ~ N(0, I) (draws from ``generator``), mapped to [0,1]: [n,1,S,S]."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=next(self.parameters()).device)
        return self.from_gan(self.generator(z))

    def _check_size(self, x: Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{type(self).__name__} was built for {self.image_size}x{self.image_size} inputs "
                             f"(model.params.image_size), got {tuple(x.shape)}")


class WGANGP(_GANSpace):
    """Stage 1 of f-AnoGAN: a WGAN with gradient penalty; two optimizer groups, ``critic`` and ``generator``.

    Per batch (``training_step``): z ~ N(0, I); the critic step minimises
    ``-mean D(x) + mean D(G(z)) + lambda_gp * GP`` (GP in float32, double backward); on batches whose global index
    is a multiple of ``n_critic`` the generator step minimises ``-mean D(G(z))`` with the same z. Both networks
    train in the trainer's mode: in train mode (the default) the critic's dropout is active in every call, as in the
    paper's WGAN; the reference study trained in eval mode throughout (no dropout, BatchNorm a fixed affine map of
    its initial statistics), which ``trainer.params.model_mode: reference`` reproduces.

    This stage has no encoder, so it cannot score images: it is a :class:`~model_zoo.base.TrainableModel`, not an
    ``AnomalyModel`` (no ``get_anomaly``; the evaluation and prediction refuse it); train :class:`FAnoGAN` on its
    checkpoint. Validation reports ``wasserstein`` = mean D(x) - mean D(G(z')) (eval mode, z' from the
    validation generator), an estimate of the critic's Wasserstein distance; the reference's "best" selection
    was meaningless, so stage 2 takes stage 1's ``latest.pt``.

    Args:
        image_size: square input size; the generator and critic layouts depend on it.
        latent_dim: size of z.
        generator_channels: widths; ``[128, 128, 64]`` is the reference (32^2 -> 64^2 -> 128^2).
        critic_channels: widths of the stride-2 blocks; ``[16, 32, 64, 128]`` is the reference.
        critic_norm: ``'batch'`` (reference) or ``'none'`` (what WGAN-GP recommends).
        output: ``'tanh'`` (GAN on [-1,1] data) or ``'sigmoid'`` (GAN on [0,1] data).
        legacy_bn_eps: BatchNorm eps 0.8 as the reference (instead of eps 1e-5, momentum 0.2).
        lambda_gp: gradient-penalty weight (10).
        n_critic: the generator is updated on every ``n_critic``-th batch (5).
    """

    def __init__(self, *, image_size: int = 128, latent_dim: int = 128,
                 generator_channels: Sequence[int] = (128, 128, 64), critic_channels: Sequence[int] = (16, 32, 64, 128),
                 critic_norm: CriticNorm = "batch", output: Output = "tanh", legacy_bn_eps: bool = False,
                 lambda_gp: float = 10.0, n_critic: int = 5) -> None:
        super().__init__(image_size=image_size, latent_dim=latent_dim, generator_channels=generator_channels,
                         critic_channels=critic_channels, critic_norm=critic_norm, output=output,
                         legacy_bn_eps=legacy_bn_eps)
        if lambda_gp < 0 or n_critic < 1:
            raise ValueError(f"lambda_gp={lambda_gp} must be >= 0 and n_critic={n_critic} >= 1")
        self.lambda_gp, self.n_critic = float(lambda_gp), int(n_critic)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"critic": list(self.critic.parameters()), "generator": list(self.generator.parameters())}

    def _critic_terms(self, x: Tensor, z: Tensor) -> dict[str, Tensor]:
        real = self.to_gan(x)
        fake = self.generator(z).detach()  # the generator's one statistics-updating pass of this batch
        real_score = self.critic(real).mean()
        with keep_running_stats(self.critic):  # fakes and interpolates: not real images
            fake_score = self.critic(fake).mean()
            gp = gradient_penalty(self.critic, real, fake)
        return {"critic": fake_score - real_score + self.lambda_gp * gp, "gp": gp,
                "wasserstein": (real_score - fake_score).detach(), "generator": -fake_score.detach()}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Critic step every batch, generator step every ``n_critic``-th batch (``ctx.step % n_critic == 0``).

        Returns ``critic``, ``gp``, ``wasserstein`` (the critic's estimate before its step) and ``generator``
        (``-mean D(G(z))`` with the pre-step critic, logged at every batch even when G is not updated).
        """
        x = batch.image
        z = torch.randn(x.shape[0], self.latent_dim, device=x.device)
        with ctx.frozen_except("critic"), ctx.autocast():
            terms = self._critic_terms(x, z)
        ctx.backward_step("critic", terms["critic"])
        if ctx.step % self.n_critic == 0:
            # the same z as the critic step's pass, and a fake for the critic: no statistics update
            with ctx.frozen_except("generator"), ctx.autocast(), keep_running_stats(self.generator, self.critic):
                generator_loss = -self.critic(self.generator(z)).mean()
            ctx.backward_step("generator", generator_loss)
        return {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{'wasserstein': mean D(x) - mean D(G(z'))}`` with z' ~ N(0, I) from ``generator`` (lower = closer)."""
        x = batch.image
        z = torch.randn(x.shape[0], self.latent_dim, generator=generator, device=x.device)
        return {"wasserstein": self.critic(self.to_gan(x)).mean() - self.critic(self.generator(z)).mean()}


class FAnoGAN(_GANSpace, AnomalyModel):
    """Stage 2 of f-AnoGAN (izi_f): an encoder trained into a frozen WGAN-GP's latent space (one optimizer).

    Loss: ``recon = MSE(G(E(x)), x)`` and ``feature = kappa * MSE(f(G(E(x))), f(x))`` (f = critic trunk), in the
    GAN's range. G and D come from ``wgan_checkpoint`` (loaded strictly, frozen, always in eval mode; their
    weights are also part of this model's state dict, so stage-2 checkpoints are self-contained).

    Args:
        image_size, latent_dim, generator_channels, critic_channels, critic_norm, output, legacy_bn_eps: as the
            stage-1 :class:`WGANGP` (they must match its checkpoint).
        wgan_checkpoint: stage 1's ``checkpoints/latest.pt``. Required for training; null only to build the model
            for a dry run or to evaluate a stage-2 checkpoint (which embeds G and D).
        kappa: weight of the feature (izi_f) term (1).
        encoder_output: ``'tanh'`` (reference: z in (-1,1) although G was trained on N(0,I)) or ``'linear'``.
        score_mode: ``'residual'`` (mean |x - x_hat|, as the study) or ``'izif'`` (the paper's score).
    """

    def __init__(self, *, image_size: int = 128, latent_dim: int = 128,
                 generator_channels: Sequence[int] = (128, 128, 64), critic_channels: Sequence[int] = (16, 32, 64, 128),
                 critic_norm: CriticNorm = "batch", output: Output = "tanh", legacy_bn_eps: bool = False,
                 wgan_checkpoint: str | None = None, kappa: float = 1.0, encoder_output: EncoderOutput = "tanh",
                 score_mode: ScoreMode = "residual") -> None:
        super().__init__(image_size=image_size, latent_dim=latent_dim, generator_channels=generator_channels,
                         critic_channels=critic_channels, critic_norm=critic_norm, output=output,
                         legacy_bn_eps=legacy_bn_eps)
        check_choice("encoder_output", encoder_output, ("tanh", "linear"))
        check_choice("score_mode", score_mode, ("residual", "izif"))
        if kappa < 0:
            raise ValueError(f"kappa={kappa} must be >= 0")
        self.kappa, self.score_mode = float(kappa), score_mode
        trunk = CriticTrunk(channels=critic_channels, norm=critic_norm, legacy_bn_eps=legacy_bn_eps)
        layers: list[nn.Module] = [trunk, nn.Linear(self.critic.head.in_features, latent_dim)]
        if encoder_output == "tanh":
            layers.append(nn.Tanh())
        self.encoder = nn.Sequential(*layers)
        self.stage1: dict[str, Any] = {}
        if wgan_checkpoint is not None:
            self.stage1 = load_frozen_stage({"generator": self.generator, "critic": self.critic}, wgan_checkpoint,
                                            stage_name="WGAN-GP")
        else:  # frozen all the same: nothing may train G or D in stage 2
            self.generator.requires_grad_(False)
            self.critic.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> FAnoGAN:
        """Train/eval the encoder; the frozen G and D always stay in eval mode."""
        super().train(mode)
        keep_frozen_in_eval(self.generator, self.critic)
        return self

    def provenance(self) -> dict[str, Any]:
        return {"stage1_wgan": dict(self.stage1)} if self.stage1 else {}

    def reconstruct_gan(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x in the GAN range, G(E(x)) in the GAN range), each [B,1,S,S]."""
        real = self.to_gan(x)
        return real, self.generator(self.encoder(real))

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'recon': MSE(x_hat, x), 'feature': kappa * MSE(f(x_hat), f(x))}`` (gradients reach only E)."""
        if not self.stage1:
            raise RuntimeError("FAnoGAN needs the stage-1 WGAN-GP for training: set model.params.wgan_checkpoint to "
                               "the WGANGP run's checkpoints/latest.pt")
        real, fake = self.reconstruct_gan(batch.image)
        feature = F.mse_loss(self.critic.features(fake), self.critic.features(real))
        return {"recon": F.mse_loss(fake, real), "feature": self.kappa * feature}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Deterministic residual map of x: [B,1,S,S] in [0,1] (``generator`` is unused).

        Returns:
            ``anomaly_map`` |x - x_hat| [B,1,S,S] in [0,1]; ``anomaly_score`` [B] (mean of the map, or the izi_f
            score); ``reconstruction`` x_hat in [0,1].
        """
        real, fake = self.reconstruct_gan(x)
        x_hat = self.from_gan(fake)
        anomaly_map = (x - x_hat).abs()
        if self.score_mode == "izif":
            feature = (self.critic.features(fake) - self.critic.features(real)).pow(2).mean(dim=1)
            score = (fake - real).pow(2).flatten(1).mean(dim=1) + self.kappa * feature
        else:
            score = anomaly_map.mean(dim=(1, 2, 3))
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=score, reconstruction=x_hat)
