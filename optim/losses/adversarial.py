"""Adversarial loss helpers: the WGAN-GP gradient penalty (Gulrajani et al., 2017)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *,
                     alpha: Tensor | None = None) -> Tensor:
    """``mean_b (||grad_x~ critic(x~)||_2 - 1)^2`` on random interpolates ``x~ = alpha x + (1 - alpha) fake``.

    Computed in float32 with autocast off and ``create_graph=True`` (double backward), so it stays exact under
    AMP. The gradient is taken of the *unscaled* critic output, so no GradScaler unscaling is involved; the
    returned penalty is then added to the critic loss and scaled with it.

    Args:
        critic: maps [B,C,H,W] to [B] or [B,1] scores.
        real: [B,C,H,W] real images.
        fake: [B,C,H,W] generated images (detached by the caller).
        alpha: [B,1,1,1] interpolation weights in [0,1]; None = drawn U(0,1) per image from the global RNG.

    Returns:
        Scalar penalty (float32), differentiable w.r.t. the critic's parameters.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    with torch.autocast(real.device.type, enabled=False):
        mixed = (alpha * real.float() + (1.0 - alpha) * fake.float()).requires_grad_(True)
        scores = critic(mixed).float()
        (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()
