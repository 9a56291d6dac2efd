"""The model interface: :class:`TrainableModel` (anything the trainer trains) and :class:`AnomalyModel` (a trainable
model that scores anomalies, ``get_anomaly -> AnomalyOutput``), plus the declared capability
:class:`MaskThresholdModel` (a scorer whose mask threshold the evaluation calibrates and passes in per call).

A stage-1 network (f-AnoGAN's WGAN-GP) is a :class:`TrainableModel` only: it trains and checkpoints, and the
evaluation and prediction refuse it. Everything the evaluation asks of a model is declared here, never probed.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from data.batch import Batch


class StepContext(Protocol):
    """The handle a multi-optimizer model's :meth:`TrainableModel.training_step` gets per batch (the trainer's
    ``core.optimizer_groups.StepContext`` implements it; declared here so the library never imports ``core``).

    Attributes:
        step: global index of this batch (0-based); alternation is e.g. ``step % 5 == 0``.
    """

    step: int

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's AMP setting as a context manager."""

    def frozen_except(self, *names: str) -> contextlib.AbstractContextManager:
        """Gradients off for every optimizer group but ``names`` inside the block."""

    def backward_step(self, name: str, loss: Tensor) -> None:
        """Zero, back-propagate ``loss``, all-reduce, clip and step group ``name``."""


@dataclass
class AnomalyOutput:
    """What ``get_anomaly`` returns; all tensors on the input's device.

    Attributes:
        anomaly_map: [B,1,H,W], >= 0, larger is more anomalous.
        anomaly_score: [B], image-level score, larger is more anomalous.
        reconstruction: [B,1,H,W] in [0,1] (the model's pseudo-healthy restoration), or None.
        extras: further named [B,...] tensors for figures (e.g. AutoDDPM's mask and inpainting).
    """

    anomaly_map: Tensor
    anomaly_score: Tensor
    reconstruction: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.anomaly_map.ndim != 4 or self.anomaly_map.shape[1] != 1:
            raise ValueError(f"anomaly_map must be [B,1,H,W], got {tuple(self.anomaly_map.shape)}")
        if self.anomaly_score.shape != self.anomaly_map.shape[:1]:
            raise ValueError(f"anomaly_score must be [B], got {tuple(self.anomaly_score.shape)}")


class TrainableModel(nn.Module, abc.ABC):
    """Base class of everything the trainer trains: a network on healthy data with named loss terms.

    Subclasses implement :meth:`validation_losses` and one of two training interfaces: :meth:`training_losses` (named
    loss terms; the trainer weights, sums and back-propagates them on one optimizer), or, for several networks with
    their own optimizers, :meth:`optimizer_groups` and :meth:`training_step`. A scorer derives from
    :class:`AnomalyModel` instead. Method knobs are keyword-only constructor arguments. Everything stays in torch on
    the input's device.
    """

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Named scalar loss terms for one training batch; the trainer weights and sums them and back-propagates the
        sum on the one optimizer group ``model``. Not implemented by a model with several optimizer groups (it
        implements :meth:`training_step`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither training_losses (one optimizer) nor "
                                  "optimizer_groups() with a training_step (several)")

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """``training_losses(batch)``: the trainer calls the (DDP-wrapped) model so gradients are synchronised."""
        return self.training_losses(batch)

    def on_train_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before each training epoch (also a resumed one) with the 0-based epoch index.

        Default: nothing. Methods whose loss changes with the epoch (MorphAEus' deformation phase and beta ramp)
        record it here; it must not change parameters or buffers, so resuming stays exact.
        """

    @property
    def warmup_steps(self) -> int:
        """Training batches at the start that train another objective than the method's (a warm-up, e.g. SI-VAE's
        plain-VAE phase); 0 (the default) = none. The trainer lets no validation before the warm-up has ended
        choose ``best.pt`` or count towards early stopping, so the evaluated weights are the method's, not the
        warm-up's (a plain VAE reconstructs better than a young Soft-Intro VAE and would always win)."""
        return 0

    def counted_network(self) -> nn.Module | None:
        """The network whose forward calls the evaluation reports as ``network_calls`` per image (e.g. a
        diffusion model's UNet), or None (the default) when calls are not counted."""
        return None

    @abc.abstractmethod
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-batch validation metrics (scalars, lower is better) under no_grad, e.g. a critic's Wasserstein
        estimate; :class:`AnomalyModel` defaults to the reconstruction MAE and MSE.

        The trainer monitors ``val/<key>`` (``trainer.params.monitor``).
        """

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint parameter subsets that get one optimizer each; ``{}`` (default) = one optimizer.

        A model that returns groups trains through :meth:`training_step` (see ``core/optimizer_groups.py``);
        together the groups must hold every trainable parameter, and no frozen one.
        """
        return {}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """One batch of a several-optimizer model: forward passes and ``ctx.backward_step(group, loss)`` calls.

        Args:
            batch: on the training device; ``image`` [B,1,H,W] in [0,1].
            ctx: autocast, ``frozen_except(*groups)``, ``backward_step(group, loss)`` and the batch index.

        Returns:
            Detached scalar terms to log, the same names at every batch (not ``loss``/``lr``, which the trainer
            adds).
        """
        raise NotImplementedError(f"{type(self).__name__} declares optimizer groups but no training_step")

    def provenance(self) -> dict[str, Any]:
        """Where external inputs came from and which backends the outputs rest on; ``{}`` = none.

        E.g. a stage-1 checkpoint and its SHA-256, feature-network weights, or an injected network actually used
        (AutoDDPM's perceptual network: ``{"perceptual": "stlpips/alex ..."}``). Fixed once the model is built
        (networks a model needs are built in its constructor), so every record of it agrees. The trainer stores it
        in every checkpoint as ``'provenance'``, ``Main`` in the manifest, and the evaluation beside every result.
        """
        return {}

    def inference_label(self) -> str | None:
        """What the model's inference computes, in words, for manifests and reports (e.g. a diffusion model's
        sampler and its network calls); None (the default) = nothing beyond the config. Depends on the config only;
        diffusion models also take an optional per-call ``InferenceSetting``."""
        return None


