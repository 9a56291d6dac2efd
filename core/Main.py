"""Run an experiment: ``python core/Main.py --config_path projects/<project>/configs/<x>.yaml``.

Reads the YAML (``_base_`` composition, ``--set`` overrides), builds the data module, the model, the trainer and
the downstream evaluation tasks with the one strict builder, trains (``experiment.task: train``) or loads
``experiment.weights`` (``evaluate``), then evaluates the best weights. Everything lands in the run folder
``<output_dir>/<experiment.name>/<name>/<timestamp>/`` and in wandb (offline by default).

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N core/Main.py --config_path X.yaml``.

Exit codes: 0 success, 2 configuration error, 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from core.Configurator import ConfigError, build, check_keys, check_params, load_config  # noqa: E402

if TYPE_CHECKING:
    from core.DataLoader import DataModule
    from dl_utils.experiment_logger import ExperimentLogger
    from model_zoo.base import AnomalyModel

logger = logging.getLogger("core.Main")

TOP_LEVEL_KEYS = ("name", "experiment", "wandb", "data", "model", "trainer", "downstream_tasks", "vars", "overrides")


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings:
    """The ``experiment:`` section.

    Attributes:
        name: experiment (project) name, the first level of the run folder and the wandb project.
        task: 'train' (train, then evaluate the best weights) or 'evaluate' (load ``weights``, evaluate).
        seed: seeds python, numpy and torch.
        device: 'auto' (CUDA when present), 'gpu' (error without CUDA) or 'cpu'.
        weights: checkpoint to evaluate (task 'evaluate'); loaded strictly.
        resume: a run folder whose ``checkpoints/latest.pt`` training continues from (task 'train').
        output_dir: where run folders go (relative: against the working directory).
        deterministic: ask torch for deterministic algorithms (slower on GPU).
    """

    name: str = "normative_eval"
    task: Literal["train", "evaluate"] = "train"
    seed: int = 42
    device: Literal["auto", "gpu", "cpu"] = "auto"
    weights: str | None = None
    resume: str | None = None
    output_dir: str = "runs"
    deterministic: bool = False


@dataclass(frozen=True, kw_only=True)
class WandbSettings:
    """The ``wandb:`` section (``WANDB_MODE`` in the environment overrides ``mode``)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str | None = None
    entity: str | None = None
    group: str | None = None
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
    check_keys(config, TOP_LEVEL_KEYS, "<config>", required=("model", "data"))
    if not isinstance(config.get("name", "run"), str):
        raise ConfigError(f"name: expected a string, got {config['name']!r}")
    sections = {}
    for key, cls in (("experiment", ExperimentSettings), ("wandb", WandbSettings)):
        section = check_keys(config.get(key), [f for f in cls.__dataclass_fields__], key)
        check_params(cls, section, key)
        sections[key] = cls(**section)
    experiment: ExperimentSettings = sections["experiment"]
    if experiment.task == "evaluate" and not experiment.weights:
        raise ConfigError("experiment.weights: required when experiment.task is 'evaluate'")
    if experiment.weights and not Path(experiment.weights).is_file():
        raise ConfigError(f"experiment.weights: file not found: {experiment.weights}")
    if experiment.resume and not (Path(experiment.resume) / "checkpoints" / "latest.pt").is_file():
        raise ConfigError(f"experiment.resume: {experiment.resume}/checkpoints/latest.pt not found")
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


