"""Run an experiment: ``python core/Main.py --config_path projects/<project>/configs/<x>.yaml``.

Reads the YAML (``_base_`` composition, ``--set`` overrides), builds the data module, the model, the trainer and
the downstream evaluation tasks with the one strict builder, trains (``experiment.task: train``) or loads
``experiment.weights`` (``evaluate``), then evaluates the best weights. Everything lands in the run folder
``<output_dir>/<experiment.name>/<name>/<timestamp>/`` and in wandb (offline by default).

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N core/Main.py --config_path X.yaml``.

Exit codes: 0 success, 2 configuration error, 1 any other failure, 130/143 interrupted by SIGINT/SIGTERM.
A user error (bad data, checkpoint, unwritable or full output folder, non-finite loss) is one log line naming
the culprit; its traceback is shown only with ``--log_level DEBUG``.

Run lifecycle (``manifest.json``): ``status`` is ``running`` once the folder holds files, then ``finished``,
``failed`` (with ``error``) or ``interrupted``; ``metrics.json`` exists only for a finished run (else
``metrics.partial.json``). Nothing is written before the config, the data CSVs, ``experiment.weights`` and
a resumed checkpoint have been checked.

Resume (``--set experiment.resume=<run folder>``, for any config, with or without an ``experiment:`` block):
a finished run and a run whose process still runs are refused (:func:`check_resumable`; a run whose process is
gone has ``died`` and is resumed); ``checkpoints/latest.pt`` must load strictly into the network the config builds,
and the config may differ from the run's ``config.yaml`` only in :data:`RESUME_MAY_CHANGE` (run length, logging,
evaluation), leaf by leaf, a block one side lacks counting as empty; any other difference (a learning rate, a batch
size) is refused with the differences listed: start a new run instead. ``config.yaml`` and the manifest's
provenance are never rewritten: the resume is appended to the manifest's ``events`` (with the allowed
differences), and history rows logged after the checkpoint move to ``history.superseded.jsonl``.

``experiment.weights`` with ``task: train`` initialises the model strictly from that checkpoint (EMA
weights when it has them) before training; the manifest records it as ``initialised_from``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dl_utils import threads  # noqa: E402

threads.prepare_environment()  # OpenMP reads its wait policy once, when torch loads it

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from core.Configurator import ConfigError, allow_imports, build, check_keys, check_params, load_config  # noqa: E402
from dl_utils.errors import RunInterrupted, UserError  # noqa: E402
from dl_utils.interrupts import interrupts_raise  # noqa: E402
from dl_utils.run import one_line  # noqa: E402

if TYPE_CHECKING:
    from core.data_module import DataModule
    from dl_utils.run import Run, RunState
    from model_zoo.base import TrainableModel

logger = logging.getLogger("core.Main")

TOP_LEVEL_KEYS = ("name", "experiment", "wandb", "data", "model", "trainer", "downstream_tasks", "predict", "vars",
                  "overrides", "allow_imports")
# YAML paths (and everything below them) a resumed run may change: how long, how it logs, what it evaluates.
RESUME_MAY_CHANGE = (
    "experiment.resume", "experiment.force_resume", "experiment.output_dir", "experiment.threads", "wandb",
    "downstream_tasks", "overrides",
    "trainer.params.max_epochs", "trainer.params.max_steps", "trainer.params.progress",
    "data.params.num_workers", "data.params.pin_memory",
)
# Operating-system errors that mean "your output folder cannot be written", not a bug.
OUTPUT_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings:
    """The ``experiment:`` section.

    Attributes:
        name: experiment (project) name, the first level of the run folder and the wandb project.
        task: 'train' (train, then evaluate the best weights), 'evaluate' (load ``weights``, evaluate) or
            'predict' (apply ``weights`` to new scans, the ``predict:`` block; see :mod:`core.prediction`).
        seed: seeds python, numpy and torch.
        device: 'auto' (CUDA when present), 'gpu' (error without CUDA) or 'cpu'.
        weights: checkpoint to evaluate or predict with (tasks 'evaluate', 'predict'), or to initialise the
            model from before training (task 'train'); loaded strictly.
        resume: a run folder whose ``checkpoints/latest.pt`` training continues from (task 'train'); refused for a
            finished run and for a run whose process still runs (see :func:`check_resumable`).
        force_resume: resume a ``running`` run whose owner cannot be checked from here (another host, or no owner
            recorded); never a run whose process is seen running on this host.
        output_dir: where run folders go (relative: against the working directory).
        deterministic: ask torch for deterministic algorithms (slower on GPU).
        threads: the CPU thread policy (:mod:`dl_utils.threads`): 'auto' (the measured default; an
            ``OMP_NUM_THREADS`` in the environment is kept), 'torch' (torch's own count), 'free' (one thread per
            core idle at the start) or a thread count; recorded in the manifest (``threads``).
    """

    name: str = "normative_eval"
    task: Literal["train", "evaluate", "predict"] = "train"
    seed: int = 42
    device: Literal["auto", "gpu", "cpu"] = "auto"
    weights: str | None = None
    resume: str | None = None
    force_resume: bool = False
    output_dir: str = "runs"
    deterministic: bool = False
    threads: str | int = "auto"


@dataclass(frozen=True, kw_only=True)
class WandbSettings:
    """The ``wandb:`` section (``WANDB_MODE`` in the environment overrides ``mode``)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", required=True, help="experiment YAML")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="build every object from the YAML, then exit without training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a YAML value (parsed as a YAML scalar); repeatable")
    return parser.parse_args(argv)


