"""The run: its folder, ``config.yaml``, the manifest, the experiment logger and the status transitions.

Training, evaluation and prediction runs all go through one :class:`Run`; it is the only writer of
``manifest.json``. Its lifecycle (``core/Main.py``, ``core/prediction/runner.py``)::

    run = Run.create(output_dir=..., experiment=..., name=..., device=..., seed=..., config=...)
    with run.recording(task="train"):     # status: running -> finished | failed (with error) | interrupted
        run.start(config_path=...)        # config.yaml and the manifest's provenance (or run.resume(...))
        run.open_logger(mode="offline", project=..., ...)
        ...                               # trainer, evaluation and prediction write through run.update_manifest

The manifest carries the run's ``status``: ``running`` from the moment the folder holds files, then ``finished``,
``failed`` (with ``error``, one line) or ``interrupted`` (SIGINT/SIGTERM). Every transition and every resume is
appended to its ``events`` list; the provenance written at the start is never rewritten. ``owner`` (host and
process id of the process that started or last resumed the run) and ``heartbeat`` (the time of the latest
checkpoint) tell whether a ``running`` run is still alive.

Readers of finished run folders (``tools/study.py``, ``tools/report.py``) use :func:`read_manifest` and
:func:`read_status`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from dl_utils.errors import RunFolderError, RunInterrupted

if TYPE_CHECKING:
    from dl_utils.experiment_logger import ExperimentLogger

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PACKAGES = (
    "torch", "torchvision", "monai", "numpy", "scipy", "scikit-learn", "scikit-image", "pandas", "nibabel",
    "nilearn", "lpips", "stlpips-pytorch", "wandb", "PyYAML",
)


def make_run_dir(output_dir: str | Path, experiment: str, name: str) -> Path:
    """A new ``<output_dir>/<experiment>/<name>/<timestamp>/`` (relative output_dir: against the working directory).

    Two runs started in the same second get distinct folders (``<timestamp>-1``, ...).

    Raises:
        RunFolderError: the folder cannot be created (naming ``experiment.output_dir`` and the path).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = Path(output_dir) / experiment / name
    for attempt in range(100):
        run_dir = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
        except OSError as err:
            raise RunFolderError(f"cannot create the run folder under experiment.output_dir {str(output_dir)!r}: "
                                 f"{err.filename or parent}: {err.strerror or err}") from err
    raise RunFolderError(f"no free run folder for {stamp} under {parent}")


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit SHA and whether the work tree has uncommitted changes (None when not a git checkout)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions(names: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def device_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        import platform

        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


# ------------------------------------------------------------------------------------------------ run lifecycle
RunStatus = Literal["running", "finished", "failed", "interrupted"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
SUPERSEDED_HISTORY = "history.superseded.jsonl"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``manifest.json`` ({} when there is none)."""
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def read_status(run_dir: str | Path) -> str | None:
    """The run's ``status`` (one of :data:`RUN_STATUSES`), or None for a folder without a recorded status."""
    status = read_manifest(run_dir).get("status")
    return status if isinstance(status, str) else None


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a temporary file renamed over it: a crash never leaves half a file);
    the run folder is created if needed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def plain_config(value: Any) -> Any:
    """The config with tuples (from ``!!python/tuple``) as lists, so it dumps as plain YAML and JSON."""
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_config(v) for v in value]
    return value


