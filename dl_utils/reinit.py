"""Re-initialise layers that a network zero-initialises, so an untrained network gives non-trivial outputs."""

from __future__ import annotations

import torch


def randomize_zero_layers(model: torch.nn.Module, *, seed: int = 0) -> int:
    """Re-initialise (PyTorch default init) every conv/linear layer whose weight is all zero; returns how many.

    MONAI's ``DiffusionModelUNet`` zero-initialises its output convolution (and the last layer of each residual
    and attention block), so a freshly built DDPM predicts eps = 0 whatever the input and precision: a parity
    check on it would compare two identical noise-free chains. Re-initialising those layers gives an untrained
    but non-trivial network.
    """
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and weight is not None and not weight.any():
                module.reset_parameters()
                count += 1
    return count