def validate(config: dict[str, Any]) -> tuple[ExperimentSettings, WandbSettings]:
    """Check the top-level shape; blocks are checked by the builder when they are built."""
    settings = (("experiment", ExperimentSettings), ("wandb", WandbSettings))
    for key in config:
        home = next((block for block, cls in settings if key in cls.__dataclass_fields__), None)
        if key not in TOP_LEVEL_KEYS and home:
            raise ConfigError(f"<config>.{key}: not a top-level key; it belongs in the {home} block ({home}: "
                              f"{{{key}: ...}} in the YAML, --set {home}.{key}=... on the command line)")
    check_keys(config, TOP_LEVEL_KEYS, "<config>", required=("model", "data"))
    if not isinstance(config.get("name", "run"), str):
        raise ConfigError(f"name: expected a string, got {config['name']!r}")
    sections = {}
    for key, cls in settings:
        section = check_keys(config.get(key), [f for f in cls.__dataclass_fields__], key)
        check_params(cls, section, key)
        sections[key] = cls(**section)
    experiment: ExperimentSettings = sections["experiment"]
    try:
        threads.check_setting(experiment.threads)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if experiment.task in ("evaluate", "predict") and not experiment.weights:
        raise ConfigError(f"experiment.weights: required when experiment.task is {experiment.task!r}")
    if experiment.weights and experiment.resume:
        raise ConfigError("experiment.weights and experiment.resume: give one (a resumed run continues from its "
                          "own checkpoints/latest.pt)")
    if experiment.resume and experiment.task != "train":
        raise ConfigError("experiment.resume: only for experiment.task 'train'")
    if experiment.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("experiment.device: 'gpu' but CUDA is not available (no GPU or a CPU-only torch); "
                          "use 'auto' or 'cpu'")
    if experiment.weights and not Path(experiment.weights).is_file():
        raise ConfigError(f"experiment.weights: file not found: {experiment.weights}")
    if experiment.resume:
        check_resumable(Path(experiment.resume), force=experiment.force_resume)
    if experiment.task == "train" and "trainer" not in config:
        raise ConfigError("trainer: required when experiment.task is 'train'")
    return experiment, sections["wandb"]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def split_hashes(data: DataModule) -> dict[str, str | None]:
    """SHA-256 of every split CSV the data module reads (None for a listed file that does not exist)."""
    from dl_utils.run import file_sha256

    return {str(path): file_sha256(path) if Path(path).is_file() else None for path in data.split_files()}


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`check_resume` found: the run folder, where its checkpoint stands, the allowed changes, and
    the run's state (``died`` when its manifest says running but its process is gone)."""

    run_dir: Path
    epoch: int
    step: int
    changes: list[tuple[str, Any, Any]]
    state: RunState