@dataclass
class Run:
    """One run: its folder, resolved config, device and seed, this process's place in a distributed job, the
    experiment logger, and the manifest with the run's status (see the module docstring).

    Only rank 0 writes: on other ranks every manifest method is a no-op and the logger is disabled.

    Attributes:
        run_dir: the run folder (``runs/<experiment>/<name>/<timestamp>/``); checkpoints go to ``checkpoint_dir``.
        device: where tensors live.
        seed: the experiment seed.
        config: the resolved config (read-only by convention; stored in checkpoints).
        rank, world_size: distributed position (0, 1 for a single process).
        resume_from: checkpoint to continue from (``experiment.resume``), or None.
        logger: the experiment logger (:meth:`open_logger`), or any object with its methods (tests, tools).
    """

    run_dir: Path
    device: torch.device
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    resume_from: Path | None = None
    logger: Any = None
    _failure: str | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, *, output_dir: str | Path, experiment: str, name: str, resume: str | Path | None = None,
               **fields: Any) -> Run:
        """A run in a new folder ``<output_dir>/<experiment>/<name>/<timestamp>/`` (or in the folder ``resume``).

        Rank 0 creates the folder and tells the other ranks its path; ``resume_from`` is then
        ``<folder>/checkpoints/latest.pt``. ``fields`` are the other attributes (device, seed, config, rank,
        world_size).
        """
        rank, world_size = fields.get("rank", 0), fields.get("world_size", 1)
        path: Path | None = None
        if rank == 0:
            path = Path(resume) if resume is not None else make_run_dir(output_dir, experiment, name)
        if world_size > 1:
            holder = [str(path) if path else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            path = Path(holder[0])
        assert path is not None
        resume_from = path / "checkpoints" / "latest.pt" if resume is not None else None
        return cls(run_dir=path, resume_from=resume_from, **fields)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and logs."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------ the manifest
    def manifest(self) -> dict[str, Any]:
        """The manifest as written so far ({} before :meth:`start`)."""
        return read_manifest(self.run_dir)

    def update_manifest(self, **entries: Any) -> None:
        """Merge top-level entries into the manifest (e.g. which LPIPS/FID weights an evaluation used)."""
        if self.is_main:
            _write_manifest(self.run_dir, {**self.manifest(), **entries})

    def add_event(self, event: str, **details: Any) -> None:
        """Append ``{"event", "time", **details}`` to the manifest's ``events`` (never rewrites earlier ones)."""
        if self.is_main:
            manifest = self.manifest()
            manifest.setdefault("events", []).append({"event": event, "time": now(), **details})
            _write_manifest(self.run_dir, manifest)

    def set_status(self, status: RunStatus, *, error: str | None = None) -> None:
        """Record a lifecycle transition: ``status`` (and ``error`` for failed/interrupted runs) plus an event.

        Best effort: a manifest that cannot be written (disk full, folder gone) is logged, never raised, so the
        error that ended the run is the one reported.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if not self.is_main:
            return
        try:
            manifest = self.manifest()
            manifest["status"] = status
            manifest["status_time"] = now()
            if error is None:
                manifest.pop("error", None)
            else:
                manifest["error"] = error
            manifest.setdefault("events", []).append(
                {"event": status, "time": manifest["status_time"], **({"error": error} if error else {})})
            _write_manifest(self.run_dir, manifest)
        except (OSError, ValueError) as err:
            logger.warning("could not record run status %r in %s: %s", status, self.run_dir, err)

    def heartbeat(self) -> None:
        """Record that the run is alive (the trainer calls it at every checkpoint)."""
        self.update_manifest(heartbeat=now())

    # ------------------------------------------------------------------------------------------ the lifecycle
    def start(self, *, config_path: str | Path, task: str, **provenance: Any) -> None:
        """Write ``config.yaml`` (the resolved config) and the manifest's provenance, with status ``running``.

        Args:
            config_path: the YAML given on the command line.
            task: ``'train'``, ``'evaluate'`` or ``'predict'``.
            **provenance: further entries (``weights``, ``split_files`` hashes, ...).
        """
        if not self.is_main:
            return
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_manifest(self.run_dir, {
            "config_path": str(config_path), "command": sys.argv, "started": now(), "task": task,
            "git": git_state(), "packages": package_versions(), "python": sys.version.split()[0],
            "seed": self.seed, "device": device_description(self.device), "world_size": self.world_size,
            "torch_threads": torch.get_num_threads(),  # CPU results are reproducible at a fixed thread count
            "owner": _owner(), **provenance,
            "status": "running", "events": [{"event": "running", "time": now()}],
        })
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(plain_config(self.config), sort_keys=False))

    def resume(self, *, config_path: str | Path, from_epoch: int, from_step: int,
               changed: Mapping[str, Mapping[str, Any]]) -> None:
        """Continue this run folder: history rows logged after the checkpoint move to ``history.superseded.jsonl``,
        the resume (with the allowed config changes) is appended to the events, the status becomes ``running``.
        ``config.yaml`` and the provenance stay as the first start wrote them."""
        if not self.is_main:
            return
        moved = rewind_history(self.run_dir, from_step)
        self.add_event("resumed", config_path=str(config_path), command=sys.argv, from_epoch=from_epoch,
                       from_step=from_step, superseded_history_rows=moved, changed=dict(changed), owner=_owner())
        self.update_manifest(owner=_owner())
        self.set_status("running")

    def open_logger(self, *, mode: str | None, project: str, name: str, entity: str | None = None,
                    group: str | None = None, job_type: str | None = None, tags: Sequence[str] = (),
                    notes: str | None = None) -> ExperimentLogger:
        """Open the run's :class:`~dl_utils.experiment_logger.ExperimentLogger` (wandb ``mode`` and names) as
        :attr:`logger`; a resumed run continues its wandb run. The wandb run's id and folder go to the manifest
        (``wandb``; a resume adds its own entry to ``wandb_resumed``)."""
        from dl_utils.experiment_logger import ExperimentLogger

        previous = self.manifest().get("wandb") if self.resume_from is not None else None
        resume_id = previous.get("id") if isinstance(previous, dict) else None
        self.logger = ExperimentLogger(run_dir=self.run_dir, mode=mode, project=project, entity=entity, name=name,
                                       group=group, job_type=job_type, tags=list(tags), notes=notes,
                                       config=plain_config(self.config), enabled=self.is_main, resume_id=resume_id)
        entry = self.logger.wandb_entry
        if entry is not None and resume_id:  # the first start's entry stays as it was
            self.update_manifest(wandb_resumed=[*self.manifest().get("wandb_resumed", []), entry])
        elif entry is not None:
            self.update_manifest(wandb=entry)
        return self.logger

    def fail(self, error: str) -> None:
        """End the :meth:`recording` block as ``failed`` with ``error`` without raising (e.g. a prediction that
        stopped at a bad input and exits 1)."""
        self._failure = error

    @contextlib.contextmanager
    def recording(self, *, task: str) -> Iterator[Run]:
        """Record how the block ends: ``finished`` (the logger writes ``metrics.json``), ``failed`` (an exception
        or :meth:`fail`; ``metrics.partial.json`` only) or ``interrupted`` (SIGINT/SIGTERM: the interruption
        learns what it left behind, for the one line ``core/Main.py`` logs). The exception is re-raised."""
        self._failure = None
        try:
            yield self
        except BaseException as err:
            self._close_logger(exit_code=1)
            if isinstance(err, RunInterrupted):
                self.set_status("interrupted", error=f"interrupted by {err.signal_name}")
                again = f"resume with --set experiment.resume={self.run_dir}" if task == "train" else "run it again"
                err.outcome = err.outcome or f"{self.run_dir / MANIFEST} says 'interrupted' ({again})"
            else:
                self.set_status("failed", error=f"{type(err).__name__}: {one_line(err)}")
            raise
        self._close_logger(exit_code=0 if self._failure is None else 1)
        if self._failure is None:
            self.set_status("finished")
        else:
            self.set_status("failed", error=self._failure)

    def _close_logger(self, *, exit_code: int) -> None:
        if self.logger is not None:
            self.logger.close(exit_code=exit_code)


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def one_line(err: BaseException) -> str:
    """The error's message on one line (a DataLoader worker's re-raised error keeps only its last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # torch's ExceptionWrapper: "Caught X in worker ..."
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def config_differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(yaml.path, old, new)`` for every leaf that differs between two plain configs (absent = ``<absent>``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            out += config_differences(old.get(key, "<absent>"), new.get(key, "<absent>"), where)
        return out
    return [] if old == new else [(path, old, new)]


def rewind_history(run_dir: str | Path, step: int) -> int:
    """Prepare ``history.jsonl`` for a resume from a checkpoint at optimizer step ``step``.

    Rows after the last training/validation row with ``step <= step`` were logged by the interrupted run
    after its last checkpoint; the resumed run logs them again. They move (appended, with the resume step) to
    ``history.superseded.jsonl``, so no row is duplicated and none is lost.

    Returns:
        The number of rows moved.
    """
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = 0
    for index, line in enumerate(lines):
        row_step = json.loads(line).get("step")
        if row_step is not None and row_step <= step:
            keep = index + 1
    moved = lines[keep:]
    if moved:
        with (Path(run_dir) / SUPERSEDED_HISTORY).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"superseded_by_resume_from_step": step, **json.loads(line)}) + "\n"
                         for line in moved)
        tmp = path.with_name(f".{HISTORY}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in lines[:keep]), encoding="utf-8")
        os.replace(tmp, path)
    return len(moved)
