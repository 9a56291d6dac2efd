"""Spatial convolutional autoencoder ("AE-S"): the latent is a low-resolution feature map, not a vector.

Architecture (after the reference study's ``ConvAutoEncoder`` with ``deconv_mode: trans``): the encoder has one
stride-2 ``kernel_size`` convolution per entry of ``channels`` plus one more to ``latent_channels`` (so a 128x128
image becomes a ``latent_channels`` x 8x8 map with three channel entries), each followed by normalisation and
activation; the decoder mirrors it with stride-2 transposed convolutions and ends with a 1x1 convolution and a
sigmoid, so reconstructions are in [0,1]. Any image size divisible by ``2 ** (len(channels) + 1)`` works.

Deviation from the reference code, on purpose: its ``nn.LeakyReLU(True)`` set the negative slope to 1 (i.e. no
non-linearity); here ``act='leakyrelu'`` uses slope 0.2.

Anomaly map: ``|x - x_rec|`` per pixel; score: the mean of the map over the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput

logger = logging.getLogger(__name__)

Norm = Literal["batch", "instance", "group", "none"]
Act = Literal["leakyrelu", "relu", "silu"]
ReconLoss = Literal["l1", "l2"]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name``, the bad ``value`` and the valid ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """Normalisation layer for ``channels`` feature maps (group norm uses up to 8 groups that divide ``channels``)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def make_act(act: Act) -> nn.Module:
    """Activation module."""
    if act == "leakyrelu":
        return nn.LeakyReLU(0.2)
    if act == "relu":
        return nn.ReLU()
    return nn.SiLU()


class AutoEncoder(AnomalyModel):
    """Spatial convolutional autoencoder (AE-S).

    Args:
        in_channels: image channels (1 for the brain MRI slices).
        channels: encoder widths, one stride-2 convolution each (decoder mirrors them).
        latent_channels: channels of the spatial latent map (one further stride-2 convolution).
        kernel_size: odd kernel size of every (transposed) convolution.
        norm: ``'batch'``, ``'instance'``, ``'group'`` or ``'none'``.
        act: ``'leakyrelu'`` (slope 0.2), ``'relu'`` or ``'silu'``.
        recon_loss: ``'l1'`` (mean absolute error, the reference) or ``'l2'`` (mean squared error).

    Raises:
        ValueError: empty or non-positive ``channels``, even ``kernel_size`` or an unknown option.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        latent_channels: int = 128,
        kernel_size: int = 5,
        norm: Norm = "batch",
        act: Act = "leakyrelu",
        recon_loss: ReconLoss = "l1",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, get_args(Norm))
        check_choice("act", act, get_args(Act))
        check_choice("recon_loss", recon_loss, get_args(ReconLoss))
        channels = list(channels)
        if not channels or min(channels) < 1 or latent_channels < 1 or in_channels < 1:
            raise ValueError(f"channels={channels!r}, latent_channels={latent_channels} and in_channels={in_channels} "
                             "must be positive (channels non-empty)")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be a positive odd number")
        self.recon_loss = recon_loss
        self.downsampling = 2 ** (len(channels) + 1)
        pad = (kernel_size - 1) // 2

        widths = [in_channels, *channels, latent_channels]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            encoder += [
                nn.Conv2d(c_in, c_out, kernel_size, stride=2, padding=pad),
                make_norm(norm, c_out),
                make_act(act),
            ]
        self.encoder = nn.Sequential(*encoder)

        up_widths = [latent_channels, *reversed(channels), channels[0]]
        decoder: list[nn.Module] = []
        for c_in, c_out in zip(up_widths[:-1], up_widths[1:], strict=True):
            decoder += [
                nn.ConvTranspose2d(c_in, c_out, kernel_size, stride=2, padding=pad, output_padding=1),
                make_norm(norm, c_out),
                make_act(act),
            ]
        decoder += [nn.Conv2d(channels[0], in_channels, kernel_size=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstruct x: [B,C,H,W] in [0,1] -> [B,C,H,W] in [0,1]; H, W divisible by ``2**(len(channels)+1)``."""
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"AutoEncoder needs H and W divisible by {self.downsampling} (stride-2 layers), "
                             f"got input of shape {tuple(x.shape)}")
        return self.decoder(self.encoder(x))

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'recon': mean L1 (or L2) error}`` between ``batch.image`` [B,1,H,W] and its reconstruction."""
        diff = self.reconstruct(batch.image) - batch.image
        recon = diff.abs().mean() if self.recon_loss == "l1" else diff.pow(2).mean()
        return {"recon": recon}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual map of x: [B,1,H,W] in [0,1]; deterministic (``generator`` is unused).

        Returns:
            ``anomaly_map`` |x - x_rec| [B,1,H,W] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction``.
        """
        x_rec = self.reconstruct(x)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)