def check_resumable(run_dir: Path, *, force: bool = False) -> RunState:
    """Refuse to resume a run that must not be continued, before anything is read further or written.

    A finished run is refused (its metrics, report and figures would be overwritten; the line says how to
    evaluate it or train on from its weights in a new run), and so is a ``running`` run whose process is seen
    alive on this host (two trainers would write one folder) or whose owner cannot be checked from here
    (another host, or none recorded) unless ``force`` (``experiment.force_resume``). A ``running`` run whose
    process is gone has ``died`` and is resumed. Then ``checkpoints/latest.pt`` must exist.

    Raises:
        ConfigError: naming ``experiment.resume``, the run folder and what to do instead.
    """
    from dl_utils.run import describe_heartbeat, run_state

    state = run_state(run_dir)
    if state.status == "finished":
        raise ConfigError(
            f"experiment.resume: {run_dir} is a finished run; resuming it would overwrite its metrics.json, report "
            f"and figures. To evaluate it: --set experiment.task=evaluate --set experiment.weights="
            f"{run_dir / 'checkpoints' / 'best.pt'}; to train on: a new run from its weights, --set "
            f"experiment.weights={run_dir / 'checkpoints' / 'latest.pt'} (without experiment.resume)")
    heartbeat = describe_heartbeat(state.heartbeat)
    if state.owner_state == "alive":
        raise ConfigError(f"experiment.resume: {run_dir} is still running: {state.why} ({heartbeat}); two trainers "
                          "would write one folder. Wait for it to end, or stop it (it then records 'interrupted') and "
                          "resume again")
    if state.owner_state == "unknown" and not force:
        raise ConfigError(f"experiment.resume: {run_dir} says 'running', owned by {state.why} ({heartbeat}). If that "
                          "process is gone, resume with --set experiment.force_resume=true")
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise ConfigError(f"experiment.resume: {run_dir}/checkpoints/latest.pt not found")
    return state


def check_resume(run_dir: Path, config: dict[str, Any], model: Any) -> ResumePlan:
    """Check a resume before anything is written: readable checkpoint, same network, compatible config.

    Raises:
        CheckpointError: ``latest.pt`` is unreadable, not a training checkpoint, or does not fit ``model``
            (its state dict is loaded strictly into ``model``, which the trainer then overwrites again).
        ConfigError: the run has no ``config.yaml``, or the config differs outside :data:`RESUME_MAY_CHANGE`.
    """
    from dl_utils import checkpoint as ckpt
    from dl_utils.run import config_differences, plain_config, run_state

    original_path = run_dir / "config.yaml"
    if not original_path.is_file():
        raise ConfigError(f"experiment.resume: {run_dir} has no config.yaml (not a run folder)")
    original = yaml.safe_load(original_path.read_text())
    changes = config_differences(original, plain_config(config))
    refused = [c for c in changes if not any(c[0] == p or c[0].startswith(p + ".") for p in RESUME_MAY_CHANGE)]
    if refused:
        listed = "; ".join(f"{where}: {old!r} -> {new!r}" for where, old, new in refused)
        raise ConfigError(f"experiment.resume: the config differs from {original_path} in {listed}. A resumed run "
                          f"keeps its hyper-parameters (only {', '.join(RESUME_MAY_CHANGE)} may change); "
                          "start a new run to change them")
    latest = run_dir / "checkpoints" / "latest.pt"
    state = ckpt.load_checkpoint(latest)
    missing = ckpt.missing_training_keys(state)
    if missing:
        raise ckpt.CheckpointError(f"{latest} is not a training checkpoint (no {', '.join(missing)})")
    ckpt.load_state_strict(model, state["model"], f"'model' weights of {latest}")
    return ResumePlan(run_dir=run_dir, epoch=int(state["epoch"]), step=int(state["step"]),
                      changes=[c for c in changes if c[0] != "experiment.resume"], state=run_state(run_dir))


def build_objects(config: dict[str, Any]) -> tuple[DataModule, TrainableModel]:
    """Build the data module and the model (the parts every task needs; the model slot takes anything the trainer
    trains, :func:`check_scorer` refuses a stage-1 network where scores are needed)."""
    from core.data_module import DataModule
    from model_zoo.base import TrainableModel

    data = build(config["data"], "data", base=DataModule)
    model = build(config["model"], "model", base=TrainableModel)
    return data, model


