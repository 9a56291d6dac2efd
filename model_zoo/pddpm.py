"""pDDPM (patched diffusion, Behrendt et al., MIDL 2023): a DDPM that restores one noised patch from clean context.

The method: docs/methods.md#patched-diffusion-pddpm.

The image is split into a grid of boxes: starts 0, s, 2s, ... (``patch_stride`` s) until a
box of ``patch_size`` reaches the border; boxes at the right and bottom border are cut to the image (128 px, patch
48: starts {0, 48, 96}, 9 boxes of 48 or 32 px that tile the image). Everything runs on ``x0 = 2x - 1`` in [-1,1].

Training (per image): a step t ~ U{0..T-1}, a noise field n (simplex by default, one field per image), one box
drawn uniformly from the grid; the network sees x0 with the box replaced by ``sqrt(abar_t) x0 + sqrt(1-abar_t) n``
and predicts x0 (MONAI ``prediction_type='sample'``). The loss (``box_l1``) is ``mean |y - x0|`` over all pixels
with ``y`` = x0 outside the box and the prediction inside, i.e. the box's L1 sum divided by H*W (the reference).
Validation is the same loss with box, t and noise drawn from a fixed-seed generator (the reference drew them from
the global RNG).

Test (:meth:`PatchedDDPM.reconstruct`): one noise field per image at the inference setting's L, shared by all
boxes; for each box k one *patch pass* (:meth:`PatchedDDPM.patch_pass`): the box noised to L, the rest clean, then
denoised with the :class:`~model_zoo.diffusion.settings.InferenceSetting`, the network's input being re-stitched
with the clean image outside the box before every call (the context the network was trained with). The reference
setting is ``{sampler: strided, noise_level: 499, steps: 1}``: one network call per box whose x0 prediction is the
result (a one-step posterior to step -1 is x0 itself), 9 calls per image. Several steps run the DDPM posterior
(``strided``/``ddpm``) or DDIM over the box. The boxes' outputs are stitched (averaged where boxes overlap) into
the reconstruction, mapped back to [0,1] and clamped (the reference does not clamp: a recorded deviation). The map
is ``|x - x_rec|`` and the score its mean. Every draw comes from the caller's generator; no statistic is taken over
the batch.

The network predicts x0; the shared reverse steps (:mod:`model_zoo.diffusion.procedures`) take a noise
predictor, so a patch pass hands them ``eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``, from which they
recover x0_hat exactly up to rounding (amplified by 1/sqrt(abar_t): fine for L well below T, as in the reference).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor

from data.batch import Batch
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.procedures import EpsModel, denoise, noise_to, q_sample
from model_zoo.diffusion.settings import InferenceSetting, ScheduleSetting, UNetSetting

logger = logging.getLogger(__name__)

#: pDDPM's reference network (docs/methods.md#patched-diffusion-pddpm): MONAI's version of the OpenAI UNet,
#: 86.9 M parameters.
PDDPM_NETWORK = UNetSetting(channels=(64, 128, 256, 512), attention_levels=(False, False, True, True),
                            num_res_blocks=3, num_head_channels=64, resblock_updown=True)
#: Cosine schedule with T = 1000; predicted x0 clipped to [-1, 1] in the reverse steps.
PDDPM_SCHEDULE = ScheduleSetting(num_train_timesteps=1000, beta_schedule="cosine")
#: Simplex noise (6 octaves, persistence 0.8, coordinate divisor 64 at 128 px), one field per image.
PDDPM_NOISE = DiffusionNoise(noise_type="simplex")
#: The reference test: each box noised to t = 499 and restored by one x0 prediction.
PDDPM_INFERENCE = InferenceSetting(sampler="strided", noise_level=499, steps=1)


def grid_starts(size: int, patch_size: int, stride: int) -> list[int]:
    """Box starts along one axis: 0, stride, 2*stride, ... up to the first box that reaches ``size``.

    With ``stride <= patch_size`` the boxes cover every pixel; the last one may be cut at the border.
    Example: size 128, patch 48, stride 48 gives [0, 48, 96] (the last box 32 px).
    """
    return list(range(0, max(size - patch_size, 0) + stride, stride))


def grid_boxes(size: int, patch_size: int, stride: int) -> Tensor:
    """The grid's boxes as masks.

    Args:
        size: image height = width.
        patch_size, stride: box side and step (``stride <= patch_size``).

    Returns:
        [K,1,size,size] bool, K = len(grid_starts)^2, row-major (box k covers rows of start k // n, columns of
        start k % n).
    """
    starts = grid_starts(size, patch_size, stride)
    boxes = torch.zeros(len(starts) ** 2, 1, size, size, dtype=torch.bool)
    for i, top in enumerate(starts):
        for j, left in enumerate(starts):
            boxes[i * len(starts) + j, :, top:top + patch_size, left:left + patch_size] = True
    return boxes


class PatchedDDPM(DDPM):
    """pDDPM on MONAI's ``DiffusionModelUNet`` (x0 prediction, L1 box loss, a grid of patch passes at test).

    Args:
        image_size: H = W of the images (the grid and the number of network calls depend on it).
        patch_size: box side in pixels (reference 48 at 128 px).
        patch_stride: distance between box starts (None: ``patch_size``, a tiling as the reference); smaller values
            give overlapping boxes whose outputs are averaged per pixel at test.
        **ddpm: the DDPM's options (``network``, ``schedule``, ``noise``, ``inference``, ``autocast_dtype``, ...),
            passed to :class:`DDPM`; defaults: pDDPM's reference network, the cosine schedule, simplex noise and
            one x0 prediction at L = 499 per box. ``val_inference`` must stay null: validation is the training
            loss.
    """

    prediction_type: ClassVar[str] = "sample"

    def __init__(self, *, image_size: int, patch_size: int = 48, patch_stride: int | None = None,
                 **ddpm: Any) -> None:
        if ddpm.get("val_inference") is not None:
            raise ValueError("val_inference must be null for pDDPM: it validates with its training loss (box L1 with "
                             "box, t and noise from a fixed generator), not with a reconstruction")
        defaults = {"network": PDDPM_NETWORK, "schedule": PDDPM_SCHEDULE, "noise": PDDPM_NOISE,
                    "inference": PDDPM_INFERENCE}
        super().__init__(**{**defaults, **ddpm})
        stride = patch_size if patch_stride is None else patch_stride
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"patch_size={patch_size} must be in [1, image_size={image_size}]")
        if not 1 <= stride <= patch_size:
            raise ValueError(f"patch_stride={stride} must be in [1, patch_size={patch_size}] (larger strides leave "
                             "pixels that no box covers)")
        self.image_size = image_size
        self.patch_size = patch_size
        self.patch_stride = stride
        boxes = grid_boxes(image_size, patch_size, stride)
        # Non-persistent: follow .to(device), stay out of checkpoints (the state dict is the UNet's, as DDPM's).
        self.register_buffer("boxes", boxes, persistent=False)
        self.register_buffer("coverage", boxes.sum(dim=0, keepdim=True).float(), persistent=False)

    @property
    def num_boxes(self) -> int:
        """K, the number of boxes (= patch passes per image at test)."""
        return self.boxes.shape[0]

    def network_calls(self, inference: InferenceSetting | None = None) -> int:
        """UNet calls of one :meth:`get_anomaly` call (each image goes through each call once): K times the
        setting's calls."""
        return self.num_boxes * self._setting(inference).network_calls

    def inference_label(self, inference: InferenceSetting | None = None) -> str:
        """What :meth:`get_anomaly` computes under ``inference`` (None: the configured one), for manifests and
        reports: the grid, the per-box procedure and the network calls."""
        setting = self._setting(inference)
        if setting.timesteps == [setting.noise_level]:
            per_box = f"one x0 prediction at t={setting.noise_level}"
        else:
            per_box = setting.label
        return (f"{self.noise.noise_type} noise, {self.num_boxes} patch passes (box {self.patch_size} px, stride "
                f"{self.patch_stride}), each: {per_box}; {self.network_calls(setting)} network calls in all")

    # ----------------------------------------------------------------------------------------- network
    def predict_sample(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's x0 prediction in [-1,1] units (float32).

        Args:
            x_t: [B,1,H,W] input (a noised box in a clean image).
            t: [B] long steps in [0, T).
        """
        return super().eps(x_t, t)  # DDPM.eps is the (autocast, compiled) network call; here it predicts x0

    def _eps_from_sample(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise implied by the network's x0 prediction (DDPM's contract: [B,C,H,W] predicted noise)."""
        return self._eps_from_sample(x_t, t, self.predict_sample(x_t, t))

    # ----------------------------------------------------------------------------------------- training
    def _check_size(self, x: Tensor) -> None:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pDDPM was built for {self.image_size}x{self.image_size} images (image_size), got "
                             f"{tuple(x.shape[-2:])}")

    def box_loss(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The box L1 loss of one batch (all draws from ``generator``, None: the global RNG).

        Args:
            x: [B,1,H,W] in [0,1].

        Returns:
            scalar ``mean over B,H,W of |y - x0|``, y = x0 outside each image's box, the x0 prediction inside.
        """
        self._check_size(x)
        x0 = 2.0 * x - 1.0
        b = x.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=x.device)
        noise = self.noise.sample(x0, t, generator=generator)
        k = torch.randint(0, self.num_boxes, (b,), generator=generator, device=x.device)
        box = self.boxes[k]
        x_in = torch.where(box, q_sample(x0, t, noise, self.alphas_cumprod), x0)
        x0_hat = self.predict_sample(x_in, t)
        # |y - x0| is |x0_hat - x0| in the box and 0 outside: the box sum over all pixels (the reference's weighting)
        return torch.where(box, x0_hat - x0, 0.0).abs().sum() / x0.numel()

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``{'box_l1': scalar}`` (global RNG, seeded by the trainer)."""
        return {"box_l1": self.box_loss(batch.image)}

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{'box_l1': scalar}`` with box, t and noise from ``generator`` (None: one seeded with ``val_seed``)."""
        x = batch.image
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        return {"box_l1": self.box_loss(x, generator=generator)}

    # ----------------------------------------------------------------------------------------- inference
    def _patch_eps(self, x0: Tensor, box: Tensor) -> EpsModel:
        """A noise predictor for one box: the network sees the sample inside the box and the clean x0 outside."""

        def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
            return self._eps_from_sample(x_t, t, self.predict_sample(torch.where(box, x_t, x0), t))

        return eps_model

    @torch.no_grad()
    def patch_pass(
        self, x: Tensor, k: int, field: Tensor, *, generator: torch.Generator | None = None,
        inference: InferenceSetting | None = None,
    ) -> Tensor:
        """Noise box ``k`` of x to L with ``field`` and denoise it with the inference setting.

        Args:
            x: [B,1,H,W] in [0,1].
            k: box index in [0, K).
            field: [B,1,H,W] noise of the model's type (shared by the boxes of one reconstruction).
            generator: source of the reverse steps' noise (multi-step samplers).
            inference: the setting of this call (None: the configured one).

        Returns:
            [B,1,H,W]: x outside box k (exactly), the denoised box inside, in [0,1] units, not clamped.
        """
        setting = self._setting(inference)
        self._check_size(x)
        box = self.boxes[k]
        x0 = 2.0 * x - 1.0
        x_t = torch.where(box, noise_to(x0, setting.noise_level, field, self.schedule), x0)
        restored = denoise(self._patch_eps(x0, box), x_t, setting.timesteps, schedule=self.schedule, noise=self.noise,
                           generator=generator, method="ddim" if setting.sampler == "ddim" else "ddpm",
                           clip=self.x0_clip, eta=setting.eta)
        return torch.where(box, (restored + 1.0) / 2.0, x)

    def _reconstruct_once(self, x: Tensor, *, generator: torch.Generator | None, setting: InferenceSetting) -> Tensor:
        """The grid of patch passes stitched into one reconstruction, clamped to [0,1] (``reconstruct`` averages
        ``setting.draws`` of them).

        Args:
            x: [B,1,H,W] in [0,1], H = W = ``image_size``.
            generator: random source on x's device: first the noise field (one per image, shared by the boxes),
                then the reverse steps' noise of each pass in box order.
            setting: the checked inference setting of this call.

        Returns:
            [B,1,H,W] in [0,1]; each pixel the mean of the passes whose box covers it.
        """
        self._check_size(x)
        field = self.noise.sample(x, setting.noise_level, generator=generator)
        total = torch.zeros_like(x)
        for k in range(self.num_boxes):
            restored = self.patch_pass(x, k, field, generator=generator, inference=setting)
            total = total + torch.where(self.boxes[k], restored, 0.0)
        return (total / self.coverage).clamp(0.0, 1.0)

