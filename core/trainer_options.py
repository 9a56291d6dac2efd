"""The trainer's options as typed sub-blocks of ``trainer.params`` (each checked key by key by the strict builder).

Nested form (canonical)::

    trainer:
      module_name: core.Trainer
      class_name: Trainer
      params:
        max_epochs: 300
        optimization: {optimizer: {module_name: torch.optim, class_name: Adam, params: {lr: 1.0e-3}},
                       grad_clip_norm: 1.0}
        ema: {decay: 0.999, warmup: true}
        validation: {interval: 5, monitor: recon_mae}
        early_stopping: {patience: 10, min_delta: 0.0}

Short form: every option also has the flat name it had before the sub-blocks (:data:`FLAT_ALIASES`, e.g.
``ema_decay: 0.999`` = ``ema: {decay: 0.999}``, ``optimizer:`` = ``optimization: {optimizer: ...}``), so every
existing YAML key and ``--set trainer.params.<key>=...`` keeps working. Giving one option both ways is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from core.Configurator import ParamError, suggest

AmpMode = Literal["auto", "bf16", "fp16", "off"]
SchedulerInterval = Literal["epoch", "step"]
ModelMode = Literal["train", "reference"]
DEFAULT_OPTIMIZER: dict[str, Any] = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 1e-4}}

# flat name in trainer.params -> (sub-block, field)
FLAT_ALIASES: dict[str, tuple[str, str]] = {
    "optimizer": ("optimization", "optimizer"),
    "lr_scheduler": ("optimization", "lr_scheduler"),
    "lr_scheduler_interval": ("optimization", "lr_scheduler_interval"),
    "optimizers": ("optimization", "optimizers"),
    "loss_weights": ("optimization", "loss_weights"),
    "grad_clip_norm": ("optimization", "grad_clip_norm"),
    "model_mode": ("optimization", "model_mode"),
    "amp": ("execution", "amp"),
    "compile": ("execution", "compile"),
    "find_unused_parameters": ("execution", "find_unused_parameters"),
    "ema_decay": ("ema", "decay"),
    "ema_warmup": ("ema", "warmup"),
    "val_interval": ("validation", "interval"),
    "val_max_batches": ("validation", "max_batches"),
    "monitor": ("validation", "monitor"),
    "early_stopping_patience": ("early_stopping", "patience"),
    "early_stopping_min_delta": ("early_stopping", "min_delta"),
    "checkpoint_every_steps": ("checkpoints", "every_steps"),
    "log_interval": ("reporting", "log_interval"),
    "progress": ("reporting", "progress"),
}


def _fail(name: str, problem: str) -> ParamError:
    """A ParamError for field ``block.field``: the builder reports it at ``<path>.<field>``, a direct caller reads
    the block-qualified name."""
    return ParamError(name.split(".")[-1], problem, f"{name}: {problem}")


def _choice(name: str, value: str, options: Any) -> None:
    choices = get_args(options)
    if value not in choices:
        raise _fail(name, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    """Raise a ParamError unless ``value`` > 0 (or None, when ``allow_none``)."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise _fail(name, f"must be > 0{' or null' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Optimization:
    """How parameters are updated.

    Args:
        optimizer: ``{module_name, class_name, params}`` of a ``torch.optim.Optimizer`` (``params`` injected);
            default Adam, lr 1e-4. On CUDA ``fused: true`` is added when the optimizer supports it and the block
            does not set it. With optimizer groups it is every group's default.
        lr_scheduler: block of a ``torch.optim.lr_scheduler.LRScheduler`` (``optimizer`` injected), or null.
            ``ReduceLROnPlateau`` is stepped with the monitored value after each validation.
        lr_scheduler_interval: step the scheduler after every ``'epoch'`` or every optimizer ``'step'``.
        optimizers: per-group ``{optimizer, lr_scheduler}`` overrides for a model that declares
            ``optimizer_groups()`` (see ``core/optimizer_groups.py``).
        loss_weights: weight per term of ``training_losses`` (absent terms weigh 1); an unknown name is an error at
            the first step. Not for a model with its own ``training_step`` (it weighs its own losses).
        grad_clip_norm: clip the gradient 2-norm (per optimizer group) to this value; null = no clipping.
        model_mode: ``'train'`` (default, correct) puts the model in train mode for every training step;
            ``'reference'`` keeps the whole model in eval mode while training, which is what the reference study's
            trainer did by accident (it called ``model.eval()`` in place to copy a test model and never called
            ``train()`` again): BatchNorm normalises with its running statistics (which therefore stay at their
            initial values), dropout is off and EMA codebooks never move. Gradients, optimizer steps and
            validation are unchanged. Recorded in the manifest (``training_model_mode``) and the report.
    """

    optimizer: dict[str, Any] | None = None
    lr_scheduler: dict[str, Any] | None = None
    lr_scheduler_interval: SchedulerInterval = "epoch"
    optimizers: dict[str, dict[str, Any]] | None = None
    loss_weights: dict[str, float] | None = None
    grad_clip_norm: float | None = None
    model_mode: ModelMode = "train"

    def __post_init__(self) -> None:
        _choice("optimization.lr_scheduler_interval", self.lr_scheduler_interval, SchedulerInterval)
        _choice("optimization.model_mode", self.model_mode, ModelMode)
        check_positive("optimization.grad_clip_norm", self.grad_clip_norm)

    @property
    def optimizer_block(self) -> dict[str, Any]:
        """The optimizer block, Adam lr 1e-4 when none is given."""
        return self.optimizer or DEFAULT_OPTIMIZER


@dataclass(frozen=True, kw_only=True)
class Execution:
    """How the forward and backward passes run.

    Args:
        amp: ``'auto'`` = bf16 autocast on CUDA (fp16 with a GradScaler before Ampere) and off on CPU;
            ``'bf16'``/``'fp16'`` autocast (a GradScaler only for fp16); ``'off'``.
        compile: wrap the training forward in ``torch.compile`` (faster on GPUs after a warm-up compile of tens of
            seconds; validation runs eagerly). Not for a model with its own ``training_step``.
        find_unused_parameters: passed to ``DistributedDataParallel`` (needed when some parameters get no gradient
            in a step).
    """

    amp: AmpMode = "auto"
    compile: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        _choice("execution.amp", self.amp, AmpMode)


@dataclass(frozen=True, kw_only=True)
class EMAOptions:
    """An exponential moving average of the weights, used for validation and saved as ``'ema'`` in checkpoints
    (which ``load_model_weights`` prefers).

    Args:
        decay: the EMA decay (e.g. 0.999); null = no EMA.
        warmup: ramp the decay up as ``min(decay, (1 + step) / (10 + step))`` (for short runs, whose average would
            otherwise keep the initial weights for ~1 / (1 - decay) steps).
    """

    decay: float | None = None
    warmup: bool = False

    def __post_init__(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise _fail("ema.decay", f"must lie in (0, 1) or be null, got {self.decay!r}")
        if self.warmup and self.decay is None:
            raise _fail("ema.warmup", "ema_warmup=true needs an ema_decay")


@dataclass(frozen=True, kw_only=True)
class Validation:
    """Args:
        interval: validate every this many epochs (and after the last step).
        max_batches: use only the first batches of the val loader; null = all.
        monitor: key of ``model.validation_losses`` to monitor (logged as ``val/<monitor>``); lower is better.
    """

    interval: int = 1
    max_batches: int | None = None
    monitor: str = "recon_mae"

    def __post_init__(self) -> None:
        check_positive("validation.interval", self.interval, allow_none=False)
        check_positive("validation.max_batches", self.max_batches)


@dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """Args:
        patience: stop after this many validations without improvement; null = never.
        min_delta: an improvement must lower the best value by more than this.
    """

    patience: int | None = None
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check_positive("early_stopping.patience", self.patience)
        if self.min_delta < 0:
            raise _fail("early_stopping.min_delta", f"must be >= 0, got {self.min_delta!r}")


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    """Args:
        every_steps: also write ``latest.pt`` every this many steps (mid-epoch); null = at epoch ends only.
    """

    every_steps: int | None = None

    def __post_init__(self) -> None:
        check_positive("checkpoints.every_steps", self.every_steps)


@dataclass(frozen=True, kw_only=True)
class Reporting:
    """Args:
        log_interval: log the mean of each term over the last this many steps (the only per-step host sync).
        progress: show a tqdm bar per epoch (only on rank 0 and only when stderr is a terminal).
    """

    log_interval: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive("reporting.log_interval", self.log_interval, allow_none=False)


def nest_flat_options(options: dict[str, Any], path: str, *,
                      parameters: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``options`` with every flat alias moved into its sub-block (a new dict; ``options`` is not changed), and
    ``{nested YAML path: flat YAML path}`` of the keys moved, so that errors name the key as the user wrote it.
    ``parameters``: the trainer's own YAML parameters (its signature without the injected objects).

    Raises:
        ValueError: an option given both flat and nested (naming both YAML paths), or a sub-block that is not a
            mapping while a flat alias adds to it.
    """
    out = dict(options)
    for key in out:
        if key not in parameters and key not in FLAT_ALIASES:
            hint = suggest(key, [*parameters, *FLAT_ALIASES])
            raise ValueError(f"{path}.{key}: unknown parameter{hint}; valid parameters: {', '.join(parameters)}, "
                             f"or the flat names {', '.join(FLAT_ALIASES)}")
    moved: dict[str, str] = {}
    for flat, (block, field) in FLAT_ALIASES.items():
        if flat not in out:
            continue
        moved[f"{path}.{block}.{field}"] = f"{path}.{flat}"
        value = out.pop(flat)
        nested = out.get(block)
        if nested is None:
            nested = {}
        elif not isinstance(nested, dict):
            raise ValueError(f"{path}.{flat} adds to {path}.{block}, which must then be a mapping, "
                             f"got {type(nested).__name__}")
        if field in nested:
            raise ValueError(f"{path}.{flat} and {path}.{block}.{field} are the same option: give it once")
        out[block] = {**nested, field: value}
    return out, moved
