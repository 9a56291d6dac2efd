"""DDPM / AnoDDPM: a denoising diffusion model trained on healthy images, scoring by partial diffusion.

Network: MONAI's ``DiffusionModelUNet`` (2-D); schedule: MONAI's ``DDPMScheduler`` (linear betas, epsilon
prediction). Training: MSE between the predicted and the true noise at a uniformly drawn step, with images kept
in [0,1] (as the reference; no rescaling to [-1,1]). Inference ("partial diffusion", Wyatt et al., 2022): noise
x to step L in one shot, run the reverse chain back to the clean image, clamp to [0,1]; the anomaly map is
``|x - x_rec|`` and the score its mean. ``noise: {noise_type: simplex}`` gives AnoDDPM: simplex noise in training,
in the partial noising and in every reverse step (MONAI's own ``step`` draws Gaussian noise, so the reverse step is
written in :mod:`model_zoo.diffusion.procedures` from the scheduler's betas).

Options come in typed sub-blocks (:mod:`model_zoo.diffusion.settings`): ``network``, ``schedule``, ``noise``,
``inference`` and ``val_inference``. An :class:`~model_zoo.diffusion.settings.InferenceSetting` says which sampler
runs from which noise level with how many network calls; :meth:`DDPM.get_anomaly` and :meth:`DDPM.reconstruct` take
one per call (default: the configured ``inference``), so nothing outside the model changes its state.

Fewer-step inference is labelled: ``sampler: strided`` runs the DDPM posterior over ``steps`` evenly spaced steps
from L to 0, ``'ddim'`` the deterministic DDIM update over the same steps; ``'ddpm'`` (the reference) calls the
network L+1 times. Measured once on a small, briefly trained model (32x32 MNI slices, 606
steps, L=250, CPU): strided/DDIM reconstructions with 10-100 steps differ from the full chain (same noising
draw) by MAE 0.040-0.055, less than two full-chain runs with different seeds differ (0.069); DDIM's
reconstruction error is lower (0.064 vs 0.086) as it adds no noise on the way back. That is a different
operating point: take thresholds from the same inference setting as the evaluation.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.procedures import Schedule, partial_diffusion, q_sample
from model_zoo.diffusion.settings import InferenceSetting, ScheduleSetting, UNetSetting

logger = logging.getLogger(__name__)

AutocastDtype = Literal["auto", "bfloat16", "float16", "float32"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
_AUTOCAST_DTYPES = get_args(AutocastDtype)

#: Defaults (frozen, so shared safely): the reference network, schedule and Gaussian noise
#: (docs/methods.md#ddpm-and-anoddpm).
REFERENCE_NETWORK, REFERENCE_SCHEDULE, GAUSSIAN_NOISE = UNetSetting(), ScheduleSetting(), DiffusionNoise()
#: The reference test-time inference: the full DDPM chain from L = 250 (251 network calls).
REFERENCE_INFERENCE = InferenceSetting(sampler="ddpm", noise_level=250)
#: Validation's default sampler: DDIM with 25 network calls (from the test-time noise level when not given).
VAL_SAMPLER, VAL_STEPS = "ddim", 25


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


class DDPM(AnomalyModel):
    """Denoising diffusion model for anomaly detection by partial diffusion (DDPM, AnoDDPM).

    Args:
        network: the ``DiffusionModelUNet`` (default: the reference network).
        schedule: the linear schedule and x0 clipping (reference T = 1000, 1e-4 -> 2e-2, clip [-1, 1]).
        noise: ``DiffusionNoise`` used in training and inference: Gaussian (DDPM) or simplex (AnoDDPM).
        inference: the test-time :class:`InferenceSetting` (sampler, L, steps, eta) of :meth:`get_anomaly`;
            default: the full DDPM chain from L = 250. A call can pass another one.
        val_inference: the (cheaper) setting of :meth:`validation_losses`; None: DDIM with
            ``min(25, L + 1)`` steps from the test-time L.
        val_seed: seed of the fixed generator :meth:`validation_losses` uses when none is given.
        autocast_dtype: network forward precision; ``'auto'`` = bfloat16 on CUDA, float32 elsewhere.
        channels_last: keep the UNet and its inputs in channels-last memory format.
        torch_compile: run the UNet through ``torch.compile`` (built lazily, kept out of the state dict).
        compile_mode: ``torch.compile`` mode; ``'reduce-overhead'`` replays CUDA graphs, which removes the
            per-call launch overhead that dominates batch-1 inference on a GPU.
    """

    #: What the network predicts (MONAI's ``prediction_type``): the noise here, x0 (``'sample'``) in pDDPM.
    prediction_type: ClassVar[str] = "epsilon"

    def __init__(
        self,
        *,
        network: UNetSetting = REFERENCE_NETWORK,
        schedule: ScheduleSetting = REFERENCE_SCHEDULE,
        noise: DiffusionNoise = GAUSSIAN_NOISE,
        inference: InferenceSetting = REFERENCE_INFERENCE,
        val_inference: InferenceSetting | None = None,
        val_seed: int = 0,
        autocast_dtype: AutocastDtype = "auto",
        channels_last: bool = False,
        torch_compile: bool = False,
        compile_mode: CompileMode = "default",
    ) -> None:
        super().__init__()
        _check_choice("autocast_dtype", autocast_dtype, _AUTOCAST_DTYPES)
        _check_choice("compile_mode", compile_mode, get_args(CompileMode))
        if val_inference is None:
            level = inference.noise_level
            val_inference = InferenceSetting(sampler=VAL_SAMPLER, noise_level=level, steps=min(VAL_STEPS, level + 1))
        inference.check_noise_level(schedule.num_train_timesteps, "inference")
        val_inference.check_noise_level(schedule.num_train_timesteps, "val_inference")

        self.unet = network.build()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        clip_min, clip_max = (-1.0, 1.0) if schedule.x0_clip is None else schedule.x0_clip
        # MONAI's scheduler holds the schedule (and serves as the reference step in tests); the reverse steps are
        # model_zoo.diffusion.procedures' (same formulas, noise of the model's type).
        betas = ({"beta_start": schedule.beta_start, "beta_end": schedule.beta_end}
                 if schedule.beta_schedule == "linear_beta" else {})
        self.scheduler = DDPMScheduler(
            num_train_timesteps=schedule.num_train_timesteps, schedule=schedule.beta_schedule, **betas,
            prediction_type=self.prediction_type, clip_sample=schedule.x0_clip is not None,
            clip_sample_min=clip_min, clip_sample_max=clip_max,
        )
        self.schedule = Schedule.from_betas(self.scheduler.betas)
        # Non-persistent: follows .to(device) for per-image training steps, stays out of checkpoints.
        self.register_buffer("alphas_cumprod", torch.tensor(self.schedule.alphas_cumprod, dtype=torch.float32),
                             persistent=False)
        self.network = network
        self.schedule_setting = schedule
        self.noise = noise
        self.num_train_timesteps = schedule.num_train_timesteps
        self.x0_clip = schedule.x0_clip
        self.inference = inference
        self.val_inference = val_inference
        self.val_seed = val_seed
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.torch_compile = torch_compile
        self.compile_mode = compile_mode
        # The compiled UNet shares the UNet's parameters; stored outside the module registry so it is neither
        # a submodule nor part of the state dict.
        object.__setattr__(self, "_compiled_unet", None)

    def network_calls(self, inference: InferenceSetting | None = None) -> int:
        """UNet calls of one :meth:`get_anomaly` call (per batch) under ``inference`` (None: the configured one)."""
        return (inference or self.inference).network_calls

    def counted_network(self) -> nn.Module:
        """The UNet: the evaluation reports its forward calls per image as the method's cost."""
        return self.unet

    def inference_label(self, inference: InferenceSetting | None = None) -> str:
        """What :meth:`get_anomaly` computes under ``inference`` (None: the configured setting), for run manifests
        and reports (fewer-step inference is labelled)."""
        return f"{self.noise.noise_type} noise, {(inference or self.inference).label}"

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
    def _setting(self, inference: InferenceSetting | None) -> InferenceSetting:
        """``inference`` checked against the schedule, or the configured setting."""
        if inference is None:
            return self.inference
        if not isinstance(inference, InferenceSetting):
            raise TypeError(f"inference must be an InferenceSetting, got {type(inference).__name__}")
        inference.check_noise_level(self.num_train_timesteps)
        return inference

    @torch.no_grad()
    def reconstruct(
        self, x: Tensor, *, generator: torch.Generator | None = None, inference: InferenceSetting | None = None
    ) -> Tensor:
        """Partial-diffusion reconstruction, clamped to [0,1]; the mean of ``inference.draws`` of them.

        Args:
            x: [B,C,H,W] in [0,1].
            generator: random source on x's device (None: the global RNG); the draws take it in turn.
            inference: the setting of this call (None: the configured ``inference``).

        Returns:
            [B,C,H,W] pseudo-healthy reconstruction in [0,1].
        """
        setting = self._setting(inference)
        total = self._reconstruct_once(x, generator=generator, setting=setting)
        for _ in range(setting.draws - 1):
            total = total + self._reconstruct_once(x, generator=generator, setting=setting)
        return total / setting.draws

    def _reconstruct_once(self, x: Tensor, *, generator: torch.Generator | None, setting: InferenceSetting) -> Tensor:
        """One partial-diffusion reconstruction [B,C,H,W] in [0,1] (fresh noise from ``generator``)."""
        x_rec = partial_diffusion(self.eps, x, setting=setting, schedule=self.schedule, noise=self.noise,
                                  generator=generator, clip=self.x0_clip)
        return x_rec.clamp(0.0, 1.0)

    @torch.no_grad()
    def get_anomaly(
        self, x: Tensor, *, generator: torch.Generator | None = None, inference: InferenceSetting | None = None
    ) -> AnomalyOutput:
        """Map ``|x - x_rec|`` and score (its mean) from partial diffusion.

        Args:
            x: [B,1,H,W] in [0,1].
            generator: random source on x's device.
            inference: the setting of this call (None: the configured ``inference``).
        """
        x_rec = self.reconstruct(x, generator=generator, inference=inference)
        anomaly_map = (x - x_rec).abs()
        return AnomalyOutput(anomaly_map=anomaly_map, anomaly_score=anomaly_map.mean(dim=(1, 2, 3)),
                             reconstruction=x_rec)

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Reconstruction MAE / MSE under ``val_inference`` (a fixed generator when none is given).

        Returns:
            ``{'recon_mae': scalar, 'recon_mse': scalar}``.
        """
        x = batch.image
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        x_rec = self.reconstruct(x, generator=generator, inference=self.val_inference)
        diff = x_rec - x
        return {"recon_mae": diff.abs().mean(), "recon_mse": diff.pow(2).mean()}
