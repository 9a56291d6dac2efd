"""Denoising autoencoder with coarse noise (DAE; Kascenas et al., MIDL 2022), docs/methods.md#denoising-autoencoder-dae.

Network (Kascenas' UNet, 7.7 M parameters at the reference widths): every block is 2 x [ReflectionPad 1 ->
weight-standardised 3x3 convolution -> Swish -> GroupNorm]; the down path has one block per entry of
``channels`` with 2x2 average pooling between them, the up path a stride-2 2x2 transposed convolution, the skip
concatenated, and a block; a final 1x1 convolution gives a **linear** output. GroupNorm uses the median divisor
of the channel count as the number of groups (64 -> 8, 128 -> 16, 256 -> 16, 512 -> 32).

Training: coarse noise ``n`` (N(0, noise_std^2) on a ``noise_resolution`` x ``noise_resolution`` grid, bilinearly
upsampled to H x W with align_corners=True and rolled by a random (dy, dx) with wrap-around, one field per image) is
added on the foreground ``fg = x > foreground_threshold``: ``x_n = x + n * fg`` (not clipped, as the original).
The loss compares ``UNet(x_n)`` with the **clean** x: ``'masked_mse'`` = mean(fg * (x_hat - x)^2) (Kascenas'
original, the default) or ``'l1'`` = mean |x_hat - x| (the predecessor's config). Noise during training comes from
the global RNG (seeded by the trainer); validation draws it from the given generator.

Test (deterministic, on the clean input): ``x_rec = clamp(UNet(x), 0, 1)``; ``postprocess='none'``:
A = |x - x_rec| (the predecessor); ``'kascenas'``: A = median5(|x - x_rec| * erode(fg)) with
erode(fg) = [avgpool5(fg) > 0.95] (zero padding counted, so the image border erodes) and a 5x5 median with reflect
padding. Score: mean of A. Choice (the spec is silent): the map uses the clamped output, so the map, the
reconstruction and the [0,1] image range agree; clamping only lowers residuals where the output leaves [0,1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.ae import check_choice
from model_zoo.base import AnomalyModel, AnomalyOutput

logger = logging.getLogger(__name__)

DaeLoss = Literal["masked_mse", "l1"]
Postprocess = Literal["none", "kascenas"]


def coarse_noise(shape: Sequence[int], *, std: float, resolution: int, device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """Low-frequency Gaussian noise, one independent field per image and channel.

    Args:
        shape: (B, C, H, W) of the output.
        std: standard deviation of the grid values.
        resolution: side of the square grid that is upsampled to H x W (bilinear, align_corners=True).
        device: output device (the generator, if given, must live there).
        generator: source of the grid values and the wrap-around shifts; None = global RNG.

    Returns:
        [B,C,H,W] noise, rolled per image by a shift drawn uniformly from [0,H) x [0,W).
    """
    b, c, h, w = shape
    grid = torch.randn((b, c, resolution, resolution), generator=generator, device=device) * std
    noise = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
    dy = torch.randint(0, h, (b,), generator=generator, device=device)
    dx = torch.randint(0, w, (b,), generator=generator, device=device)
    # torch.roll per image, vectorised: out[i] = noise[(i - shift) % n]
    rows = (torch.arange(h, device=device)[None, :] - dy[:, None]) % h  # [B,H]
    cols = (torch.arange(w, device=device)[None, :] - dx[:, None]) % w  # [B,W]
    noise = noise.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return noise.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def median_filter(x: Tensor, size: int) -> Tensor:
    """size x size median of x: [B,C,H,W] with reflect padding (size odd, smaller than H and W)."""
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)  # [B,C,H,W,size,size]
    return patches.flatten(-2).median(dim=-1).values


def _median_divisor(n: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return divisors[len(divisors) // 2]


class WSConv2d(nn.Conv2d):
    """Convolution with weight standardisation: per output channel, (w - mean) / (std + 1e-5)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / (std + 1e-5), self.bias, self.stride, self.padding)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        layers += [nn.ReflectionPad2d(1), WSConv2d(a, b, 3), Act["SWISH"](), nn.GroupNorm(_median_divisor(b), b)]
    return nn.Sequential(*layers)


