"""MorphAEus: a deformable autoencoder (Bercea et al., MICCAI 2023), docs/methods.md#deformable-autoencoder-morphaeus.

Network (3.85 M parameters at the reference sizes, of which the deformer is 0.12 M), from MONAI blocks:

* Encoder: one [conv3 stride 2 (with bias) -> BatchNorm -> Swish] per entry of ``channels`` (128 -> 1 with seven).
* Decoder: per level [bilinear x2 (align_corners=True) -> conv3 -> BatchNorm -> Swish] with the widths of
  ``reversed(channels)``, then conv1x1 -> sigmoid: the **prior** P in [0,1].
* Deformer on the finest ``deformer_levels`` levels (explicit encoder levels instead of the predecessor's shape
  heuristic): starting at the coarsest of them, [ConvT3 stride 2 -> BatchNorm -> Swish] on the concatenation of the
  *pre-BatchNorm* encoder and decoder features at that resolution (and the previous deformer output), up to full
  resolution, then conv3 -> 2 channels (weights N(0, 1e-5), bias 0): a stationary velocity field v in pixels
  (channel 0 rows, channel 1 columns).
* Integration (scaling and squaring, MONAI ``DVF2DDF``, ``integration_steps`` halvings) gives the displacement
  phi(v); ``Warp`` (bilinear, zero padding, align_corners=True) gives the reconstruction y = P o phi(v) and
  x_back = x o phi(-v).

Training (one optimizer; terms summed by the trainer):

* ``mse`` = MSE(P, x) and ``ssim`` = 1 - SSIM(P, x) (Gaussian window 11, sigma 1.5, data range 1; MONAI SSIMLoss);
* ``ncc`` = 0.5 (NCC(x, y) + NCC(P, x_back)) with NCC = 1 - mean local squared correlation over 9x9 windows
  (MONAI LocalNormalizedCrossCorrelationLoss + 1); P is not detached, so these terms also train the AE;
* ``smooth`` = beta * R(v), R = 0.5 * mean over interior pixels and both components of the squared central
  differences (0.5 * MONAI DiffusionLoss), beta = clip(epoch / beta_ramp_epochs, beta_min, 1).

``ncc`` and ``smooth`` are multiplied by 0 before ``deform_start_epoch`` (the reference: 0-based epoch 500, i.e.
from the 501st epoch), so the logged terms keep the same names in both phases. The epoch comes from the trainer's
:meth:`on_train_epoch_start` hook (0-based). Choices where the reference is ambiguous: the epoch counter is
0-based for the switch and the ramp; the VGG19 perceptual loss of the reference (weight 0.1) is **not** built,
as no VGG19 ImageNet weights are available offline (docs/methods.md#deformable-autoencoder-morphaeus).

Validation (:meth:`validation_losses`): ``recon_mse``/``recon_mae`` of the deformed reconstruction y and
``prior_mse`` of P. The predecessor selected on the prior MSE (``trainer.params.monitor: prior_mse``), which can
keep a checkpoint from before the deformation phase; the shipped configs monitor ``recon_mse`` (y is ~P before the
switch, as the flow starts ~0).

Test (deterministic): A = |x - y|, score = mean of A; extras: the prior and the displacement field [B,2,H,W].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss, SSIMLoss
from monai.networks.blocks import DVF2DDF, Convolution, Warp
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput

logger = logging.getLogger(__name__)


def _block(c_in: int, c_out: int, *, stride: int = 1, transposed: bool = False) -> Convolution:
    return Convolution(spatial_dims=2, in_channels=c_in, out_channels=c_out, kernel_size=3, strides=stride,
                       padding=1, act="SWISH", norm="BATCH", is_transposed=transposed,
                       output_padding=1 if transposed else None)


def smoothness(v: Tensor) -> Tensor:
    """R(v) = 0.5 * mean over interior pixels and components of the squared central differences; v: [B,2,H,W].

    Equals 0.5 * MONAI ``DiffusionLoss`` (checked in the tests), written out to avoid its per-call warnings.
    """
    d_rows = (v[:, :, 2:, 1:-1] - v[:, :, :-2, 1:-1]) / 2
    d_cols = (v[:, :, 1:-1, 2:] - v[:, :, 1:-1, :-2]) / 2
    return 0.5 * (d_rows.pow(2) + d_cols.pow(2)).mean()


class MorphAEus(AnomalyModel):
    """Deformable autoencoder: a blurry prior warped onto the input by a diffeomorphic deformation.

    Args:
        in_channels: image channels.
        channels: encoder widths, one stride-2 level each (reference 16/32/64/128/256/256/256 at 128x128); H and W
            must be divisible by ``2 ** len(channels)``.
        deformer_levels: number of finest levels whose features feed the deformer (3); < len(channels).
        deformer_channels: width of the deformer's layers (32).
        integration_steps: scaling-and-squaring steps (7).
        deform_start_epoch: first (0-based) epoch with the NCC and smoothness terms (500).
        beta_ramp_epochs: beta reaches 1 at this epoch (1000).
        beta_min: lower clip of beta (1e-3).
        ncc_kernel: side of the NCC window (9).

    Raises:
        ValueError: empty or non-positive widths, too many deformer levels or negative epochs.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256, 256, 256),
        deformer_levels: int = 3,
        deformer_channels: int = 32,
        integration_steps: int = 7,
        deform_start_epoch: int = 500,
        beta_ramp_epochs: int = 1000,
        beta_min: float = 1e-3,
        ncc_kernel: int = 9,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if not channels or min(channels) < 1 or in_channels < 1 or deformer_channels < 1:
            raise ValueError(f"channels={channels!r}, in_channels={in_channels} and deformer_channels="
                             f"{deformer_channels} must be positive (channels non-empty)")
        if not 1 <= deformer_levels < len(channels):
            raise ValueError(f"deformer_levels={deformer_levels} must be in [1, len(channels) - 1 = "
                             f"{len(channels) - 1}]")
        if deform_start_epoch < 0 or beta_ramp_epochs < 1 or not 0 < beta_min <= 1 or integration_steps < 0:
            raise ValueError(f"deform_start_epoch={deform_start_epoch} must be >= 0, beta_ramp_epochs="
                             f"{beta_ramp_epochs} >= 1, beta_min={beta_min} in (0, 1] and integration_steps="
                             f"{integration_steps} >= 0")
        self.downsampling = 2 ** len(channels)
        self.deformer_levels = deformer_levels
        self.deform_start_epoch, self.beta_ramp_epochs, self.beta_min = deform_start_epoch, beta_ramp_epochs, beta_min
        self.epoch = 0  # set by the trainer through on_train_epoch_start

        widths = [in_channels, *channels]
        self.encoder = nn.ModuleList(_block(a, b, stride=2) for a, b in zip(widths[:-1], widths[1:], strict=True))
        up = list(reversed(channels))
        self.decoder = nn.ModuleList(_block(a, b) for a, b in zip([up[0], *up[:-1]], up, strict=True))
        self.prior_head = nn.Sequential(nn.Conv2d(channels[0], in_channels, kernel_size=1), nn.Sigmoid())

        # level i has resolution S / 2**(i+1): encoder width channels[i], decoder width channels[i+1]
        deformer: list[nn.Module] = []
        prev = 0
        for i in reversed(range(deformer_levels)):
            deformer.append(_block(channels[i] + channels[i + 1] + prev, deformer_channels, stride=2,
                                   transposed=True))
            prev = deformer_channels
        self.deformer = nn.ModuleList(deformer)
        self.flow = nn.Conv2d(deformer_channels, 2, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)
        self.integrate = DVF2DDF(num_steps=integration_steps, mode="bilinear", padding_mode="zeros")
        self.warp = Warp(mode="bilinear", padding_mode="zeros")
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
        self.ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=ncc_kernel,
                                                       kernel_type="rectangular")

    def on_train_epoch_start(self, epoch: int) -> None:
        """Record the 0-based epoch: it switches the deformation terms on and ramps beta."""
        self.epoch = int(epoch)

    @property
    def deforming(self) -> bool:
        """Whether the current epoch trains with the NCC and smoothness terms."""
        return self.epoch >= self.deform_start_epoch

    @property
    def beta(self) -> float:
        """Weight of the smoothness term at the current epoch."""
        return min(max(self.epoch / self.beta_ramp_epochs, self.beta_min), 1.0)

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Prior, velocity, displacement and warped images of x: [B,C,H,W] in [0,1].

        Returns:
            ``prior`` P [B,C,H,W] in [0,1], ``velocity`` v [B,2,H,W] (pixels), ``displacement`` phi(v) [B,2,H,W],
            ``reconstruction`` y = P o phi(v) [B,C,H,W] in [0,1], ``x_back`` = x o phi(-v).
        """
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"MorphAEus needs H and W divisible by {self.downsampling} (2 ** len(channels)), got "
                             f"input of shape {tuple(x.shape)}")
        enc_skips = []
        h = x
        for block in self.encoder:
            pre = block.conv(h)
            enc_skips.append(pre)
            h = block.adn(pre)
        dec_skips = []
        for block in self.decoder:
            pre = block.conv(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))
            dec_skips.append(pre)
            h = block.adn(pre)
        prior = self.prior_head(h)
        n = len(self.encoder)
        d = None
        for level, block in zip(reversed(range(self.deformer_levels)), self.deformer, strict=True):
            feats = [enc_skips[level], dec_skips[n - 2 - level]] + ([d] if d is not None else [])
            d = block(torch.cat(feats, dim=1))
        # integration and warping in float32 even under autocast: a bf16 sampling grid is off by up to half a pixel
        velocity = self.flow(d)
        with torch.autocast(x.device.type, enabled=False):
            velocity, prior = velocity.float(), prior.float()
            displacement = self.integrate(velocity)
            return {"prior": prior, "velocity": velocity, "displacement": displacement,
                    "reconstruction": self.warp(prior, displacement),
                    "x_back": self.warp(x.float(), self.integrate(-velocity))}

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'mse', 'ssim', 'ncc', 'smooth'}`` for ``batch.image`` [B,1,H,W] in [0,1] (see the module docstring)."""
        x = batch.image
        out = self.forward_all(x)
        prior, y = out["prior"], out["reconstruction"]
        on = 1.0 if self.deforming else 0.0
        with torch.autocast(x.device.type, enabled=False):  # local variances (SSIM, NCC) cancel badly in bf16
            x = x.float()
            ncc = 0.5 * ((1 + self.ncc(y, x)) + (1 + self.ncc(out["x_back"], prior)))
            return {
                "mse": F.mse_loss(prior, x),
                "ssim": self.ssim(prior, x),
                "ncc": on * ncc,
                "smooth": on * self.beta * smoothness(out["velocity"]),
            }

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``recon_mse``/``recon_mae`` of the deformed reconstruction and ``prior_mse`` of the prior."""
        out = self.forward_all(batch.image)
        diff = out["reconstruction"] - batch.image
        return {"recon_mae": diff.abs().mean(), "recon_mse": diff.pow(2).mean(),
                "prior_mse": (out["prior"] - batch.image).pow(2).mean()}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual of the deformed prior for x: [B,1,H,W] in [0,1]; deterministic (``generator`` is unused).

        Returns:
            ``anomaly_map`` |x - y| [B,1,H,W] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction`` y,
            ``extras``: ``prior`` [B,1,H,W] and ``displacement`` [B,2,H,W] (pixels).
        """
        out = self.forward_all(x)
        y = out["reconstruction"]
        anomaly_map = (x - y).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)), reconstruction=y,
                             extras={"prior": out["prior"], "displacement": out["displacement"]})