class AnomalyModel(TrainableModel):
    """Base class of a scorer: a generative model trained on healthy data that scores deviations from it.

    Subclasses implement :meth:`training_losses` and :meth:`get_anomaly`; everything the evaluation and prediction
    run requires this class (a :class:`TrainableModel` that is not one is refused with its name).
    """

    @abc.abstractmethod
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """Anomaly map and score for x: [B,1,H,W] in [0,1]."""

    @torch.no_grad()
    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-batch validation metrics (scalars, lower is better); default: reconstruction MAE and MSE.

        The trainer monitors ``val/<key>`` (``trainer.params.monitor``, default ``recon_mae``).
        """
        out = self.get_anomaly(batch.image, generator=generator)
        recon = out.reconstruction if out.reconstruction is not None else batch.image
        diff = recon - batch.image
        return {"recon_mae": diff.abs().mean(), "recon_mse": diff.pow(2).mean()}


class MaskThresholdModel(AnomalyModel):
    """Declared capability: a scorer that thresholds an internal statistic into a mask (AutoDDPM: ``c > tau``), with
    a threshold that may come from healthy data.

    The model keeps only its configured rule; a calibrated value is an input of every call
    (``get_anomaly(x, mask_threshold=...)``), held by whoever runs the model: the evaluation (from its
    ``mask_calibration`` task) and the prediction (from ``mask_threshold.json`` beside the weights), which also
    report where it came from. Nothing sets it on the model.
    """

    @property
    @abc.abstractmethod
    def needs_mask_threshold(self) -> bool:
        """True when the config takes the threshold from healthy data (``tau: calibrated``): every
        :meth:`get_anomaly` then needs ``mask_threshold``. Depends on the config only."""

    @property
    @abc.abstractmethod
    def mask_threshold_rule(self) -> dict[str, Any]:
        """The configured rule, e.g. ``{'rule': 'fixed', 'value': 0.13, 'source': 'config'}``,
        ``{'rule': 'per-image percentile', 'percentile': 95.0}`` or ``{'rule': 'calibrated'}``."""

    @abc.abstractmethod
    def mask_statistic(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The statistic the mask thresholds, [B,1,H,W] >= 0, computed per image exactly as in :meth:`get_anomaly`
        (same generator draws first), so a threshold calibrated on it applies unchanged at test time."""

    @abc.abstractmethod
    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None,
                    mask_threshold: float | None = None) -> AnomalyOutput:
        """Anomaly map and score for x: [B,1,H,W] in [0,1]; ``mask_threshold``: the calibrated threshold (required
        when :attr:`needs_mask_threshold`, refused otherwise)."""
