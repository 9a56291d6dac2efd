"""Clean BatchNorm running statistics for methods that also pass non-real images through their networks.

A Soft-Intro VAE, RA, PHANES or WGAN-GP step runs its networks on more than the batch of real images: prior samples
``D(eps)``, re-encodings of reconstructions and fakes, their decodings, a critic's fakes and gradient-penalty
interpolates. In train mode every such pass would also move the BatchNorm running statistics, which are what the
network normalises with at validation and test time, so the evaluated network would be normalised by an average over
image kinds it never sees there. Wrap those passes in :func:`keep_running_stats`: inside the block the layers still
normalise with the batch's own statistics and every gradient is unchanged; only the running averages (and the batch
counters) are put back to their values from before the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def keep_running_stats(*modules: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``modules`` leave the block with the running statistics they entered it with.

    Only layers that track running statistics are touched. Inside the block their momentum is 0, so a train-mode
    pass blends its batch statistics in with weight 0 (``running = 1 * running + 0 * batch``, exact) and the
    buffers are never overwritten (autograd keeps them for the backward pass, which forbids copying over them);
    the batch counters are put back afterwards. The forward passes normalise exactly as without the block (batch
    statistics in train mode, running statistics in eval mode), so losses and gradients are the same.
    """
    layers = {id(m): m for module in modules for m in module.modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats}
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in layers.values()]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)
