"""One generic training loop for every model: AMP, EMA, clipping, validation, checkpoints, resume, DDP.

Built from the YAML ``trainer:`` block; options come in typed sub-blocks (``core/trainer_options.py``, each key
checked by the strict builder), and every option also keeps its flat short name (``ema_decay: 0.999`` =
``ema: {decay: 0.999}``)::

    trainer:
      module_name: core.Trainer
      class_name: Trainer
      params:
        max_epochs: 1500
        optimization:
          optimizer: {module_name: torch.optim, class_name: AdamW, params: {lr: 1.0e-4}}
          lr_scheduler: {module_name: torch.optim.lr_scheduler, class_name: CosineAnnealingLR, params: {T_max: 1500}}
        ema: {decay: 0.999}
        execution: {amp: auto}
        early_stopping: {patience: 20}

The loop (:meth:`Trainer.fit`) is: for each epoch, build the train loader seeded with ``run.seed + epoch``
(so the data order is reproducible and a resumed run skips exactly the batches already consumed: they are
loaded and discarded, then the RNG states of the checkpoint are restored), run
:meth:`Trainer.training_step` per batch, log every ``reporting.log_interval`` steps, write ``latest.pt`` every
``checkpoints.every_steps`` steps and at each epoch end, validate every ``validation.interval`` epochs and write
``best.pt`` on improvement.

One optimisation path: every model trains through optimizer groups (``core/optimizer_groups.py``: one optimizer,
scheduler and gradient scaler per group). A model that declares no ``optimizer_groups()`` gets one group,
``model``, holding its trainable parameters, and its step is the weighted sum of ``training_losses`` back-propagated
on that group; a model with several networks (GANs, Soft-Intro VAEs) declares its groups and runs its own
``training_step(batch, ctx)``. One checkpoint format follows: ``optimizers``/``schedulers``/``scalers`` keyed by
group (a checkpoint of the earlier single-optimizer format, ``optimizer``/``scheduler``/``scaler``, still resumes).

Host-device synchronisation happens only at log steps, checkpoints and epoch ends: the non-finite-loss
check accumulates on the device each step and is read there, so a NaN stops training with a
``NonFiniteLossError`` (a ``FloatingPointError``) at the next log step or checkpoint, before any checkpoint
holding NaN weights is written (the last good ``latest.pt``, if any, stays untouched).

Distributed (``torchrun``): a model without its own groups is wrapped in ``DistributedDataParallel`` and called
through its ``forward(batch)`` (which returns ``training_losses(batch)``) so gradients are synchronised; the groups
of a model with its own ``training_step`` average their gradients themselves. Validation, logging and file writes
happen on rank 0; rank 0 broadcasts the monitored value so every rank takes the same early-stopping decision.
Other ranks wait for rank 0 during validation (keep validation shorter than the process-group timeout).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.Configurator import build
from core.optimizer_groups import DEFAULT_GROUP, OptimizerGroups
from core.trainer_options import (
    Checkpointing,
    EarlyStopping,
    EMAOptions,
    Execution,
    Optimization,
    Reporting,
    Validation,
    check_positive,
    nest_flat_options,
)
from data.batch import Batch
from dl_utils import checkpoint as ckpt
from dl_utils.distributed import barrier, is_distributed
from dl_utils.ema import EMA
from dl_utils.errors import NonFiniteLossError
from dl_utils.run import Run
from model_zoo.base import TrainableModel

logger = logging.getLogger(__name__)

# What each optimization.model_mode means, recorded in the manifest (``training_model_mode``) and the report.
MODEL_MODE_LABELS = {
    "train": "train (the model in train mode while training: BatchNorm batch statistics, dropout on)",
    "reference": "reference (the whole model in eval mode while training, as the reference study's trainer: "
                 "BatchNorm with its running statistics, which then never change, dropout off, EMA codebooks frozen)",
}
RESERVED_TERMS = ("loss", "lr")


class TrainData(Protocol):
    """What the trainer needs from ``core.data_module.DataModule``."""

    def train_dataloader(self, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader: ...

    def val_dataloader(self) -> DataLoader | None: ...


class Trainer:
    """Trains a :class:`~model_zoo.base.TrainableModel` on ``data`` and keeps the best weights.

    Args:
        model, data, run: injected by ``Main`` (model, DataModule, :class:`~dl_utils.run.Run`; the trainer logs
            to ``run.logger``). ``data`` may be None and ``run.logger`` unset for a trainer used only for
            :meth:`training_step` (a benchmark, a step sweep); :meth:`fit` and :meth:`train_epoch` then raise a
            ValueError naming the missing one.
        max_epochs: upper bound on epochs.
        max_steps: upper bound on optimizer steps (whichever of the two comes first); null = no bound.
        optimization: optimizer, LR scheduler, per-group overrides, loss weights, clipping, model mode
            (:class:`~core.trainer_options.Optimization`).
        execution: autocast precision, ``torch.compile``, DDP's ``find_unused_parameters``
            (:class:`~core.trainer_options.Execution`).
        ema: EMA of the weights (:class:`~core.trainer_options.EMAOptions`); off by default.
        validation: interval, batches, monitored key (:class:`~core.trainer_options.Validation`).
        early_stopping: patience and minimum improvement (:class:`~core.trainer_options.EarlyStopping`); off by
            default.
        checkpoints: mid-epoch ``latest.pt`` interval (:class:`~core.trainer_options.Checkpointing`).
        reporting: log interval and progress bar (:class:`~core.trainer_options.Reporting`).

    Every sub-block's field also has a flat name in YAML (``core.trainer_options.FLAT_ALIASES``); in Python,
    :meth:`from_options` takes either form as keyword arguments.
    """

    @staticmethod
    def config_aliases(params: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The flat short names moved into their sub-blocks, for the strict builder (``nest_flat_options``)."""
        names = [n for n in inspect.signature(Trainer.__init__).parameters if n not in ("self", "model", "data", "run")]
        return nest_flat_options(params, path, parameters=names)

    def __init__(
        self,
        *,
        model: TrainableModel,
        data: TrainData | None = None,
        run: Run,
        max_epochs: int = 100,
        max_steps: int | None = None,
        optimization: Optimization | None = None,
        execution: Execution | None = None,
        ema: EMAOptions | None = None,
        validation: Validation | None = None,
        early_stopping: EarlyStopping | None = None,
        checkpoints: Checkpointing | None = None,
        reporting: Reporting | None = None,
    ) -> None:
        check_positive("max_epochs", max_epochs, allow_none=False)
        check_positive("max_steps", max_steps)
        opt = optimization or Optimization()
        self.execution = execution or Execution()
        self.ema_options, self.validation = ema or EMAOptions(), validation or Validation()
        self.early_stopping = early_stopping or EarlyStopping()
        self.checkpoints, self.reporting = checkpoints or Checkpointing(), reporting or Reporting()
        reserved = sorted(set(opt.loss_weights or {}) & set(RESERVED_TERMS))
        if reserved:
            raise ValueError(f"loss_weights: {reserved} are reserved names, not loss terms")
        if run.world_size > 1 and not is_distributed():
            raise ValueError(f"run.world_size={run.world_size} but no process group is initialised "
                             "(call dl_utils.distributed.init_distributed first)")

        self.data, self.run = data, run
        self._train_seconds_before: float = 0.0
        self._fit_start: float | None = None
        self.device = torch.device(run.device)
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.optimization = opt
        self.loss_weights = dict(opt.loss_weights or {})
        self.model_mode = opt.model_mode
        self.monitor = self.validation.monitor

        amp = self.execution.amp
        if amp == "auto":
            self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                self.amp_dtype = torch.float16  # pre-Ampere GPUs: fp16 with a GradScaler
        else:
            self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

        self.model = model.to(self.device)
        self.ema = (EMA(self.model, decay=self.ema_options.decay, warmup=self.ema_options.warmup)
                    if self.ema_options.decay is not None else None)
        declared = self.model.optimizer_groups()
        self.model_steps_itself = bool(declared)  # the model runs its own training_step on its declared groups
        if declared:
            self._check_group_options(opt, self.execution)
        elif opt.optimizers:
            raise ValueError(f"trainer.params.optimizers is set but {type(model).__name__} declares no "
                             "optimizer_groups(); use trainer.params.optimizer")
        elif type(model).training_losses is TrainableModel.training_losses:
            raise ValueError(f"{type(model).__name__} implements neither training_losses (one optimizer) nor "
                             "optimizer_groups() with a training_step (several): there is nothing to train")
        self.engine: Any = self.model
        wrapped = run.world_size > 1 and not declared  # DDP averages the gradients of the one default group
        # frozen parameters (a two-stage model's stage-1 networks) belong in no optimizer
        groups = declared or {DEFAULT_GROUP: [p for p in self.model.parameters() if p.requires_grad]}
        self.groups = OptimizerGroups(model=self.model, groups=groups, default_optimizer=opt.optimizer_block,
                                      default_scheduler=opt.lr_scheduler, overrides=opt.optimizers,
                                      scheduler_interval=opt.lr_scheduler_interval, amp_dtype=self.amp_dtype,
                                      device=self.device, grad_clip_norm=opt.grad_clip_norm,
                                      synchronise=not wrapped)
        if wrapped:
            device_ids = None
            if self.device.type == "cuda":
                device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            self.engine = DistributedDataParallel(self.model, device_ids=device_ids,
                                                  find_unused_parameters=self.execution.find_unused_parameters)
        if self.execution.compile:
            self.engine = torch.compile(self.engine)

        # Loop state (saved in checkpoints).
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches of the current epoch already consumed
        self.best_metric: float | None = None
        self.bad_validations = 0
        self.best_weights: dict[str, Tensor] | None = None  # a clone of the weights that scored best
        self.last_val_metrics: dict[str, float] = {}
        self._term_names: list[str] | None = None
        self._reset_step_stats()

    # ------------------------------------------------------------------------------------------ setup
    @classmethod
    def from_options(cls, *, model: TrainableModel, run: Run, data: TrainData | None = None,
                     **options: Any) -> Trainer:
        """A trainer from ``trainer.params`` given as keyword arguments, flat or nested, checked and converted as
        the strict builder does it for the YAML block (errors are ``ConfigError``s naming ``trainer.params.<key>``).
        """
        block = {"module_name": cls.__module__, "class_name": cls.__name__, "params": options}
        return build(block, "trainer", base=Trainer, model=model, data=data, run=run)

    @staticmethod
    def _check_group_options(optimization: Optimization, execution: Execution) -> None:
        if optimization.loss_weights:
            raise ValueError("trainer.params.loss_weights does not apply to a model with optimizer_groups(): its "
                             "training_step weighs its own losses (set the weights in the model block)")
        if execution.compile:
            raise ValueError("trainer.params.compile is not supported for a model with optimizer_groups()")

    def _require_loop(self, what: str) -> None:
        """Raise ValueError if the trainer was built without the data or logger that the loop needs."""
        missing = [name for name, value in (("data", self.data), ("logger", self.run.logger)) if value is None]
        if missing:
            raise ValueError(f"Trainer.{what}() needs {' and '.join(missing)}: this trainer was built without "
                             f"{' or '.join(missing)} (only training_step can be used)")

    def _reset_step_stats(self) -> None:
        self._running: Tensor | None = None  # sum of [loss, *terms] since the last log step
        self._running_count = 0
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_values: Tensor | None = None
        self._device_step = torch.full((), self.step, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        """Train until ``max_epochs``/``max_steps`` or early stopping; return ``checkpoint_dir / 'best.pt'``.

        Raises:
            NonFiniteLossError: a loss became NaN/inf (naming the step and the terms).
            dl_utils.checkpoint.CheckpointError: ``run.resume_from`` is missing, corrupt or does not fit.
        """
        self._require_loop("fit")
        self._fit_start = time.perf_counter()
        pending_rng = self._resume(self.run.resume_from) if self.run.resume_from is not None else None
        val_loader = self.data.val_dataloader()
        if self.run.is_main:
            self.run.update_manifest(training_model_mode=MODEL_MODE_LABELS[self.model_mode])
            self.run.logger.update_config(training_model_mode=self.model_mode)
        if self.model_mode == "reference":
            logger.warning("trainer.params.model_mode=reference: training with the whole model in eval mode, as the "
                           "reference study did (BatchNorm running statistics, no dropout, frozen EMA codebooks)")
        logger.info("training %s for up to %d epochs%s from epoch %d, step %d on %s (world size %d)",
                    type(self.model).__name__, self.max_epochs,
                    f" / {self.max_steps} steps" if self.max_steps else "", self.epoch, self.step, self.device,
                    self.run.world_size)
        while not self._done():
            finished = self.train_epoch(pending_rng)
            pending_rng = None
            if finished:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.groups.step_epoch()
            last = self._done(ignore_patience=True)
            if val_loader is not None and ((finished and self.epoch % self.validation.interval == 0) or last):
                self._validate_and_track(val_loader)
            self._save("latest.pt")
        if val_loader is None or self.best_metric is None:
            if val_loader is None:
                logger.info("no validation loader: best.pt holds the final weights")
            elif self.step <= self.model.warmup_steps:
                logger.info("every validation fell in the model's %d-step warm-up: best.pt holds the final weights",
                            self.model.warmup_steps)
            else:
                logger.warning("no validation gave a finite %s: best.pt holds the final weights", self.monitor)
            self.best_weights = ckpt.clone_state_dict(self._eval_model()) if self.run.is_main else None
            self._save("best.pt")
        # training wall time (validation and checkpoints included; summed over resumed runs), for cost tables
        self.run.logger.log_scalars({"train/wall_s": self.train_seconds}, step=self.step)
        barrier()
        return self.run.checkpoint_dir / "best.pt"

    @property
    def train_seconds(self) -> float:
        """Seconds spent in :meth:`fit` so far, including those of the runs this one resumed."""
        start = self._fit_start
        return self._train_seconds_before + (0.0 if start is None else time.perf_counter() - start)

    def train_epoch(self, pending_rng: Mapping[str, Any] | None = None) -> bool:
        """Run the rest of the current epoch; return True when the epoch was completed (not cut by max_steps)."""
        self._require_loop("train_epoch")
        loader = self.data.train_dataloader(rank=self.run.rank, world_size=self.run.world_size,
                                            seed=self.run.seed + self.epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        n_batches = len(loader)
        if n_batches == 0:
            raise RuntimeError("train_dataloader() yields no batches (empty training set or drop_last too strict)")
        if pending_rng is not None and self.batch_in_epoch == 0:
            ckpt.restore_rng_state(pending_rng)
        batches = self._skip(iter(loader), n_batches)
        if pending_rng is not None and self.batch_in_epoch > 0:
            ckpt.restore_rng_state(pending_rng)  # after skipping, which may have drawn random augmentations
        self.model.train(self.model_mode == "train")  # 'reference': eval mode while training, as the study
        self.model.on_train_epoch_start(self.epoch)
        bar = tqdm(total=n_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
                   disable=not (self.reporting.progress and self.run.is_main and sys.stderr.isatty()), leave=False)
        start, images, steps = time.perf_counter(), 0, 0
        epoch_loss = torch.zeros((), device=self.device)
        try:
            for batch in batches:
                terms = self.training_step(batch.to(self.device, non_blocking=True))
                self.step += 1
                self.batch_in_epoch += 1
                steps += 1
                images += len(batch) * self.run.world_size
                epoch_loss += terms["loss"]
                self._track(terms)
                if self.step % self.reporting.log_interval == 0:
                    self._log_train(bar, images / (time.perf_counter() - start))
                every = self.checkpoints.every_steps
                if every is not None and self.step % every == 0:
                    self._save("latest.pt")
                bar.update(1)
                if self._step_limit_reached():
                    break
            if self._running_count:  # the epoch's last steps since the previous log line (short runs log too)
                self._log_train(bar, images / (time.perf_counter() - start))
        finally:
            bar.close()
        self._check_finite()
        elapsed = time.perf_counter() - start
        if steps:
            logger.info("epoch %d/%d: %d steps (step %d), mean loss %.5g, %.1f images/s, %.1f s",
                        self.epoch + 1, self.max_epochs, steps, self.step, epoch_loss.item() / steps,
                        images / max(elapsed, 1e-9), elapsed)
        return self.batch_in_epoch >= n_batches

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        """One optimisation step on one batch, through the optimizer groups.

        A model with its own groups runs its ``training_step(batch, ctx)``; any other model's step is the weighted
        sum of its ``training_losses`` (computed through the DDP/compiled engine, under autocast), back-propagated
        on the one group ``model``. Then the EMA follows the weights.

        Args:
            batch: on the training device; ``image`` [B,1,H,W] in [0,1].

        Returns:
            Detached scalars: ``'loss'`` (the sum that was back-propagated) and every raw term.
        """
        ctx = self.groups.context(self.step)
        if self.model_steps_itself:
            terms = self.model.training_step(batch, ctx)
            if self._term_names is None:
                reserved = sorted(set(terms) & set(RESERVED_TERMS))
                if reserved:
                    raise ValueError(f"{type(self.model).__name__}.training_step returns reserved term(s) {reserved}")
        else:
            with ctx.autocast():
                terms = self.engine(batch)
            ctx.backward_step(DEFAULT_GROUP, self._weighted_sum(terms))
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return {"loss": ctx.loss, **{name: value.detach() for name, value in terms.items()}}

    # ------------------------------------------------------------------------------------------ helpers
    def _weighted_sum(self, terms: Mapping[str, Tensor]) -> Tensor:
        if self._term_names is None:  # first step: check the model's terms once
            if not isinstance(terms, Mapping) or not terms:
                raise TypeError(f"{type(self.model).__name__}.training_losses must return a non-empty dict of "
                                f"scalar tensors, got {type(terms).__name__}")
            unknown = sorted(set(self.loss_weights) - set(terms))
            if unknown:
                raise ValueError(f"trainer.params.loss_weights: unknown term(s) {unknown}; "
                                 f"{type(self.model).__name__} returns {sorted(terms)}")
            for name, value in terms.items():
                if name in RESERVED_TERMS:
                    raise ValueError(f"{type(self.model).__name__}.training_losses returns a term named {name!r}, "
                                     f"which is reserved ({', '.join(RESERVED_TERMS)})")
                if not isinstance(value, Tensor) or value.ndim != 0:
                    raise ValueError(f"{type(self.model).__name__}.training_losses term {name!r} must be a "
                                     f"scalar tensor, got {getattr(value, 'shape', type(value).__name__)}")
            self._term_names = list(terms)
        loss = sum(self.loss_weights.get(name, 1.0) * value.float() for name, value in terms.items())
        return loss  # type: ignore[return-value]

    def _track(self, terms: Mapping[str, Tensor]) -> None:
        """Accumulate terms and remember the first non-finite loss, on the device (no sync)."""
        if self._term_names is None:  # a training_step override that does not use _weighted_sum
            self._term_names = [name for name in terms if name != "loss"]
        values = torch.stack([terms["loss"].float(), *(terms[name].float() for name in self._term_names)])
        self._running = values if self._running is None else self._running + values
        self._running_count += 1
        self._device_step += 1
        newly_bad = ~torch.isfinite(values[0]) & (self._bad_step < 0)
        self._bad_step = torch.where(newly_bad, self._device_step, self._bad_step)
        self._bad_values = values if self._bad_values is None else torch.where(newly_bad, values, self._bad_values)

    def _check_finite(self) -> None:
        """Raise NonFiniteLossError (a FloatingPointError) if any loss since the start was NaN/inf (one host sync)."""
        bad_step = int(self._bad_step.item())
        if bad_step >= 0:
            names = ["loss", *(self._term_names or [])]
            values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, self._bad_values.tolist(), strict=True))
            latest = self.run.checkpoint_dir / "latest.pt"
            kept = (f"the last checkpoint written before it ({latest}) is untouched" if latest.is_file()
                    else "no checkpoint had been written before it")
            raise NonFiniteLossError(
                f"non-finite training loss at step {bad_step} (epoch {self.epoch + 1}): {values}; stopping: {kept}")

    def _log_train(self, bar: tqdm, images_per_s: float) -> None:
        self._check_finite()
        means = self._running / self._running_count
        if is_distributed():
            dist.all_reduce(means)
            means = means / self.run.world_size
        values = dict(zip(["loss", *self._term_names], means.tolist(), strict=True))
        values.update(self.groups.learning_rates())
        if self.run.is_main:
            self.run.logger.log_train(values, step=self.step)
            self.run.heartbeat(step=self.step)  # the run is alive (written at most every 30 s)
        bar.set_postfix(loss=f"{values['loss']:.4g}", img_s=f"{images_per_s:.0f}")
        self._running, self._running_count = None, 0

    def _skip(self, batches: Iterator[Batch], n_batches: int) -> Iterator[Batch]:
        """Consume the batches of this epoch that a resumed checkpoint already trained on."""
        if self.batch_in_epoch > n_batches:
            raise RuntimeError(f"the checkpoint consumed {self.batch_in_epoch} batches of epoch {self.epoch + 1}, "
                               f"but the epoch has only {n_batches}: was the data or batch size changed?")
        if self.batch_in_epoch:
            logger.info("resuming mid-epoch: skipping %d already-trained batches", self.batch_in_epoch)
            for _ in itertools.islice(batches, self.batch_in_epoch):
                pass
        return batches

    def _step_limit_reached(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _done(self, *, ignore_patience: bool = False) -> bool:
        if self.epoch >= self.max_epochs or self._step_limit_reached():
            return True
        patience = self.early_stopping.patience
        return not ignore_patience and patience is not None and self.bad_validations >= patience

    def _eval_model(self) -> TrainableModel:
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Mean of ``validation_losses`` over the val loader (EMA weights when enabled), fixed generator.

        The generator is re-seeded with ``run.seed`` at every call, so values are comparable across epochs.
        """
        net = self._eval_model()
        was_training = net.training
        net.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.run.seed)
        sums: dict[str, Tensor] = {}
        count = 0
        for batch in itertools.islice(loader, self.validation.max_batches):
            batch = batch.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                values = net.validation_losses(batch, generator=generator)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * len(batch)
            count += len(batch)
        net.train(was_training)
        if count == 0:
            raise RuntimeError("val_dataloader() yields no batches")
        keys = list(sums)
        metrics = dict(zip(keys, (torch.stack([sums[k] for k in keys]) / count).tolist(), strict=True))
        if self.monitor not in metrics:
            raise ValueError(f"trainer.params.monitor: {self.monitor!r} is not among the validation metrics "
                             f"{sorted(metrics)} of {type(self.model).__name__}")
        return metrics

    def _validate_and_track(self, loader: DataLoader) -> None:
        value = math.nan
        if self.run.is_main:
            self.last_val_metrics = self.validate(loader)
            value = self.last_val_metrics[self.monitor]
            self.run.logger.log_val(self.last_val_metrics, step=self.step)
        if is_distributed():  # every rank takes the same decision
            shared = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.broadcast(shared, src=0)
            value = float(shared.item())
        self.groups.step_plateau(value)
        warmup = self.model.warmup_steps
        if self.step <= warmup:  # the model still trains its warm-up objective: not a candidate for best.pt
            logger.info("validation at step %d: %s %.5g (in the model's %d-step warm-up: not a candidate for "
                        "best.pt, no early-stopping count)", self.step, self.monitor, value, warmup)
            return
        best, min_delta = self.best_metric, self.early_stopping.min_delta
        improved = math.isfinite(value) and (best is None or value < best - min_delta)
        if improved:
            self.best_metric, self.bad_validations = value, 0
            if self.run.is_main:
                self.best_weights = ckpt.clone_state_dict(self._eval_model())
            self._save("best.pt")
        else:
            self.bad_validations += 1
        where = (f"epoch {self.epoch}" if self.batch_in_epoch == 0
                 else f"{self.batch_in_epoch} batches of epoch {self.epoch + 1}")
        logger.info("validation after %s (step %d): %s %.5g%s (best %.5g, %d validation(s) without "
                    "improvement)", where, self.step, self.monitor, value, " *" if improved else "",
                    self.best_metric if self.best_metric is not None else math.nan, self.bad_validations)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _gather_rng(self) -> list[dict[str, Any]]:
        state = ckpt.capture_rng_state()
        if not is_distributed():
            return [state]
        states: list[Any] = [None] * self.run.world_size
        dist.all_gather_object(states, state)
        return states

    def state_dict(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything needed to continue training exactly (see ``dl_utils.checkpoint``).

        ``optimizers``/``schedulers``/``scalers`` are keyed by optimizer group (``model`` for a model without groups
        of its own); a model with :meth:`provenance` adds ``provenance``.
        """
        extra: dict[str, Any] = self.groups.state_dict()
        if self.model.provenance():
            extra["provenance"] = self.model.provenance()
        return {
            **extra,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "rng": rng,
            "config": self.run.config,
            "trainer": {"batch_in_epoch": self.batch_in_epoch, "bad_validations": self.bad_validations,
                        "world_size": self.run.world_size, "monitor": self.monitor,
                        "train_seconds": self.train_seconds},
        }

    def _save(self, name: str) -> None:
        """Write ``checkpoint_dir/name`` from rank 0 (every rank calls this: RNG states are gathered)."""
        self._check_finite()
        rng = self._gather_rng()
        if self.run.is_main:
            path = ckpt.save_checkpoint(self.run.checkpoint_dir / name, self.state_dict(rng))
            logger.debug("wrote %s (epoch %d, step %d)", path, self.epoch, self.step)
            self.run.heartbeat(step=self.step, force=True)

    def _resume(self, path: Path) -> dict[str, Any]:
        """Restore the loop from a checkpoint; return this rank's RNG state (restored when the data is)."""
        path = Path(path)
        state = ckpt.load_checkpoint(path)
        missing = ckpt.missing_training_keys(state)
        if missing:
            raise ckpt.CheckpointError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                                       "to start from weights only, load them into the model instead of resuming")
        ckpt.load_state_strict(self.model, state["model"], f"'model' weights of {path}")
        if self.ema is not None:
            if state.get("ema") is None:
                logger.warning("%s has no EMA weights: the EMA restarts from the model weights", path)
                self.ema.load_state_dict(self.model.state_dict())
            else:
                ckpt.load_state_strict(self.ema.module, state["ema"], f"'ema' weights of {path}")
        try:
            self.groups.load_state_dict(ckpt.grouped_optimizer_state(state), str(path))
        except (ValueError, KeyError) as err:
            raise ckpt.CheckpointError(f"{path}: optimizer/scheduler state does not fit this trainer "
                                       f"configuration: {err}") from err
        self.epoch, self.step, self.best_metric = int(state["epoch"]), int(state["step"]), state["best_metric"]
        self.batch_in_epoch = int(state["trainer"]["batch_in_epoch"])
        self.bad_validations = int(state["trainer"]["bad_validations"])
        self._train_seconds_before = float(state["trainer"].get("train_seconds", 0.0))
        self._fit_start = time.perf_counter()
        self._reset_step_stats()
        rngs = state["rng"]
        if len(rngs) != self.run.world_size:
            logger.warning("%s was written by %d process(es), this run has %d: every rank takes rank 0's RNG state",
                           path, len(rngs), self.run.world_size)
            rngs = [rngs[0]] * self.run.world_size
        logger.info("resumed from %s: epoch %d, step %d, %d batch(es) into the epoch", path, self.epoch, self.step,
                    self.batch_in_epoch)
        return rngs[self.run.rank]