class DenoisingAE(AnomalyModel):
    """Kascenas' denoising UNet trained to remove coarse noise.

    Args:
        in_channels: image channels.
        channels: widths of the UNet levels (reference 64/128/256/512; CPU 32/64/128); H and W must be divisible
            by ``2 ** (len(channels) - 1)``.
        noise_std: standard deviation of the coarse noise grid (0.2).
        noise_resolution: side of the noise grid (16 at 128x128; keep it H/8 at other sizes).
        foreground_threshold: pixels above it are foreground (noised, and counted by the masked loss).
        loss: ``'masked_mse'`` (original) or ``'l1'`` (predecessor config).
        postprocess: ``'none'`` (predecessor) or ``'kascenas'`` (eroded brain mask + 5x5 median).

    Raises:
        ValueError: empty or non-positive widths, non-positive noise settings or an unknown option.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512),
        noise_std: float = 0.2,
        noise_resolution: int = 16,
        foreground_threshold: float = 0.01,
        loss: DaeLoss = "masked_mse",
        postprocess: Postprocess = "none",
    ) -> None:
        super().__init__()
        check_choice("loss", loss, get_args(DaeLoss))
        check_choice("postprocess", postprocess, get_args(Postprocess))
        channels = list(channels)
        if not channels or min(channels) < 1 or in_channels < 1:
            raise ValueError(f"channels={channels!r} and in_channels={in_channels} must be positive (non-empty)")
        if noise_std <= 0 or noise_resolution < 2:
            raise ValueError(f"noise_std={noise_std} must be > 0 and noise_resolution={noise_resolution} >= 2")
        self.noise_std, self.noise_resolution = float(noise_std), int(noise_resolution)
        self.foreground_threshold = float(foreground_threshold)
        self.loss, self.postprocess = loss, postprocess
        self.downsampling = 2 ** (len(channels) - 1)

        self.down = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.down.append(_conv_block(c_prev, c))
            c_prev = c
        self.up_convs = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for c_deep, c_skip in zip(reversed(channels[1:]), reversed(channels[:-1]), strict=True):
            self.up_convs.append(nn.ConvTranspose2d(c_deep, c_skip, kernel_size=2, stride=2))
            self.up_blocks.append(_conv_block(2 * c_skip, c_skip))
        self.head = nn.Conv2d(channels[0], in_channels, kernel_size=1)

    def denoise(self, x: Tensor) -> Tensor:
        """UNet output for x: [B,C,H,W] (roughly [0,1]) -> [B,C,H,W], linear (not clamped)."""
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"DenoisingAE needs H and W divisible by {self.downsampling} "
                             f"(2 ** (len(channels) - 1)), got input of shape {tuple(x.shape)}")
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.avg_pool2d(h, 2))
            skips.append(h)
        for up, block, skip in zip(self.up_convs, self.up_blocks, reversed(skips[:-1]), strict=True):
            h = block(torch.cat([up(h), skip], dim=1))
        return self.head(h)

    def _denoising_loss(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        fg = (x > self.foreground_threshold).to(x.dtype)
        noise = coarse_noise(x.shape, std=self.noise_std, resolution=self.noise_resolution, device=x.device,
                             generator=generator)
        diff = self.denoise(x + noise * fg) - x
        return (fg * diff.pow(2)).mean() if self.loss == "masked_mse" else diff.abs().mean()

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'denoising': loss between UNet(x + coarse noise * fg) and the clean x}`` for x [B,1,H,W] in [0,1]."""
        return {"denoising": self._denoising_loss(batch.image, None)}

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The training loss with noise from ``generator`` (``'denoising'``) plus the clean reconstruction errors."""
        return {"denoising": self._denoising_loss(batch.image, generator),
                **super().validation_losses(batch, generator=generator)}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual map of x: [B,1,H,W] in [0,1]; deterministic (``generator`` is unused).

        Returns:
            ``anomaly_map`` [B,1,H,W] in [0,1] (see ``postprocess``), ``anomaly_score`` its mean [B],
            ``reconstruction`` clamp(UNet(x), 0, 1).
        """
        x_rec = self.denoise(x).clamp(0, 1)
        anomaly_map = (x - x_rec).abs()
        if self.postprocess == "kascenas":
            fg = (x > self.foreground_threshold).to(x.dtype)
            eroded = (F.avg_pool2d(fg, 5, stride=1, padding=2) > 0.95).to(x.dtype)
            anomaly_map = median_filter(anomaly_map * eroded, 5)
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)

