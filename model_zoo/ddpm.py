"""DDPM / AnoDDPM: a denoising diffusion model trained on healthy images, scoring by partial diffusion.

Network: MONAI's ``DiffusionModelUNet`` (2-D); schedule: MONAI's ``DDPMScheduler`` (linear betas, epsilon
prediction). Training: MSE between the predicted and the true noise at a uniformly drawn step, with images kept
in [0,1] (as the reference; no rescaling to [-1,1]). Inference ("partial diffusion", Wyatt et al., 2022): noise
x to step L in one shot, run the reverse chain back to the clean image, clamp to [0,1]; the anomaly map is
``|x - x_rec|`` and the score its mean. ``noise_type='simplex'`` gives AnoDDPM: simplex noise in training, in
the partial noising and in every reverse step (MONAI's own ``step`` draws Gaussian noise, so the reverse step is
written in :mod:`model_zoo.diffusion.procedures` from the scheduler's betas).

Fewer-step inference is labelled: ``inference='strided'`` runs the DDPM posterior over ``inference_steps``
evenly spaced steps from L to 0, ``'ddim'`` the deterministic DDIM update over the same steps; ``'ddpm'`` (the
reference) calls the network L+1 times. Measured once on a small, briefly trained model (32x32 MNI slices, 606
steps, L=250, CPU): strided/DDIM reconstructions with 10-100 steps differ from the full chain (same noising
draw) by MAE 0.040-0.055, less than two full-chain runs with different seeds differ (0.069); DDIM's
reconstruction error is lower (0.064 vs 0.086) as it adds no noise on the way back. That is a different
operating point: take thresholds from the same inference setting as the evaluation.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.diffusion.noise import NOISE_TYPES, DiffusionNoise, NoiseType
from model_zoo.diffusion.procedures import (
    INFERENCE_METHODS,
    InferenceMethod,
    Schedule,
    inference_timesteps,
    partial_diffusion,
    q_sample,
)

logger = logging.getLogger(__name__)

AutocastDtype = Literal["auto", "bfloat16", "float16", "float32"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
_AUTOCAST_DTYPES = get_args(AutocastDtype)


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


class DDPM(AnomalyModel):
    """Denoising diffusion model for anomaly detection by partial diffusion (DDPM, AnoDDPM).

    Args:
        in_channels: image channels (1).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups, use_flash_attention:
            ``DiffusionModelUNet`` parameters (defaults: the reference (128,256,256), (False,True,True), 1, 256,
            32; flash/SDPA attention off).
        num_train_timesteps, beta_start, beta_end: the linear schedule (reference 1000, 1e-4, 2e-2).
        x0_clip: range the predicted x0 is clipped to in every reverse step (reference [-1, 1]), or None.
        noise_type: ``'gaussian'`` (DDPM) or ``'simplex'`` (AnoDDPM), used in training and inference.
        simplex_octaves, simplex_persistence, simplex_frequency: simplex fractal (reference 6, 0.8, 64).
        noise_per_image: simplex: one field per image (True) or per batch (False, the reference).
        noise_level: L, the partial-diffusion step (reference 250).
        inference: ``'ddpm'`` (full chain, L+1 network calls), ``'strided'`` or ``'ddim'``
            (``inference_steps`` calls).
        inference_steps: network calls for ``'strided'``/``'ddim'``.
        ddim_eta: DDIM stochasticity (0 = deterministic after the noising).
        val_noise_level, val_inference, val_inference_steps: the (cheaper) setting of
            :meth:`validation_losses`; ``val_noise_level=None`` uses ``noise_level``.
        val_seed: seed of the fixed generator :meth:`validation_losses` uses when none is given.
        autocast_dtype: network forward precision; ``'auto'`` = bfloat16 on CUDA, float32 elsewhere.
        channels_last: keep the UNet and its inputs in channels-last memory format.
        torch_compile: run the UNet through ``torch.compile`` (built lazily, kept out of the state dict).
        compile_mode: ``torch.compile`` mode; ``'reduce-overhead'`` replays CUDA graphs, which removes the
            per-call launch overhead that dominates batch-1 inference on a GPU.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: tuple[int, ...] = (128, 256, 256),
        attention_levels: tuple[bool, ...] = (False, True, True),
        num_res_blocks: int = 1,
        num_head_channels: int | tuple[int, ...] = 256,
        norm_num_groups: int = 32,
        use_flash_attention: bool = False,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        x0_clip: tuple[float, float] | None = (-1.0, 1.0),
        noise_type: NoiseType = "gaussian",
        simplex_octaves: int = 6,
        simplex_persistence: float = 0.8,
        simplex_frequency: float = 64.0,
        noise_per_image: bool = True,
        noise_level: int = 250,
        inference: InferenceMethod = "ddpm",
        inference_steps: int = 50,
        ddim_eta: float = 0.0,
        val_noise_level: int | None = None,
        val_inference: InferenceMethod = "ddim",
        val_inference_steps: int = 25,
        val_seed: int = 0,
        autocast_dtype: AutocastDtype = "auto",
        channels_last: bool = False,
        torch_compile: bool = False,
        compile_mode: CompileMode = "default",
    ) -> None:
        super().__init__()
        _check_choice("noise_type", noise_type, NOISE_TYPES)
        _check_choice("inference", inference, INFERENCE_METHODS)
        _check_choice("val_inference", val_inference, INFERENCE_METHODS)
        _check_choice("autocast_dtype", autocast_dtype, _AUTOCAST_DTYPES)
        if len(channels) != len(attention_levels):
            raise ValueError(f"channels {tuple(channels)} and attention_levels {tuple(attention_levels)} "
                             "must have the same length")
        if not 0 <= noise_level < num_train_timesteps:
            raise ValueError(f"noise_level={noise_level} must be in [0, num_train_timesteps={num_train_timesteps})")
        if val_noise_level is not None and not 0 <= val_noise_level < num_train_timesteps:
            raise ValueError(f"val_noise_level={val_noise_level} must be in [0, {num_train_timesteps})")
        if x0_clip is not None and not x0_clip[0] < x0_clip[1]:
            raise ValueError(f"x0_clip={x0_clip!r} must be (low, high) with low < high")
        # Check the step counts now (they only matter for strided/ddim), not at the first evaluation.
        inference_timesteps(noise_level, inference, inference_steps)
        inference_timesteps(noise_level if val_noise_level is None else val_noise_level, val_inference,
                            val_inference_steps, names=("val_noise_level (or noise_level)", "val_inference_steps"))

        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=in_channels, out_channels=in_channels, channels=tuple(channels),
            attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels if isinstance(num_head_channels, int) else tuple(num_head_channels),
            norm_num_groups=norm_num_groups, use_flash_attention=use_flash_attention,
        )
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        clip_min, clip_max = (-1.0, 1.0) if x0_clip is None else x0_clip
        # MONAI's scheduler holds the schedule (and serves as the reference step in tests); the reverse steps are
        # model_zoo.diffusion.procedures' (same formulas, noise of the model's type).
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule="linear_beta", beta_start=beta_start, beta_end=beta_end,
            prediction_type="epsilon", clip_sample=x0_clip is not None, clip_sample_min=clip_min,
            clip_sample_max=clip_max,
        )
        self.schedule = Schedule.from_betas(self.scheduler.betas)
        # Non-persistent: follows .to(device) for per-image training steps, stays out of checkpoints.
        self.register_buffer("alphas_cumprod", torch.tensor(self.schedule.alphas_cumprod, dtype=torch.float32),
                             persistent=False)
        self.noise = DiffusionNoise(noise_type=noise_type, octaves=simplex_octaves, persistence=simplex_persistence,
                                    frequency=simplex_frequency, per_image=noise_per_image)
        self.num_train_timesteps = num_train_timesteps
        self.x0_clip = None if x0_clip is None else (float(x0_clip[0]), float(x0_clip[1]))
        self.noise_level = noise_level
        self.inference = inference
        self.inference_steps = inference_steps
        self.ddim_eta = ddim_eta
        self.val_noise_level = noise_level if val_noise_level is None else val_noise_level
        self.val_inference = val_inference
        self.val_inference_steps = val_inference_steps
        self.val_seed = val_seed
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.torch_compile = torch_compile
        if compile_mode not in get_args(CompileMode):
            raise ValueError(f"compile_mode: {compile_mode!r} is not one of "
                             f"{', '.join(repr(m) for m in get_args(CompileMode))}")
        self.compile_mode = compile_mode
        # The compiled UNet shares the UNet's parameters; stored outside the module registry so it is neither
        # a submodule nor part of the state dict.
        object.__setattr__(self, "_compiled_unet", None)

    @property
    def inference_label(self) -> str:
        """What :meth:`get_anomaly` computes, for run manifests and reports (fewer-step inference is labelled)."""
        calls = len(inference_timesteps(self.noise_level, self.inference, self.inference_steps))
        kind = {"ddpm": "full DDPM chain", "strided": "strided DDPM (approximation)",
                "ddim": f"DDIM eta={self.ddim_eta:g} (approximation)"}[self.inference]
        return (f"{self.noise.noise_type} noise, partial diffusion from L={self.noise_level}, {kind}, "
                f"{calls} network calls")

    def __getstate__(self) -> dict[str, Any]:
        # copies (EMA, pickling) rebuild the compiled UNet lazily rather than sharing or copying it
        state = dict(super().__getstate__())
        state["_compiled_unet"] = None
        return state

    # ----------------------------------------------------------------------------------------- network
    def _autocast(self, device: torch.device) -> torch.autocast:
        if self.autocast_dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else None
        else:
            dtype = None if self.autocast_dtype == "float32" else getattr(torch, self.autocast_dtype)
        return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise.

        Args:
            x_t: [B,C,H,W] noisy images.
            t: [B] long steps in [0, T).

        Returns:
            [B,C,H,W] float32 noise prediction.
        """
        net = self.unet
        if self.torch_compile:
            if self._compiled_unet is None:
                object.__setattr__(self, "_compiled_unet", torch.compile(self.unet, mode=self.compile_mode))
            net = self._compiled_unet
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        graphs = self.torch_compile and self.compile_mode == "reduce-overhead"
        if graphs:  # a CUDA-graph replay overwrites its output buffer: mark the step and copy the result out
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast(x_t.device):
            out = net(x_t, timesteps=t)
        return out.float().clone() if graphs else out.float()

    # ----------------------------------------------------------------------------------------- training
    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Noise-prediction MSE at one uniformly drawn step per image (global RNG, seeded by the trainer).

        Returns:
            ``{'noise_mse': scalar}``.
        """
        x = batch.image
        t = torch.randint(0, self.num_train_timesteps, (x.shape[0],), device=x.device)
        noise = self.noise.sample(x, t)
        x_t = q_sample(x, t, noise, self.alphas_cumprod)
        return {"noise_mse": F.mse_loss(self.eps(x_t, t), noise)}

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Same as :meth:`training_losses` (so a DDP wrapper's ``forward`` does the training step)."""
        return self.training_losses(batch)

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def reconstruct(
        self,
        x: Tensor,
        *,
        noise_level: int | None = None,
        inference: InferenceMethod | None = None,
        inference_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Partial-diffusion reconstruction, clamped to [0,1].

        Args:
            x: [B,C,H,W] in [0,1].
            noise_level, inference, inference_steps: override the constructor's setting.
            generator: random source on x's device (None: the global RNG).

        Returns:
            [B,C,H,W] pseudo-healthy reconstruction in [0,1].
        """
        method = inference or self.inference
        x_rec = partial_diffusion(
            self.eps, x, noise_level=self.noise_level if noise_level is None else noise_level,
            schedule=self.schedule, noise=self.noise, generator=generator, method=method,
            steps=inference_steps or self.inference_steps, clip=self.x0_clip, eta=self.ddim_eta,
        )
        return x_rec.clamp(0.0, 1.0)

    @torch.no_grad()
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Map ``|x - x_rec|`` and score (its mean) from partial diffusion at ``noise_level``.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
        """
        x_rec = self.reconstruct(x, generator=generator)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Partial-diffusion reconstruction error at the validation setting with a fixed generator.

        Returns:
            ``{'recon_mae', 'recon_mse'}`` scalars (lower is better).
        """
        x = batch.image
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        x_rec = self.reconstruct(x, noise_level=self.val_noise_level, inference=self.val_inference,
                                 inference_steps=self.val_inference_steps, generator=generator)
        diff = x_rec - x
        return {"recon_mae": diff.abs().mean(), "recon_mse": diff.pow(2).mean()}
