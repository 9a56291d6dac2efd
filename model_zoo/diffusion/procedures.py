"""Diffusion procedures MONAI lacks: closed-form noising to a step, reverse steps with a chosen noise type,
partial diffusion (strided DDPM / DDIM), and RePaint re-sampling inside a mask.

Timestep convention (MONAI's): a sample "at step t" (0 <= t < T) is ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``
with ``abar_t = prod_{s<=t} (1 - beta_s)``; the reverse step at t produces the sample at an earlier step
``t_prev``, where step -1 is the clean image (``abar_{-1} = 1``). Partial diffusion from L therefore runs the
network at L, L-1, ..., 0: L+1 calls.

Step coefficients are Python floats computed in float64 from the scheduler's schedule, so the loops never read a
device tensor back to the host. Every stochastic draw goes through :class:`~model_zoo.diffusion.noise.
DiffusionNoise` with the caller's ``torch.Generator``, so the same noise type is used everywhere.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.settings import InferenceSetting

logger = logging.getLogger(__name__)

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""``eps_model(x_t [B,C,H,W], t [B] long) -> predicted noise [B,C,H,W]`` (float32)."""


@dataclass(frozen=True)
class Schedule:
    """A noise schedule as float64 host numbers (for step coefficients without device syncs).

    Attributes:
        betas: beta_t for t = 0..T-1.
        alphas_cumprod: abar_t for t = 0..T-1.
    """

    betas: tuple[float, ...]
    alphas_cumprod: tuple[float, ...]

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        """Build from a [T] beta tensor (e.g. a MONAI scheduler's ``betas``), cumulated in float64."""
        b = betas.detach().to("cpu", torch.float64)
        return cls(betas=tuple(b.tolist()), alphas_cumprod=tuple(torch.cumprod(1.0 - b, dim=0).tolist()))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def abar(self, t: int) -> float:
        """abar_t, with abar_{-1} = 1 (the clean image)."""
        return 1.0 if t < 0 else self.alphas_cumprod[t]


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Closed-form forward noising with a per-image step (training).

    Args:
        x0: [B,C,H,W] clean images.
        t: [B] long steps in [0, T).
        noise: [B,C,H,W] noise of the model's type.
        alphas_cumprod: [T] abar on x0's device.

    Returns:
        [B,C,H,W] ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.
    """
    abar = alphas_cumprod[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def noise_to(x0: Tensor, t: int, noise: Tensor, schedule: Schedule) -> Tensor:
    """Closed-form noising of a whole batch to step ``t`` (``t = -1`` returns x0 unchanged)."""
    abar = schedule.abar(t)
    return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise


def predict_x0(x_t: Tensor, eps: Tensor, abar_t: float, clip: tuple[float, float] | None) -> Tensor:
    """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, clipped to ``clip`` when given."""
    x0 = (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
    return x0 if clip is None else x0.clamp(clip[0], clip[1])


def reverse_step(
    eps_model: EpsModel,
    x_t: Tensor,
    t: int,
    t_prev: int,
    *,
    schedule: Schedule,
    noise: DiffusionNoise,
    generator: torch.Generator | None = None,
    method: Literal["ddpm", "ddim"] = "ddpm",
    clip: tuple[float, float] | None = (-1.0, 1.0),
    eta: float = 0.0,
) -> Tensor:
    """One reverse step from step ``t`` to ``t_prev`` (< t; -1 is the clean image).

    ``'ddpm'``: sample the posterior q(x_{t_prev} | x_t, x0_hat) of the (possibly strided) chain, i.e. with
    ``beta = 1 - abar_t / abar_prev``; for ``t_prev = t - 1`` this is Ho et al.'s step with the "fixed small"
    variance (MONAI's ``DDPMScheduler.step``), but the added noise is of the model's type (Gaussian or simplex
    at step t). ``'ddim'``: Song et al.'s update with ``eta`` (0: deterministic).

    Args:
        eps_model: the noise predictor.
        x_t: [B,C,H,W] sample at step t.
        t, t_prev: the current and the target step.
        schedule, noise, generator: the schedule, the noise type, the random source (on x_t's device).
        method: ``'ddpm'`` or ``'ddim'``.
        clip: range to clip the predicted x0 to (the reference: [-1, 1]), or None.
        eta: DDIM stochasticity.

    Returns:
        [B,C,H,W] sample at step t_prev.
    """
    if not -1 <= t_prev < t:
        raise ValueError(f"reverse_step: need -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
    a_t, a_prev = schedule.abar(t), schedule.abar(t_prev)
    eps = eps_model(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long))
    x0 = predict_x0(x_t, eps, a_t, clip)
    if method == "ddpm":
        alpha = a_t / a_prev
        beta = 1.0 - alpha
        mean = (math.sqrt(a_prev) * beta / (1.0 - a_t)) * x0 + (math.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)) * x_t
        if t_prev < 0:
            return mean
        variance = max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
        return mean + math.sqrt(variance) * noise.sample(x_t, t, generator=generator)
    if method == "ddim":
        std = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - std * std, 0.0)) * eps
        if std > 0 and t_prev >= 0:
            x_prev = x_prev + std * noise.sample(x_t, t, generator=generator)
        return x_prev
    raise ValueError(f"reverse_step: method {method!r} is not one of 'ddpm', 'ddim'")


def denoise(
    eps_model: EpsModel,
    x_t: Tensor,
    timesteps: Sequence[int],
    *,
    schedule: Schedule,
    noise: DiffusionNoise,
    generator: torch.Generator | None = None,
    method: Literal["ddpm", "ddim"] = "ddpm",
    clip: tuple[float, float] | None = (-1.0, 1.0),
    eta: float = 0.0,
) -> Tensor:
    """Run the reverse chain through ``timesteps`` (descending, first = the step of ``x_t``) to the clean image.

    Returns:
        [B,C,H,W] the denoised sample (step -1), not clamped.
    """
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_t = reverse_step(eps_model, x_t, t, t_prev, schedule=schedule, noise=noise, generator=generator,
                           method=method, clip=clip, eta=eta)
    return x_t


def partial_diffusion(
    eps_model: EpsModel,
    x: Tensor,
    *,
    setting: InferenceSetting,
    schedule: Schedule,
    noise: DiffusionNoise,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> Tensor:
    """AnoDDPM-style reconstruction: noise x to step L in one shot, then denoise back to step -1.

    Args:
        eps_model: the noise predictor.
        x: [B,C,H,W] images in [0,1].
        setting: sampler, L (in [0, T)), steps and eta; the network is called at ``setting.timesteps``
            (``setting.network_calls`` calls).
        schedule, noise, generator, clip: as in :func:`reverse_step`.

    Returns:
        [B,C,H,W] reconstruction (not clamped).
    """
    setting.check_noise_level(schedule.num_steps)
    level = setting.noise_level
    x_t = noise_to(x, level, noise.sample(x, level, generator=generator), schedule)
    step_method: Literal["ddpm", "ddim"] = "ddim" if setting.sampler == "ddim" else "ddpm"
    return denoise(eps_model, x_t, setting.timesteps, schedule=schedule, noise=noise, generator=generator,
                   method=step_method, clip=clip, eta=setting.eta)


def repaint(
    eps_model: EpsModel,
    known: Tensor,
    start: Tensor,
    mask: Tensor,
    *,
    noise_level: int,
    resample_steps: int,
    schedule: Schedule,
    noise: DiffusionNoise,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> Tensor:
    """RePaint re-sampling (Lugmayr et al., 2022) of the masked region, as AutoDDPM's step 5.

    ``z`` starts as ``start`` noised to L. For t = L..1 (docs/methods.md#autoddpm; the study's loop), repeated U
    times: the known image noised to t-1, one DDPM reverse step of z from t to t-1,
    ``z = mask * z_unknown + (1 - mask) * known_{t-1}``; between repeats z jumps back to step t with
    ``z = sqrt(1 - beta_t) z + sqrt(beta_t) eps``. Network calls: L * U. The loop ends at step 0 (MONAI's
    convention: one step of noise, std sqrt(beta_0) = 0.01 for the reference schedule, remains), where the
    study's last pass stitches in the clean known image without a network call: the result is
    ``mask * z_0 + (1 - mask) * known``.

    Args:
        eps_model: the noise predictor.
        known: [B,C,H,W] the image whose unmasked part is kept (x).
        start: [B,C,H,W] the image the masked part starts from (AutoDDPM: x_rec).
        mask: [B,1 or C,H,W] in {0,1}; 1 = re-sample.
        noise_level: L >= 1 (AutoDDPM's L_i, default 50).
        resample_steps: U >= 1.
        schedule, noise, generator, clip: as in :func:`reverse_step`.

    Returns:
        [B,C,H,W] the in-painted image, not clamped; equal to ``known`` where mask is 0.
    """
    if not 1 <= noise_level < schedule.num_steps:
        raise ValueError(f"in-painting noise level must be in [1, {schedule.num_steps}), got {noise_level}")
    if resample_steps < 1:
        raise ValueError(f"resample_steps must be >= 1, got {resample_steps}")
    z = noise_to(start, noise_level, noise.sample(start, noise_level, generator=generator), schedule)
    for t in range(noise_level, 0, -1):
        t_prev = t - 1
        beta = 1.0 - schedule.abar(t) / schedule.abar(t_prev)
        for u in range(resample_steps):
            known_prev = noise_to(known, t_prev, noise.sample(known, t_prev, generator=generator), schedule)
            unknown = reverse_step(eps_model, z, t, t_prev, schedule=schedule, noise=noise, generator=generator,
                                   method="ddpm", clip=clip)
            z = mask * unknown + (1.0 - mask) * known_prev
            if u < resample_steps - 1:
                z = math.sqrt(1.0 - beta) * z + math.sqrt(beta) * noise.sample(z, t, generator=generator)
    return mask * z + (1.0 - mask) * known
