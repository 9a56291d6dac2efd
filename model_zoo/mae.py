"""Masked autoencoder (MAE; He et al. 2022) as an anomaly detector, docs/methods.md#masked-autoencoder-mae.

Network: MONAI ``nets.MaskedAutoEncoderViT`` (63.7 M parameters at the reference sizes: 128x128, patch 16, encoder
width 512 / depth 12 / 16 heads, decoder width 512 / depth 8 / 16 heads, MLP ratio 4, qkv bias). Its submodules are
run here with the masking drawn by this class, because MONAI's own masking uses the global CPU RNG: per image,
uniform noise is drawn for every patch and the ``round((1 - mask_ratio) * N)`` patches with the lowest noise stay
visible (the MAE paper's rule; MONAI samples a multinomial, which gives the same distribution). The 2-D sin-cos
position embedding is fixed; MONAI adds none to the cls token.

Training: ``masked_mse`` = sum over images and patches of mask * mean over the patch's pixels of
(pred - patchify(x))^2, divided by the number of masked patches (only masked patches are supervised; no
``norm_pix_loss``). Masks come from the global RNG (seeded by the trainer); validation draws them from the
given generator (the predecessor validated the whole-image MSE, including never-supervised visible patches).

Test: K = ``test_maskings`` independent maskings drawn from the caller's generator ([B, K, N] uniforms, in that
order); every pixel's reconstruction is the mean of the predictions of the passes in which its patch was masked
(a running sum and count: the predecessor's sentinel -1 / NaN scheme lost genuine -1 predictions). A patch never
masked in K passes (probability 0.25^K per patch at ratio 0.75) keeps the input value, i.e. a zero residual
(choice: no evidence against it). The reconstruction is clamped to [0,1] (the head is linear); A = |x - x_rec|,
score = mean of A. The draws do not depend on the images' content, so one image's map does not depend on the other
images of the batch; on the CPU a batch's first image also gets the same maskings as it would alone.
"""

from __future__ import annotations

import logging

import torch
from einops import rearrange
from monai.networks.nets import MaskedAutoEncoderViT
from torch import Tensor

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput

logger = logging.getLogger(__name__)