def check_scorer(model: TrainableModel, *, evaluators: dict[str, Any], task: str, config_path: str) -> None:
    """A model that does not score anomalies (a stage-1 network such as f-AnoGAN's WGANGP) only trains.

    Raises:
        ConfigError: naming ``model.class_name``, the YAML and what to do, when ``task`` is 'evaluate' or there are
            downstream tasks.
    """
    from core.evaluation.runner import require_scorer

    if task == "evaluate":
        require_scorer(model, f"{config_path}: experiment.task 'evaluate' needs a model that scores anomalies")
    elif evaluators:
        require_scorer(model, f"{config_path}: downstream_tasks must be empty for it (set downstream_tasks: null); "
                              f"it has {', '.join(evaluators)}")


def run(args: argparse.Namespace) -> int:
    """Build, check, then train and/or evaluate in a run folder whose manifest tracks the run's status."""
    config = load_config(args.config_path, args.overrides)
    allow_imports(config.get("allow_imports"))  # before anything is built; never from a checkpoint's config
    experiment, wandb_settings = validate(config)
    thread_record = threads.apply_policy(experiment.threads)
    name = config.get("name") or Path(args.config_path).stem
    if experiment.task == "predict":  # needs neither the trainer nor the evaluation modules
        from core.prediction import run_prediction

        seed_everything(experiment.seed, experiment.deterministic)
        return run_prediction(config, experiment=experiment, wandb_settings=wandb_settings, name=name,
                              config_path=args.config_path, dry_run=args.dry_run)

    from core.evaluation import build_downstream
    from core.Trainer import Trainer
    from dl_utils.checkpoint import load_model_weights
    from dl_utils.distributed import cleanup, init_distributed
    from dl_utils.run import Run

    seed_everything(experiment.seed, experiment.deterministic)
    if args.dry_run:
        data, model = build_objects(config)
        evaluators = build_downstream(config.get("downstream_tasks"), data=data)
        check_scorer(model, evaluators=evaluators, task=experiment.task, config_path=args.config_path)
        if "trainer" in config:
            import tempfile

            from dl_utils.experiment_logger import ExperimentLogger

            with tempfile.TemporaryDirectory() as tmp:
                quiet = ExperimentLogger(run_dir=tmp, mode="disabled", enabled=False)
                run = Run(run_dir=Path(tmp), device=torch.device("cpu"), seed=experiment.seed, config=config,
                          logger=quiet)
                build(config["trainer"], "trainer", base=Trainer, model=model, data=data, run=run)
        print(f"dry run OK: {args.config_path} builds (data, model, trainer, "
              f"{len(evaluators)} downstream tasks)")
        return 0

    dist = init_distributed(experiment.device)
    try:
        data, model = build_objects(config)
        model = model.to(dist.device)
        evaluators = build_downstream(config.get("downstream_tasks"), data=data)  # fail before training
        check_scorer(model, evaluators=evaluators, task=experiment.task, config_path=args.config_path)
        data.split_files()  # reads every split CSV (missing, empty, misaligned) before a run folder exists
        if experiment.task == "train":
            check_trainer_block(config["trainer"], Trainer)
        plan = check_resume(Path(experiment.resume), config, model) if experiment.resume else None
        # Weights are checked before the folder exists; with task 'train' they initialise the model (strictly).
        initialised = load_model_weights(model, experiment.weights) if experiment.weights else None
        run = Run.create(output_dir=experiment.output_dir, experiment=experiment.name, name=name,
                         resume=experiment.resume, device=dist.device, seed=experiment.seed, config=config,
                         rank=dist.rank, world_size=dist.world_size)
        with run.recording(task=experiment.task):
            if plan is not None:
                if plan.state.owner_state is not None:  # its manifest says 'running', its process is not seen
                    logger.warning("resuming %s: %s", plan.run_dir, plan.state.describe())
                run.resume(config_path=args.config_path, from_epoch=plan.epoch, from_step=plan.step,
                           changed={where: {"old": old, "new": new} for where, old, new in plan.changes},
                           previous=plan.state, threads=thread_record)
            else:
                run.start(config_path=args.config_path, task=experiment.task, weights=experiment.weights,
                          split_files=split_hashes(data), threads=thread_record)
            run.open_logger(mode=wandb_settings.mode, project=wandb_settings.project or experiment.name,
                            name=f"{name}/{run.run_dir.name}", entity=wandb_settings.entity,
                            group=wandb_settings.group or name, job_type=wandb_settings.job_type,
                            tags=wandb_settings.tags, notes=wandb_settings.notes)
            train_and_evaluate(run, model=model, data=data, evaluators=evaluators, task=experiment.task,
                               weights=experiment.weights, initialised=initialised)
        if run.is_main:
            print_summary(run)
    finally:
        cleanup()
    return 0


