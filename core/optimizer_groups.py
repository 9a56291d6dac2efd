"""Named optimizers for one model, driven by the Trainer: the one optimisation path of every model.

A model that declares nothing trains as one group, ``model``, holding its trainable parameters (the trainer
back-propagates the weighted sum of its ``training_losses`` on it). A model with several networks (GANs, Soft-Intro
VAEs, inpainting pipelines) opts in to several groups by returning named, disjoint parameter subsets from
:meth:`model_zoo.base.TrainableModel.optimizer_groups` and implementing
:meth:`~model_zoo.base.TrainableModel.training_step`, which receives a :class:`StepContext` per batch and runs its
own sub-steps through it::

    def training_step(self, batch, ctx):
        with ctx.frozen_except("critic"), ctx.autocast():
            critic_loss = ...
        ctx.backward_step("critic", critic_loss)          # zero grads, backward, clip, step, scheduler
        if ctx.step % self.n_critic == 0:                  # adversarial alternation is a model setting
            with ctx.frozen_except("generator"), ctx.autocast():
                generator_loss = ...
            ctx.backward_step("generator", generator_loss)
        return {"critic": critic_loss.detach(), "generator": ...}

YAML (the ``trainer.params`` block): ``optimizer`` and ``lr_scheduler`` are the defaults of every group,
``optimizers.<group>`` overrides them per group (``lr_scheduler: null`` switches a group's scheduler off)::

    optimizer: {module_name: torch.optim, class_name: Adam, params: {lr: 1.0e-4, betas: [0.5, 0.999]}}
    lr_scheduler: {module_name: torch.optim.lr_scheduler, class_name: MultiStepLR, params: {milestones: [100]}}
    optimizers:
      critic: {optimizer: {module_name: torch.optim, class_name: Adam, params: {lr: 4.0e-4}}}
      generator: {lr_scheduler: null}

Per group: one optimizer, one scheduler (stepped per epoch, or after each of that group's optimizer steps with
``lr_scheduler_interval: step``; ReduceLROnPlateau only with the monitored validation value), one GradScaler
(fp16 only) and gradient clipping over the group's parameters. The checkpoint holds every group's optimizer,
scheduler and scaler state under ``optimizers``/``schedulers``/``scalers`` (keyed by group name).

Distributed: a model with its own groups is not wrapped in DistributedDataParallel (a sub-step's backward would
not synchronise the right parameters); instead (``synchronise=True``) parameters and buffers are broadcast from
rank 0 at construction, buffers again before every batch (as DDP's ``broadcast_buffers``), and each group's
gradients are averaged over the ranks with one all-reduce per sub-step before its optimizer step. The one default
group of any other model is DDP-wrapped by the trainer, which then synchronises (``synchronise=False``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from core.Configurator import build, check_keys, is_enabled, resolve_class
from dl_utils.checkpoint import DEFAULT_GROUP
from dl_utils.distributed import is_distributed

logger = logging.getLogger(__name__)

GROUP_KEYS = ("optimizer", "lr_scheduler")
__all__ = ["DEFAULT_GROUP", "GROUP_KEYS", "OptimizerGroups", "StepContext"]


class OptimizerGroups:
    """One optimizer, scheduler and gradient scaler per named parameter group of a model.

    Args:
        model: the model (already on ``device``).
        groups: named parameter lists, ``model.optimizer_groups()`` or ``{DEFAULT_GROUP: trainable parameters}``;
            together they must hold every trainable parameter of ``model`` and no frozen one.
        default_optimizer: optimizer block used by every group without its own.
        default_scheduler: scheduler block used by every group without its own (None = no scheduler).
        overrides: ``trainer.params.optimizers``: ``{group: {optimizer?, lr_scheduler?}}``.
        scheduler_interval: ``'epoch'`` or ``'step'`` (each group's own optimizer steps).
        amp_dtype: autocast dtype or None; fp16 enables a GradScaler per group.
        device: the training device.
        grad_clip_norm: clip each group's gradient 2-norm to this before its step; None = no clipping.
        synchronise: under ``torchrun``, broadcast rank 0's parameters and buffers and average each group's
            gradients over the ranks (False: a DistributedDataParallel wrapper does it).

    Raises:
        ValueError: overlapping groups, a frozen parameter in a group, a trainable parameter in no group, or an
            override naming an unknown group (the message lists the model's groups).
    """

    def __init__(self, *, model: nn.Module, groups: Mapping[str, list[nn.Parameter]],
                 default_optimizer: dict[str, Any], default_scheduler: dict[str, Any] | None,
                 overrides: Mapping[str, Any] | None, scheduler_interval: str, amp_dtype: torch.dtype | None,
                 device: torch.device, grad_clip_norm: float | None, synchronise: bool = True) -> None:
        self.params: dict[str, list[nn.Parameter]] = {name: list(params) for name, params in groups.items()}
        self._check_partition(model)
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise ValueError(f"trainer.params.optimizers: unknown group(s) {unknown}; {type(model).__name__} "
                             f"declares {list(self.params)}")
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.scheduler_interval, self.grad_clip_norm = scheduler_interval, grad_clip_norm
        self.synchronise = synchronise and is_distributed()
        self.optimizers: dict[str, Optimizer] = {}
        self.schedulers: dict[str, LRScheduler | None] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        for name, params in self.params.items():
            path = f"trainer.params.optimizers.{name}"
            block = check_keys(overrides.get(name), GROUP_KEYS, path)
            own = block.get("optimizer") is not None  # a group without its own block reports the default's path
            self.optimizers[name] = self._build_optimizer(block["optimizer"] if own else default_optimizer, params,
                                                          f"{path}.optimizer" if own else "trainer.params.optimizer")
            own = "lr_scheduler" in block
            sched_block = block["lr_scheduler"] if own else default_scheduler
            self.schedulers[name] = None
            if sched_block is not None and is_enabled(sched_block):
                self.schedulers[name] = build(sched_block, f"{path}.lr_scheduler" if own else
                                              "trainer.params.lr_scheduler", base=LRScheduler,
                                              optimizer=self.optimizers[name])
            self.scalers[name] = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if self.synchronise:
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        logger.info("optimizer groups: %s", ", ".join(
            f"{name} ({sum(p.numel() for p in params)} parameters, {type(self.optimizers[name]).__name__}"
            f"{', ' + type(self.schedulers[name]).__name__ if self.schedulers[name] is not None else ''})"
            for name, params in self.params.items()))

    def _check_partition(self, model: nn.Module) -> None:
        if list(self.params) == [DEFAULT_GROUP] and not self.params[DEFAULT_GROUP]:
            raise ValueError(f"{type(model).__name__} has no trainable parameter: there is nothing to train")
        if not self.params or any(not params for params in self.params.values()):
            raise ValueError(f"{type(model).__name__}.optimizer_groups() must return non-empty parameter lists, "
                             f"got sizes { {k: len(v) for k, v in self.params.items()} }")
        owner: dict[int, str] = {}
        for name, params in self.params.items():
            for param in params:
                if id(param) in owner:
                    raise ValueError(f"{type(model).__name__}.optimizer_groups(): a parameter is in both "
                                     f"{owner[id(param)]!r} and {name!r}")
                if not param.requires_grad:
                    raise ValueError(f"{type(model).__name__}.optimizer_groups(): group {name!r} holds a frozen "
                                     "parameter (requires_grad=False); frozen networks belong in no optimizer")
                owner[id(param)] = name
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
        if orphans:
            raise ValueError(f"{type(model).__name__}.optimizer_groups(): trainable parameters in no group "
                             f"(they would never be updated): {orphans[:5]}{' ...' if len(orphans) > 5 else ''}")

    def _build_optimizer(self, block: dict[str, Any], params: list[nn.Parameter], path: str) -> Optimizer:
        if self.device.type == "cuda":
            cls = resolve_class(block, path, base=Optimizer)
            extra = block.get("params") or {}
            if "fused" in inspect.signature(cls.__init__).parameters and "fused" not in extra:
                block = {**block, "params": {**extra, "fused": True}}
        return build(block, path, base=Optimizer, params=params)

    # ------------------------------------------------------------------------------------------ per batch
    def context(self, step: int) -> StepContext:
        """The handle a model's ``training_step`` uses for the batch with global index ``step`` (0-based)."""
        if self.synchronise:  # every rank starts the batch from rank 0's buffers (BN statistics, VQ EMA)
            for buffer in self.model.buffers():
                dist.broadcast(buffer.data, src=0)
        return StepContext(self, step)

    def step_epoch(self) -> None:
        """Step every per-epoch scheduler (not ReduceLROnPlateau) once."""
        if self.scheduler_interval != "epoch":
            return
        for scheduler in self.schedulers.values():
            if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step()

    def step_plateau(self, value: float) -> None:
        """Step every ReduceLROnPlateau scheduler with the monitored validation value."""
        for scheduler in self.schedulers.values():
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(value)

    def learning_rates(self) -> dict[str, float]:
        """``{'lr_<group>': current lr of the group's first param group}`` for logging (``{'lr': ...}`` for the one
        default group)."""
        if list(self.optimizers) == [DEFAULT_GROUP]:
            return {"lr": float(self.optimizers[DEFAULT_GROUP].param_groups[0]["lr"])}
        return {f"lr_{name}": float(opt.param_groups[0]["lr"]) for name, opt in self.optimizers.items()}

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{'optimizers': {...}, 'schedulers': {...}, 'scalers': {...}}`` keyed by group (None where absent)."""
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: s.state_dict() if s is not None else None for name, s in self.schedulers.items()},
            "scalers": {name: s.state_dict() if s.is_enabled() else None for name, s in self.scalers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        """Restore every group from a checkpoint dict (as written with :meth:`state_dict`).

        Raises:
            KeyError / ValueError: the checkpoint has no or other groups (the trainer turns them into a
                ``CheckpointError`` naming the file).
        """
        saved = state.get("optimizers")
        if not isinstance(saved, Mapping) or set(saved) != set(self.optimizers):
            raise KeyError(f"{source} holds optimizer groups {sorted(saved) if isinstance(saved, Mapping) else None}"
                           f", this model has {sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved[name])
            scheduler_state = (state.get("schedulers") or {}).get(name)
            if self.schedulers[name] is not None:
                if scheduler_state is None:
                    logger.warning("%s has no scheduler state for group %r: it starts afresh", source, name)
                else:
                    self.schedulers[name].load_state_dict(scheduler_state)
            scaler_state = (state.get("scalers") or {}).get(name)
            if self.scalers[name].is_enabled() and scaler_state is not None:
                self.scalers[name].load_state_dict(scaler_state)


class StepContext:
    """What a model's ``training_step`` uses to run its sub-steps for one batch.

    Attributes:
        step: global index of this batch (0-based, counts batches, not sub-steps); alternation such as
            "the generator every 5th batch" is ``step % 5 == 0``.
        loss: sum of the (float32) losses back-propagated so far in this batch; the trainer logs it as
            ``loss`` and stops on a non-finite value.
    """

    def __init__(self, groups: OptimizerGroups, step: int) -> None:
        self._groups = groups
        self.step = step
        self.loss = torch.zeros((), device=groups.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The trainer's autocast (bf16/fp16 or a no-op) for the forward passes of a sub-step."""
        dtype = self._groups.amp_dtype
        return torch.autocast(self._groups.device.type, dtype=dtype, enabled=dtype is not None)

    @contextlib.contextmanager
    def frozen_except(self, *names: str) -> Iterator[None]:
        """Turn ``requires_grad`` off for every group not in ``names`` inside the block (restored after).

        Gradients still flow *through* the frozen networks to the trainable ones; only their own parameters get
        no gradient. Their layers stay in the model's mode (train mode by default; the reference study trained
        every model in eval mode, see ``trainer.params.model_mode``); passes that must not move BatchNorm
        running statistics are the model's business (``model_zoo.batchnorm.keep_running_stats``).
        """
        unknown = [n for n in names if n not in self._groups.params]
        if unknown:
            raise KeyError(f"unknown optimizer group(s) {unknown}; groups: {list(self._groups.params)}")
        frozen = [p for name, params in self._groups.params.items() if name not in names for p in params]
        for param in frozen:
            param.requires_grad_(False)
        try:
            yield
        finally:
            for param in frozen:
                param.requires_grad_(True)

    def backward_step(self, name: str, loss: Tensor) -> None:
        """One optimizer step of group ``name`` on ``loss``.

        Zeroes the group's gradients, back-propagates ``loss`` (scaled under fp16), averages the group's gradients
        over the ranks, unscales and clips them, steps the optimizer and its scaler, zeroes the gradients again
        and steps the group's per-step scheduler. Gradients that ``loss`` leaves in other groups are discarded by
        their own next ``backward_step``.

        Args:
            name: a group of ``optimizer_groups()``.
            loss: scalar tensor; its graph is freed.
        """
        groups = self._groups
        if name not in groups.optimizers:
            raise KeyError(f"unknown optimizer group {name!r}; groups: {list(groups.optimizers)}")
        optimizer, scaler, params = groups.optimizers[name], groups.scalers[name], groups.params[name]
        if loss.ndim != 0:
            raise ValueError(f"backward_step({name!r}): the loss must be a scalar, got shape {tuple(loss.shape)}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.float()).backward()
        if groups.synchronise:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                flat = torch.cat([g.flatten() for g in grads])
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                for grad, synced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                    grad.copy_(synced.view_as(grad))
        if groups.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, groups.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler = groups.schedulers[name]
        if groups.scheduler_interval == "step" and scheduler is not None and not isinstance(scheduler,
                                                                                            ReduceLROnPlateau):
            scheduler.step()
        self.loss = self.loss + loss.detach().float()