class MaskedAE(AnomalyModel):
    """MAE reconstruction of randomly masked patches, averaged over test-time maskings.

    Args:
        in_channels: image channels.
        image_size: square input size; a multiple of ``patch_size``.
        patch_size: side of the square patches (16 at 128x128: 64 patches).
        hidden_size, mlp_dim, num_layers, num_heads: encoder width, MLP width, depth and heads.
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: the same for the decoder.
        mask_ratio: fraction of patches removed, in (0, 1), in training and at test time (0.75).
        test_maskings: K, the number of maskings averaged at test time (30).

    Raises:
        ValueError: sizes that do not fit, a ratio that keeps no patch or removes none, or K < 1.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 128,
        patch_size: int = 16,
        hidden_size: int = 512,
        mlp_dim: int = 2048,
        num_layers: int = 12,
        num_heads: int = 16,
        decoder_hidden_size: int = 512,
        decoder_mlp_dim: int = 2048,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        test_maskings: int = 30,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.n_patches = (image_size // patch_size) ** 2
        self.n_keep = round((1 - mask_ratio) * self.n_patches)
        if not 0 < mask_ratio < 1 or not 0 < self.n_keep < self.n_patches:
            raise ValueError(f"mask_ratio={mask_ratio} must keep and remove at least one of {self.n_patches} patches")
        if test_maskings < 1:
            raise ValueError(f"test_maskings={test_maskings} must be >= 1")
        self.image_size, self.patch_size = image_size, patch_size
        self.mask_ratio, self.test_maskings = float(mask_ratio), int(test_maskings)
        self.net = MaskedAutoEncoderViT(
            in_channels=in_channels, img_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, masking_ratio=mask_ratio,
            decoder_hidden_size=decoder_hidden_size, decoder_mlp_dim=decoder_mlp_dim,
            decoder_num_layers=decoder_num_layers, decoder_num_heads=decoder_num_heads, spatial_dims=2,
            qkv_bias=True)
        # MONAI's TransformerBlock builds a cross-attention LayerNorm even without cross-attention; it is never used,
        # so freeze it (no optimizer state, no "unused parameter" error under DDP)
        for name, param in self.net.named_parameters():
            if ".norm_cross_attn." in name:
                param.requires_grad_(False)

    def patchify(self, x: Tensor) -> Tensor:
        """[B,C,S,S] -> [B,N,p*p*C], patches in row-major order (as the patch embedding's tokens)."""
        return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """[B,N,p*p*C] -> [B,C,S,S], the inverse of :meth:`patchify`."""
        side = self.image_size // self.patch_size
        return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=side, w=side, p=self.patch_size,
                         q=self.patch_size)

    def predict(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct x from the patches with the lowest noise.

        Args:
            x: [B,C,S,S] in [0,1].
            noise: [B,N] uniform values; the ``n_keep`` lowest per image mark the visible patches.

        Returns:
            (pred [B,N,p*p*C], linear; mask [B,N] with 1 = removed, 0 = visible).
        """
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"MaskedAE was built for {self.image_size}x{self.image_size} inputs "
                             f"(model.params.image_size), got input of shape {tuple(x.shape)}")
        net = self.net
        tokens = net.patch_embedding(x)  # [B,N,D], position embedding added
        b, n, d = tokens.shape
        keep = noise.argsort(dim=1)[:, : self.n_keep]  # [B,K]
        visible = tokens.gather(1, keep[..., None].expand(-1, -1, d))
        h = net.blocks(torch.cat([net.cls_token.expand(b, -1, -1), visible], dim=1))
        h = net.decoder_embed(h)
        dd = h.shape[-1]
        full = net.mask_tokens.expand(b, n, dd).scatter(1, keep[..., None].expand(-1, -1, dd), h[:, 1:])
        h = torch.cat([h[:, :1], full + net.decoder_pos_embedding], dim=1)
        pred = net.decoder_pred(net.decoder_blocks(h))[:, 1:]
        mask = torch.ones(b, n, device=x.device, dtype=x.dtype).scatter(1, keep, 0.0)
        return pred, mask

    def _masked_mse(self, x: Tensor, noise: Tensor) -> Tensor:
        pred, mask = self.predict(x, noise)
        per_patch = (pred - self.patchify(x)).pow(2).mean(dim=-1)  # [B,N]
        return (per_patch * mask).sum() / mask.sum()

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'masked_mse'}`` over the masked patches of ``batch.image`` [B,1,S,S] in [0,1] (global-RNG masks)."""
        x = batch.image
        return {"masked_mse": self._masked_mse(x, torch.rand(x.shape[0], self.n_patches, device=x.device))}

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{'masked_mse'}`` with masks drawn from ``generator`` (fixed seed per validation in the trainer)."""
        x = batch.image
        noise = torch.rand((x.shape[0], self.n_patches), generator=generator, device=x.device)
        return {"masked_mse": self._masked_mse(x, noise)}

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Residual of the masked-patch reconstruction averaged over K maskings.

        Args:
            x: [B,1,S,S] in [0,1].
            generator: source of the maskings; must be on ``x.device``.

        Returns:
            ``anomaly_map`` |x - x_rec| [B,1,S,S] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction``
            [B,1,S,S] in [0,1], ``extras['mask_count']`` [B,1,S,S]: how often each pixel was masked.
        """
        noise = torch.rand((x.shape[0], self.test_maskings, self.n_patches), generator=generator, device=x.device)
        total = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for k in range(self.test_maskings):
            pred, mask = self.predict(x, noise[:, k])
            mask_image = self.unpatchify(mask[..., None].expand_as(pred))
            total += self.unpatchify(pred) * mask_image
            count += mask_image
        x_rec = torch.where(count > 0, total / count.clamp_min(1), x).clamp(0, 1)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec, extras={"mask_count": count})