def shared_run_dir(experiment: ExperimentSettings, name: str, world_size: int, rank: int) -> Path:
    """Rank 0 creates the run folder (or reuses the resumed one) and tells the other ranks its path."""
    from dl_utils.run import make_run_dir

    path: Path | None = None
    if rank == 0:
        if experiment.resume:
            path = Path(experiment.resume)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for attempt in range(100):  # two runs started in the same second get distinct folders
                try:
                    path = make_run_dir(experiment.output_dir, experiment.name, name,
                                        stamp if attempt == 0 else f"{stamp}-{attempt}")
                    break
                except FileExistsError:
                    continue
    if world_size > 1:
        holder = [str(path) if path else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        path = Path(holder[0])
    assert path is not None
    return path


def write_run_files(run_dir: Path, config: dict[str, Any], config_path: str, experiment: ExperimentSettings,
                    device: torch.device, data: DataModule, world_size: int) -> None:
    """The resolved config and the manifest (git commit, versions, seed, device, split-file hashes)."""
    from dl_utils.run import device_description, file_sha256, git_state, package_versions

    (run_dir / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    splits = {}
    for path in data.split_files():
        splits[str(path)] = file_sha256(path) if Path(path).is_file() else None
    manifest_path = run_dir / "manifest.json"
    import json

    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({
        "config_path": str(config_path), "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(), "packages": package_versions(), "python": sys.version.split()[0],
        "seed": experiment.seed, "device": device_description(device), "world_size": world_size,
        "torch_threads": torch.get_num_threads(),  # CPU results are reproducible at a fixed thread count
        "split_files": splits, "task": experiment.task, "weights": experiment.weights,
        "resumed_from": experiment.resume,
    })
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _plain(value: Any) -> Any:
    """Tuples (from ``!!python/tuple``) become lists so the resolved config is plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_objects(config: dict[str, Any]) -> tuple[DataModule, AnomalyModel]:
    """Build the data module and the model (the parts every task needs)."""
    from core.DataLoader import DataModule
    from model_zoo.base import AnomalyModel

    data = build(config["data"], "data", base=DataModule)
    model = build(config["model"], "model", base=AnomalyModel)
    return data, model


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config_path, args.overrides)
    experiment, wandb_settings = validate(config)
    name = config.get("name") or Path(args.config_path).stem

    from core.DownstreamEvaluator import build_downstream, run_downstream
    from core.Trainer import Trainer
    from dl_utils.checkpoint import load_model_weights
    from dl_utils.distributed import cleanup, init_distributed
    from dl_utils.experiment_logger import ExperimentLogger
    from dl_utils.run import RunContext

    seed_everything(experiment.seed, experiment.deterministic)
    if args.dry_run:
        data, model = build_objects(config)
        evaluators = build_downstream(config.get("downstream_tasks"), data=data)
        if "trainer" in config:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                context = RunContext(run_dir=Path(tmp), device=torch.device("cpu"), seed=experiment.seed,
                                     config=config)
                quiet = ExperimentLogger(run_dir=tmp, mode="disabled", enabled=False)
                build(config["trainer"], "trainer", base=Trainer, model=model, data=data, logger=quiet, run=context)
        print(f"dry run OK: {args.config_path} builds (data, model, trainer, "
              f"{len(evaluators)} downstream tasks)")
        return 0

    dist = init_distributed(experiment.device)
    try:
        run_dir = shared_run_dir(experiment, name, dist.world_size, dist.rank)
        is_main = dist.rank == 0
        data, model = build_objects(config)
        model = model.to(dist.device)
        evaluators = build_downstream(config.get("downstream_tasks"), data=data)  # fail before training
        if is_main:
            write_run_files(run_dir, config, args.config_path, experiment, dist.device, data, dist.world_size)
        resume_from = run_dir / "checkpoints" / "latest.pt" if experiment.resume else None
        context = RunContext(run_dir=run_dir, device=dist.device, seed=experiment.seed, config=config,
                             rank=dist.rank, world_size=dist.world_size, resume_from=resume_from)
        log = ExperimentLogger(
            run_dir=run_dir, mode=wandb_settings.mode, project=wandb_settings.project or experiment.name,
            entity=wandb_settings.entity, name=f"{name}/{run_dir.name}", group=wandb_settings.group or name,
            tags=wandb_settings.tags, notes=wandb_settings.notes, config=_plain(config), enabled=is_main,
        )
        exit_code = 1
        try:
            if experiment.task == "train":
                trainer = build(config["trainer"], "trainer", base=Trainer, model=model, data=data, logger=log,
                                run=context)
                weights = trainer.fit()
            else:
                weights = Path(experiment.weights)
            if is_main and evaluators:
                loaded = load_model_weights(model, weights)
                log.update_manifest(evaluated_weights={"path": str(weights), "which": loaded})
                model.eval()
                run_downstream(evaluators, model=model, data=data, logger=log, run=context)
            exit_code = 0
        finally:
            log.close(exit_code=exit_code)
        if is_main:
            print_summary(run_dir, log)
    finally:
        cleanup()
    return 0


def print_summary(run_dir: Path, log: ExperimentLogger) -> None:
    """Where the results are and how to look at them."""
    latest = log.latest
    evals = {k: v for k, v in latest.items() if k.startswith("eval/")}
    lines = [f"\nRun folder: {run_dir}", f"  metrics:  {run_dir / 'metrics.json'} ({len(evals)} evaluation numbers)"]
    if (run_dir / "report.md").exists():
        lines.append(f"  report:   {run_dir / 'report.md'}")
    if (run_dir / "figures").is_dir():
        lines.append(f"  figures:  {run_dir / 'figures'}")
    wandb_dir = log.wandb_dir()
    if wandb_dir:
        lines.append(f"  wandb:    {wandb_dir}  (dashboard: wandb sync {wandb_dir})")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(args)
    except ConfigError as err:
        logger.error("config error: %s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
