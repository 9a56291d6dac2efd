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
appended to its ``events`` list; the provenance written at the start is never rewritten.

Liveness: a process killed by SIGKILL, the out-of-memory killer or a power cut records nothing, so ``running`` alone
does not say a run is alive. ``owner`` names the process that started or last resumed the run (host, process id,
the process's start time in clock ticks after boot, and the boot id), and ``heartbeat`` (time and step) is renewed
at log and checkpoint time (:meth:`Run.heartbeat`, at most every :data:`HEARTBEAT_INTERVAL_S` seconds between
checkpoints). :func:`owner_state` tells, on the owner's host, whether that process still runs: a process id that
exists but belongs to a process started at another time (the id was reused), a zombie, or a boot id that changed
(the machine rebooted) all count as gone. From another host nothing about the process can be known: the state is
``unknown`` and only the heartbeat's age is told. :func:`run_state` combines both: a ``running`` run whose owner is
gone is ``died``.

Readers of run folders (``tools/study``, ``tools/report.py``, a resume) use :func:`read_manifest`,
:func:`read_status` and :func:`run_state`.
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
from dl_utils.files import write_text_atomic

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
    write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))


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
    _last_heartbeat: float | None = field(default=None, init=False, repr=False)

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

    def heartbeat(self, *, step: int | None = None, force: bool = False) -> None:
        """Record that the run is alive: ``heartbeat`` = ``{"time", "step"}`` in the manifest.

        The trainer calls it at every log step and (``force``) at every checkpoint; without ``force`` the manifest
        is written at most every :data:`HEARTBEAT_INTERVAL_S` seconds, so a short log interval costs nothing.
        Best effort, like :meth:`set_status`: a manifest that cannot be written is logged, never raised here (the
        next write of the run's own files reports a full disk).
        """
        if not self.is_main:
            return
        clock = time.monotonic()
        if not force and self._last_heartbeat is not None and clock - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return
        try:
            self.update_manifest(heartbeat={"time": now(), "step": step})
        except OSError as err:
            logger.warning("could not record the heartbeat in %s: %s", self.run_dir, err)
            return
        self._last_heartbeat = clock

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
            "owner": owner_record(), **provenance,
            "status": "running", "events": [{"event": "running", "time": now()}],
        })
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(plain_config(self.config), sort_keys=False))

    def resume(self, *, config_path: str | Path, from_epoch: int, from_step: int,
               changed: Mapping[str, Mapping[str, Any]], previous: RunState | None = None,
               **details: Any) -> None:
        """Continue this run folder: history rows logged after the checkpoint move to ``history.superseded.jsonl``,
        the resume (with the allowed config changes) is appended to the events, the status becomes ``running``
        and this process the ``owner``. ``config.yaml`` and the provenance stay as the first start wrote them.

        ``previous`` (the folder's :func:`run_state` before the resume): a ``running`` run whose owner is gone first
        gets a ``died`` event, one whose owner could not be checked (``experiment.force_resume``) an
        ``owner_unverified`` event, each with the old owner and its last heartbeat. ``details`` (e.g. the thread
        policy this process applied) go into the ``resumed`` event.
        """
        if not self.is_main:
            return
        if previous is not None and previous.owner_state in ("gone", "unknown"):
            self.add_event("died" if previous.owner_state == "gone" else "owner_unverified", owner=previous.owner,
                           why=previous.why, last_heartbeat=previous.heartbeat)
        moved = rewind_history(self.run_dir, from_step)
        owner = owner_record()
        self.add_event("resumed", config_path=str(config_path), command=sys.argv, from_epoch=from_epoch,
                       from_step=from_step, superseded_history_rows=moved, changed=dict(changed), owner=owner,
                       **details)
        self.update_manifest(owner=owner, heartbeat={"time": now(), "step": from_step})
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


# ------------------------------------------------------------------------------------------------ liveness
HEARTBEAT_INTERVAL_S = 30.0
OwnerState = Literal["alive", "gone", "unknown"]


