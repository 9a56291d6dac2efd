"""VQ-VAE (stage 1) and the latent transformer model LTM (stage 2; Pinaya et al. 2022 style), on MONAI.

The methods: docs/methods.md#vq-vae-and-latent-transformer-model-ltm.

* :class:`VQVAE`: ``monai.networks.nets.VQVAE`` (EMA codebook, commitment cost 0.25, decay 0.5); loss
  ``L1(x_hat, x) + quantisation loss``; map ``|x - clamp(x_hat, 0, 1)|`` (the paper's VQ-VAE ablation). The codebook
  learns by EMA in train mode; the reference study's stage 1 trained in eval mode (its trainer's in-place
  ``model.eval()``), so its codebook stayed at the random initialisation (``trainer.params.model_mode: reference``).
* :class:`LTM`: a ``DecoderOnlyTransformer`` over the frozen VQ-VAE's token grid in raster order (row-major
  flattening, which is what MONAI's raster-scan ``Ordering`` produces for a 2-D grid) with a BOS token (index =
  ``num_embeddings``); loss = cross-entropy of ``[BOS, t_1..t_{N-1}] -> t_1..t_N``. The VQ-VAE is loaded strictly
  from ``vqvae_checkpoint``, frozen and kept in eval mode, so its EMA codebook never moves in stage 2 (the reference's
  LTM trainer built its VQ-VAE separately, in train mode, and the codebook drifted).

Healing (test time), per image, on the input's device: token log-likelihoods ``l_i = log p(t_i | BOS, t_<i)`` from
one pass; flagged = ``l_i < q(l)`` with ``q`` the per-image ``quantile`` (0.03); then in raster order every flagged
token is replaced by the argmax (or a temperature sample) of the transformer's prediction from the already healed
prefix, BOS excluded. The healed tokens are decoded; map ``|x - clamp(x_healed, 0, 1)|``, score its mean. Images
are healed together but each only from its own sequence (the transformer has no batch statistics), so maps do not
depend on the batch composition. One transformer pass per raster position flagged in any image of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE as MonaiVQVAE
from monai.networks.nets import DecoderOnlyTransformer
from torch import Tensor

from data.batch import Batch
from model_zoo.ae import check_choice
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.stages import keep_frozen_in_eval, load_frozen_stage

logger = logging.getLogger(__name__)

Resample = Literal["argmax", "sample"]


class VQVAE(AnomalyModel):
    """Vector-quantised autoencoder (stage 1 of LTM, and the VQ-VAE baseline).

    Args:
        image_size: square input size; the token grid is ``image_size / 2**len(channels)`` per side.
        channels: widths of the stride-2 levels (reference ``[256, 256]``: 32x32 tokens at 128x128).
        num_res_channels: residual-unit widths per level (reference ``[256, 256]``).
        num_res_layers: residual units per level (2).
        num_embeddings: codebook size (16).
        embedding_dim: code dimension (64).
        commitment_cost: weight of ``MSE(sg(q), e)`` (0.25).
        decay: EMA decay of the codebook (0.5).
    """

    def __init__(self, *, image_size: int = 128, channels: Sequence[int] = (256, 256),
                 num_res_channels: Sequence[int] = (256, 256), num_res_layers: int = 2, num_embeddings: int = 16,
                 embedding_dim: int = 64, commitment_cost: float = 0.25, decay: float = 0.5) -> None:
        super().__init__()
        channels, num_res_channels = list(channels), list(num_res_channels)
        if not channels or len(num_res_channels) != len(channels):
            raise ValueError(f"channels={channels!r} and num_res_channels={num_res_channels!r} must be non-empty and "
                             "of the same length")
        self.grid = image_size // 2 ** len(channels)
        if self.grid < 1 or self.grid * 2 ** len(channels) != image_size:
            raise ValueError(f"image_size={image_size} must be a multiple of 2**len(channels) = {2 ** len(channels)}")
        self.image_size, self.num_embeddings = image_size, num_embeddings
        levels = len(channels)
        self.net = MonaiVQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                              num_res_channels=num_res_channels, num_res_layers=num_res_layers,
                              downsample_parameters=((2, 4, 1, 1),) * levels,
                              upsample_parameters=((2, 4, 1, 1, 0),) * levels, num_embeddings=num_embeddings,
                              embedding_dim=embedding_dim, commitment_cost=commitment_cost, decay=decay)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{type(self).__name__} was built for {self.image_size}x{self.image_size} inputs "
                             f"(model.params.image_size), got {tuple(x.shape)}")

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'l1': L1(x_hat, x), 'quantization': commitment loss}`` (the codebook moves by EMA in train mode)."""
        self._check(batch.image)
        x_hat, quantization = self.net(batch.image)
        return {"l1": F.l1_loss(x_hat, batch.image), "quantization": quantization.mean()}

    def tokens(self, x: Tensor) -> Tensor:
        """x: [B,1,S,S] in [0,1] -> token indices [B,g,g] (long) in [0, num_embeddings)."""
        self._check(x)
        return self.net.index_quantize(x)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """[B,g,g] token indices -> images [B,1,S,S] clamped to [0,1]."""
        return self.net.decode_samples(tokens).clamp(0, 1)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Deterministic residual map |x - x_hat| [B,1,S,S] and its mean [B] (``generator`` unused)."""
        self._check(x)
        x_hat = self.net(x)[0].clamp(0, 1)
        anomaly_map = (x - x_hat).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_hat)


class LTM(AnomalyModel):
    """Latent transformer over a frozen VQ-VAE's tokens, with sequential "healing" of unlikely tokens at test time.

    Args:
        vqvae: the stage-1 :class:`VQVAE` ``params`` (must match its checkpoint).
        vqvae_checkpoint: stage 1's checkpoint. Required for training; null only to build the model for a dry run or
            to evaluate a stage-2 checkpoint (which embeds the VQ-VAE weights).
        width, depth, heads: transformer size (reference 128, 16, 16; MLP 4 x width).
        quantile: per-image likelihood quantile below which tokens are healed (0.03).
        resample: ``'argmax'`` (reference) or ``'sample'`` (from the caller's generator, at ``temperature``).
        temperature: softmax temperature of ``'sample'``.
    """

    def __init__(self, *, vqvae: dict[str, Any] | None = None, vqvae_checkpoint: str | None = None, width: int = 128,
                 depth: int = 16, heads: int = 16, quantile: float = 0.03, resample: Resample = "argmax",
                 temperature: float = 1.0) -> None:
        super().__init__()
        check_choice("resample", resample, ("argmax", "sample"))
        if not 0.0 <= quantile <= 1.0 or temperature <= 0:
            raise ValueError(f"quantile={quantile} must be in [0, 1] and temperature={temperature} > 0")
        self.vqvae = VQVAE(**(vqvae or {}))
        self.quantile, self.resample, self.temperature = quantile, resample, temperature
        self.bos = self.vqvae.num_embeddings
        self.n_tokens = self.vqvae.grid**2
        self.transformer = DecoderOnlyTransformer(num_tokens=self.bos + 1, max_seq_len=self.n_tokens,
                                                  attn_layers_dim=width, attn_layers_depth=depth,
                                                  attn_layers_heads=heads)
        for block in self.transformer.blocks:  # MONAI builds this LayerNorm even without cross-attention: unused
            block.norm_cross_attn.requires_grad_(False)
        self.stage1: dict[str, Any] = {}
        if vqvae_checkpoint is not None:
            self.stage1 = load_frozen_stage({"net": self.vqvae.net}, vqvae_checkpoint, stage_name="VQ-VAE")
        else:
            self.vqvae.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> LTM:
        """Train/eval the transformer; the frozen VQ-VAE always stays in eval mode (no codebook EMA)."""
        super().train(mode)
        keep_frozen_in_eval(self.vqvae)
        return self

    def provenance(self) -> dict[str, Any]:
        return {"stage1_vqvae": dict(self.stage1)} if self.stage1 else {}

    def sequence(self, x: Tensor) -> Tensor:
        """x: [B,1,S,S] -> raster-ordered tokens [B,N] (long), with the VQ-VAE frozen."""
        with torch.no_grad():
            return self.vqvae.tokens(x).flatten(1)

    def _inputs(self, tokens: Tensor) -> Tensor:
        bos = torch.full_like(tokens[:, :1], self.bos)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'ce': cross-entropy of the next token}`` over the B x N positions."""
        if not self.stage1:
            raise RuntimeError("LTM needs the stage-1 VQ-VAE for training: set model.params.vqvae_checkpoint to the "
                               "VQVAE run's checkpoint")
        tokens = self.sequence(batch.image)
        logits = self.transformer(self._inputs(tokens))
        return {"ce": F.cross_entropy(logits.transpose(1, 2).float(), tokens)}

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{'ce': ...}`` as in training (healing is too slow for every validation)."""
        tokens = self.sequence(batch.image)
        return {"ce": F.cross_entropy(self.transformer(self._inputs(tokens)).transpose(1, 2).float(), tokens)}

    @torch.no_grad()
    def heal(self, tokens: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Replace each image's unlikely tokens, in raster order.

        Args:
            tokens: [B,N] raster-ordered token indices.
            generator: for ``resample='sample'``; on the tokens' device.

        Returns:
            (healed tokens [B,N], flagged [B,N] bool).
        """
        log_probs = self.transformer(self._inputs(tokens)).float().log_softmax(dim=-1)
        likelihood = log_probs.gather(2, tokens[..., None]).squeeze(2)
        threshold = torch.quantile(likelihood, self.quantile, dim=1, keepdim=True)
        flagged = likelihood < threshold
        healed = tokens.clone()
        for i in flagged.any(dim=0).nonzero().flatten().tolist():
            logits = self.transformer(self._inputs(healed)[:, : i + 1])[:, i].float()
            logits[:, self.bos] = -torch.inf
            if self.resample == "argmax":
                choice = logits.argmax(dim=1)
            else:
                probs = (logits / self.temperature).softmax(dim=1)
                choice = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            healed[:, i] = torch.where(flagged[:, i], choice, healed[:, i])
        return healed, flagged

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n images from the learned token prior: tokens drawn one by one in raster order from the transformer's
        softmax (temperature 1, draws from ``generator``), decoded by the VQ-VAE: [n,1,S,S] in [0,1]."""
        device = next(self.transformer.parameters()).device
        tokens = torch.full((n, self.n_tokens), self.bos, dtype=torch.long, device=device)
        for i in range(self.n_tokens):
            logits = self.transformer(self._inputs(tokens)[:, : i + 1])[:, i].float()
            logits[:, self.bos] = -torch.inf
            tokens[:, i] = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
        grid = self.vqvae.grid
        return self.vqvae.decode_tokens(tokens.view(n, grid, grid)).clamp(0.0, 1.0)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Healed reconstruction and residual map of x: [B,1,S,S] in [0,1].

        Returns:
            ``anomaly_map`` |x - x_healed| [B,1,S,S] in [0,1], ``anomaly_score`` its mean [B], ``reconstruction``
            x_healed in [0,1], extras ``flagged_tokens`` [B,1,g,g] in {0,1}.
        """
        tokens = self.sequence(x)
        healed, flagged = self.heal(tokens, generator)
        grid = self.vqvae.grid
        x_hat = self.vqvae.decode_tokens(healed.view(-1, grid, grid))
        anomaly_map = (x - x_hat).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_hat,
                             extras={"flagged_tokens": flagged.view(-1, 1, grid, grid).float()})