def train_and_evaluate(run: Run, *, model: TrainableModel, data: DataModule, evaluators: dict[str, Any], task: str,
                       weights: str | None, initialised: str | None) -> None:
    """Train (task 'train', from ``initialised`` weights when given) or take ``weights``, then evaluate them."""
    from core.evaluation import run_downstream
    from core.Trainer import Trainer
    from dl_utils.checkpoint import load_model_weights

    if initialised is not None and task == "train":
        run.update_manifest(initialised_from=initialised)
    if model.provenance():  # e.g. the frozen stage-1 checkpoint and its SHA-256
        run.update_manifest(model_provenance=model.provenance())
    if task == "train":
        evaluated = build(run.config["trainer"], "trainer", base=Trainer, model=model, data=data, run=run).fit()
    else:
        evaluated = Path(weights)
    if run.is_main and evaluators:
        loaded = load_model_weights(model, evaluated)
        run.update_manifest(evaluated_weights={"path": str(evaluated), "which": loaded})
        model.eval()
        run_downstream(evaluators, model=model, data=data, run=run)
        if model.provenance():  # now with a network built in training (PHANES's VGG19 loss network)
            run.update_manifest(model_provenance=model.provenance())


def check_trainer_block(block: Any, base: type) -> None:
    """The trainer block's class and parameters (names, types), checked before a run folder exists.

    The trainer itself is built only once the run folder and the logger exist; its constructor's value checks
    (e.g. ``max_epochs: 0``) therefore fail inside the run, which then records the error as its status.
    """
    from core.Configurator import aliased_params, named_as_written, resolve_class

    cls = resolve_class(block, "trainer", base)
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"trainer.params: expected a mapping, got {type(params).__name__}")
    params, moved = aliased_params(cls, params, "trainer.params")
    try:
        check_params(cls, params, "trainer.params", injected=dict.fromkeys(("model", "data", "run")))
    except ConfigError as err:
        renamed = named_as_written(err, moved)
        if renamed is err:
            raise
        raise renamed from err


def print_summary(run: Run) -> None:
    """Where the results are and how to look at them."""
    run_dir = run.run_dir
    evals = {k: v for k, v in run.logger.latest.items() if k.startswith("eval/")}
    lines = [f"\nRun folder: {run_dir}", f"  metrics:  {run_dir / 'metrics.json'} ({len(evals)} evaluation numbers)"]
    if (run_dir / "report.md").exists():
        lines.append(f"  report:   {run_dir / 'report.md'}")
    if (run_dir / "figures").is_dir():
        lines.append(f"  figures:  {run_dir / 'figures'}")
    wandb_dir = run.logger.wandb_dir()
    if wandb_dir:
        lines.append(f"  wandb:    {wandb_dir}  (dashboard: wandb sync {wandb_dir})")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    debug = args.log_level == "DEBUG"
    try:
        with interrupts_raise():
            return run(args)
    except ConfigError as err:
        logger.error("config error: %s", one_line(err), exc_info=debug)
        return 2
    except UserError as err:
        logger.error("%s error: %s", err.kind, one_line(err), exc_info=debug)
        return 1
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = err.filename or "(file not named by the system)"
        logger.error("output error: %s while writing %s: %s", OUTPUT_ERRNOS[err.errno], where,
                     err.strerror or err, exc_info=debug)
        return 1
    except RunInterrupted as err:
        logger.error("interrupted by %s; %s", err.signal_name,
                     err.outcome or "no run folder had been created, nothing was written", exc_info=debug)
        return 128 + int(signal.Signals[err.signal_name])


if __name__ == "__main__":
    sys.exit(main())
