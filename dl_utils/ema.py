"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class EMA:
    """A frozen copy of a model whose floating-point weights follow ``ema = decay * ema + (1 - decay) * live``.

    Parameters and floating-point buffers are averaged; other buffers (integer counters) are copied.
    ``module`` is a deep copy of the model in eval mode without gradients; the trainer validates it and
    saves its ``state_dict`` as the checkpoint's ``'ema'`` entry (same keys as the model's).

    Args:
        model: the live model (not wrapped in DDP or ``torch.compile``), already on its device: moving it
            or replacing its parameter tensors afterwards would detach it from the EMA.
        decay: in [0, 1); 0.999 is typical. 0 makes the EMA a plain copy of the live weights.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` (0-based; the schedule of
            ``tf.train.ExponentialMovingAverage``'s ``num_updates``), so the average forgets the initial weights
            quickly in a short run instead of carrying them for ~1 / (1 - decay) steps.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        # Pairs of (EMA, live) tensors, built once: state_dict tensors share storage with the parameters,
        # which optimizers and load_state_dict update in place. Rebuilt if another module is passed.
        self._source = model
        self._cached = self._pairs(model)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        live = model.state_dict()
        shadow = self.module.state_dict()
        if live.keys() != shadow.keys():
            raise ValueError("EMA copy and model have different state_dict keys")
        avg_s, avg_l, copy_s, copy_l = [], [], [], []
        for key, value in live.items():
            if value.dtype.is_floating_point:
                avg_s.append(shadow[key])
                avg_l.append(value.detach())
            else:
                copy_s.append(shadow[key])
                copy_l.append(value.detach())
        return avg_s, avg_l, copy_s, copy_l

    def decay_at(self, n: int) -> float:
        """The decay of update ``n`` (0-based): ``decay``, or its warm-up value."""
        if n < 0:
            raise ValueError(f"update index must be >= 0, got {n}")
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int = 0) -> None:
        """One EMA step from the live ``model`` (call after each optimizer step; ``step``: the number of
        updates before this one, which sets the warm-up decay; the trainer passes its global step, so a resumed
        run continues the schedule)."""
        if model is not self._source:
            self._source, self._cached = model, self._pairs(model)
        avg_s, avg_l, copy_s, copy_l = self._cached
        if avg_s:
            # lerp: s + (1 - decay) * (l - s) == decay * s + (1 - decay) * l
            torch._foreach_lerp_(avg_s, avg_l, 1.0 - self.decay_at(step))
        for shadow, live in zip(copy_s, copy_l, strict=True):
            shadow.copy_(live)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like the model's ``state_dict`` (a view: clone before keeping)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Strictly load averaged weights (as saved by :meth:`state_dict`)."""
        self.module.load_state_dict(state, strict=True)