def _boot_id() -> str | None:
    """The kernel's id of this boot (Linux; None elsewhere): a process recorded under another boot is gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_stat(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks after boot)`` of a process from ``/proc/<pid>/stat`` (Linux), or
    None when there is no such process or no ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and parentheses
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """Who owns a run: ``host``, ``pid``, ``start_ticks`` (the process's start time, so that a reused process id
    is not taken for the owner; None without ``/proc``), ``boot_id`` and ``since`` (when it took the run)."""
    pid = os.getpid() if pid is None else pid
    stat = _process_stat(pid)
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": stat[1] if stat else None,
            "boot_id": _boot_id(), "since": now()}


def owner_state(owner: Any) -> tuple[OwnerState, str]:
    """Whether the process an ``owner`` record names still runs, and why (one phrase for a message).

    ``alive``: on this host, that process id exists and (where ``/proc`` tells) started at the recorded time;
    ``gone``: on this host it does not (exited, killed, a zombie, the id now belongs to another process, or the
    machine rebooted); ``unknown``: no owner recorded, or another host (whose processes cannot be seen from here).
    """
    if not isinstance(owner, Mapping) or not isinstance(owner.get("pid"), int):
        return "unknown", "no owner process recorded (a run from before owners were recorded)"
    pid, host = owner["pid"], owner.get("host")
    who = f"process {pid} on host {host}"
    here = socket.gethostname()
    if host != here:
        return "unknown", f"{who}, not this host ({here}): whether it still runs cannot be seen from here"
    boot = _boot_id()
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return "gone", f"{who} is gone (the machine rebooted since)"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone", f"{who} is gone"
    except PermissionError:  # it exists, under another user
        pass
    stat = _process_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return "gone", f"{who} is gone (it ended; a zombie awaits its parent)"
    if stat is not None and owner.get("start_ticks") is not None and stat[1] != owner["start_ticks"]:
        return "gone", f"{who} is gone (that process id now belongs to another process)"
    return "alive", f"{who} is running"


@dataclass(frozen=True)
class RunState:
    """What a run folder's manifest says, with the liveness of a ``running`` run checked.

    Attributes:
        status: the recorded status (one of :data:`RUN_STATUSES`), or None when none is recorded.
        state: ``status``, except ``died`` for a ``running`` run whose owner is gone (see :func:`owner_state`).
        owner_state: ``alive``/``gone``/``unknown`` for a ``running`` run, None otherwise.
        why: the owner phrase (e.g. ``process 12 on host h is gone``); '' when not running.
        owner: the manifest's ``owner`` record ({} when none).
        heartbeat: the last ``{"time", "step"}`` recorded, or None.
    """

    status: str | None
    state: str | None
    owner_state: OwnerState | None
    why: str
    owner: dict[str, Any]
    heartbeat: dict[str, Any] | None

    def describe(self) -> str:
        """One phrase for a message: ``died (process 12 on host h is gone; last heartbeat ... at step 40, 3 min
        ago)``, ``running (process 12 on host h is running; ...)``, or the status."""
        if self.owner_state is None:
            return str(self.state)
        return f"{self.state} ({self.why}; {describe_heartbeat(self.heartbeat)})"


def describe_heartbeat(heartbeat: Any) -> str:
    """``last heartbeat <time> at step <n>, <age> ago`` (``no heartbeat recorded`` when there is none)."""
    if not isinstance(heartbeat, Mapping) or not heartbeat.get("time"):
        return "no heartbeat recorded"
    stamp = str(heartbeat["time"])
    text = f"last heartbeat {stamp}"
    if heartbeat.get("step") is not None:
        text += f" at step {heartbeat['step']}"
    try:
        age = time.time() - time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z"))
    except ValueError:
        return text
    return text + f", {_duration(age)} ago"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_state(run_dir: str | Path) -> RunState:
    """The run's :class:`RunState` (``died`` when its manifest says ``running`` but its owner is gone)."""
    manifest = read_manifest(run_dir)
    status = manifest.get("status") if isinstance(manifest.get("status"), str) else None
    owner = manifest.get("owner") if isinstance(manifest.get("owner"), dict) else {}
    heartbeat = manifest.get("heartbeat")
    heartbeat = heartbeat if isinstance(heartbeat, dict) else ({"time": heartbeat} if heartbeat else None)
    if status != "running":
        return RunState(status=status, state=status, owner_state=None, why="", owner=owner, heartbeat=heartbeat)
    alive, why = owner_state(owner)
    return RunState(status=status, state="died" if alive == "gone" else "running", owner_state=alive, why=why,
                    owner=owner, heartbeat=heartbeat)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a DataLoader worker's re-raised error keeps only its last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # torch's ExceptionWrapper: "Caught X in worker ..."
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


ABSENT = "<absent>"


def config_differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(yaml.path, old, new)`` for every leaf that differs between two plain configs (absent = ``<absent>``).

    A block that is absent (or null) on one side and a mapping on the other compares as an empty mapping: the
    differences are its leaves (``experiment.resume: <absent> -> 'runs/x'``), never the whole block, so a block
    that one side lacks is judged by the keys the other side gives it.
    """
    if isinstance(old, dict) or isinstance(new, dict):
        if old in (ABSENT, None):
            old = {}
        if new in (ABSENT, None):
            new = {}
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            out += config_differences(old.get(key, ABSENT), new.get(key, ABSENT), where)
        return out
    return [] if old == new else [(path, old, new)]


def rewind_history(run_dir: str | Path, step: int) -> int:
    """Prepare ``history.jsonl`` for a resume from a checkpoint at optimizer step ``step``.

    Rows after the last training/validation row with ``step <= step`` were logged by the interrupted run
    after its last checkpoint; the resumed run logs them again. They move (appended, with the resume step) to
    ``history.superseded.jsonl``, so no row is duplicated and none is lost. A last line that is no JSON (a run
    killed while it wrote the line) moves too, as ``{"unparsed": <the text>}``.

    Returns:
        The number of rows moved.

    Raises:
        RunFolderError: a line before the last one is no JSON (the file was damaged; nothing is moved).
    """
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise RunFolderError(f"{path} line {number} is not JSON ({err}); the run's history is damaged") from err
            rows.append({"unparsed": line})
    keep = 0
    for index, row in enumerate(rows):
        row_step = row.get("step")
        if row_step is not None and row_step <= step:
            keep = index + 1
    moved = rows[keep:]
    if moved:
        with (Path(run_dir) / SUPERSEDED_HISTORY).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"superseded_by_resume_from_step": step, **row}) + "\n" for row in moved)
        write_text_atomic(path, "".join(line + "\n" for line in lines[:keep]))
    return len(moved)
