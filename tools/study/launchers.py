"""Where a study's jobs run: here, one or several at a time (``--launcher local [--jobs N]``), or each as a SLURM job
(``--launcher slurm``, :mod:`tools.study.slurm`).

:func:`run_schedule` keeps every job's state and logs one line per change::

    waiting -> queued -> running -> finished | failed
    waiting -> skipped (its finished run exists)   waiting | queued -> blocked (a job it needs failed)

A job starts once the jobs it needs (``weights_from``, ``stage1``, same seed) have finished; a backend that lets the
cluster order jobs (SLURM ``afterok``) gets it as soon as they are submitted. Either way the job resolves their run
folders when it starts (:func:`tools.study.runner.run_job` runs where the job runs), since they do not exist before.
``runs.json`` is written by this process only, as jobs finish. A :class:`Backend` starts jobs and reports their
states: :class:`LocalBackend` runs each job as a ``core/Main.py`` subprocess from a thread of this process, at most
``jobs`` at a time, each pinned to its own GPU (``CUDA_VISIBLE_DEVICES``) where there are GPUs and to its share of the
CPU threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``); :class:`tools.study.slurm.SubmititBackend` submits through
submitit.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from core.Configurator import ConfigError
from dl_utils.files import write_text_atomic
from tools.study import runner
from tools.study.plan import Job, LauncherSettings, SlurmSettings, Study, finished_run

logger = logging.getLogger(__name__)

JobState = Literal["waiting", "queued", "running", "finished", "skipped", "failed", "blocked"]
DONE = ("finished", "skipped")
ENDED = ("finished", "skipped", "failed", "blocked")


@dataclass
class Tracked:
    """One job of a schedule: its state, where it runs and what it left.

    Attributes:
        job: the study job.
        needs: keys of the jobs of this schedule it starts from (its method's ``weights_from``/``stage1``, same seed).
        state: see the module docstring.
        where: where it runs, for the progress lines (``here, CUDA_VISIBLE_DEVICES=1``, ``SLURM job 12``).
        detail: the finished run folder, or why it failed.
        entry: its ``runs.json`` entry once finished (run, wall time, load).
        handle: the backend's handle (a future, a submitit job).
        launcher_id: the backend's job id (a SLURM job id), None here.
    """

    job: Job
    needs: tuple[str, ...]
    state: JobState = "waiting"
    where: str = ""
    detail: str = ""
    entry: dict[str, Any] | None = None
    handle: Any = None
    launcher_id: str | None = None

    @property
    def key(self) -> str:
        return self.job.key


@dataclass(frozen=True)
class Update:
    """A job's new state as a backend reports it (``entry``: its runs.json entry, for ``finished``)."""

    state: JobState
    detail: str = ""
    entry: dict[str, Any] | None = None
    where: str | None = None


class Backend(Protocol):
    """What :func:`run_schedule` needs from a place to run jobs."""

    submits_ahead: bool  # True: a job may be handed over before the jobs it needs finished (the cluster orders them)

    def free(self) -> int:
        """How many more jobs can start now."""

    def adopt(self, tracked: Sequence[Tracked]) -> dict[str, Update]:
        """States of jobs an earlier study process left queued, running or finished (no job is started)."""

    def start(self, tracked: Tracked, after: Sequence[Tracked]) -> Update:
        """Start (or submit) a job whose dependencies ``after`` are handed over but not finished yet."""

    def poll(self, active: Sequence[Tracked]) -> dict[str, Update]:
        """New states of queued and running jobs (only those that changed)."""

    def cancel(self, tracked: Tracked) -> None:
        """Withdraw a queued job."""

    def wait(self) -> None:
        """Block until a job may have changed (a job ended, or a polling interval passed)."""

    def interrupted(self, active: Sequence[Tracked]) -> str:
        """What became of the active jobs when this process was interrupted (one sentence)."""


# ------------------------------------------------------------------------------------------------ the schedule
def needs_of(study: Study, job: Job) -> tuple[str, ...]:
    """The keys of the jobs ``job`` starts from: its method's dependencies with the same seed."""
    return tuple(Job(method=study.method(n), seed=job.seed).key for n in job.method.needs)


def run_schedule(study: Study, jobs: Sequence[Job], state: runner.State, backend: Backend) -> list[Tracked]:
    """Run ``jobs`` through ``backend`` in dependency order, logging each state change; ``state`` (the study's
    ``runs.json``) gains each finished job's entry and is written after each.

    A job whose finished run exists is skipped; one that needs a job that failed is blocked (and withdrawn if it was
    queued). A dependency outside ``jobs`` (``--only``) is looked up when the job starts.

    Returns:
        Every job with its final state, in ``jobs`` order.
    """
    keys = {j.key for j in jobs}
    tracked = {j.key: Tracked(job=j, needs=tuple(k for k in needs_of(study, j) if k in keys)) for j in jobs}
    path = study.folder / "runs.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def apply(t: Tracked, update: Update) -> None:
        if update.where is not None:
            t.where = update.where
        if update.state == t.state and update.detail == t.detail:
            return
        t.state, t.detail = update.state, update.detail
        if update.entry is not None:
            t.entry = state[t.key] = update.entry
            write_state(path, state)
        logger.info("%s", progress_line(study, t))

    for key, update in backend.adopt(list(tracked.values())).items():
        apply(tracked[key], update)
    for t in tracked.values():
        done = finished_run(study, t.job) if t.state == "waiting" else None
        if done is not None:
            apply(t, Update("skipped", detail=str(done)))
    try:
        while not all(t.state in ENDED for t in tracked.values()):
            before = [(t.state, t.detail) for t in tracked.values()]
            for t in tracked.values():
                _advance(t, [tracked[k] for k in t.needs], backend, apply)
            active = [t for t in tracked.values() if t.state in ("queued", "running")]
            for key, update in backend.poll(active).items():
                apply(tracked[key], update)
            if [(t.state, t.detail) for t in tracked.values()] == before:
                backend.wait()
    except KeyboardInterrupt:
        active = [t for t in tracked.values() if t.state in ("queued", "running")]
        logger.error("interrupted with %d job(s) queued or running; %s", len(active), backend.interrupted(active))
        raise
    finally:
        write_state(path, state)
    return list(tracked.values())


def write_state(path: Path, state: runner.State) -> None:
    """Write ``runs.json`` atomically (a temporary file renamed over it: a reader never sees half a file)."""
    write_text_atomic(path, json.dumps(state, indent=2, sort_keys=True))


def _advance(t: Tracked, deps: Sequence[Tracked], backend: Backend, apply: Callable[[Tracked, Update], None]) -> None:
    """Block ``t`` if a job it needs failed (withdrawing it if queued), or start it if it may start."""
    failed = [d.key for d in deps if d.state in ("failed", "blocked")]
    if failed and t.state in ("waiting", "queued"):
        if t.state == "queued":
            backend.cancel(t)
        apply(t, Update("blocked", detail=f"needs {', '.join(failed)}, which did not finish"))
    elif t.state == "waiting" and backend.free() > 0 and all(
            d.state in DONE or (backend.submits_ahead and d.state in ("queued", "running")) for d in deps):
        apply(t, backend.start(t, after=[d for d in deps if d.state not in DONE]))


def failed_keys(tracked: Sequence[Tracked]) -> list[str]:
    """The keys of the jobs that failed or could not start because a job they need failed."""
    return [t.key for t in tracked if t.state in ("failed", "blocked")]


def progress_line(study: Study, t: Tracked) -> str:
    """The line logged when a job changes state (``<key>: <state> (<where>) ...``)."""
    where = f" ({t.where})" if t.where else ""
    if t.state == "failed":
        return f"{t.key}: failed{where}: {t.detail}; log: {runner.log_path(study, t.job)}"
    if t.state == "finished":
        wall = (t.entry or {}).get("wall_s")
        took = f" in {float(wall):.0f} s" if isinstance(wall, int | float) else ""
        return f"{t.key}: finished{took}{where}: {t.detail}"
    if t.state == "skipped":
        return f"{t.key}: skipped, finished run found: {t.detail}"
    if t.state == "blocked":
        return f"{t.key}: blocked: {t.detail}"
    if t.state == "running":
        return f"{t.key}: running{where}" + (f": {t.detail}" if t.detail else "") + \
            f"; log: {runner.log_path(study, t.job)}"
    return f"{t.key}: {t.state}{where}" + (f": {t.detail}" if t.detail else "")


def summary(study: Study, tracked: Sequence[Tracked]) -> str:
    """A Markdown table of the jobs: key, where it ran, final state, wall time, and its run folder (or its log)."""
    lines = ["| job | launcher | state | wall s | run or log |", "| --- | --- | --- | ---: | --- |"]
    for t in tracked:
        wall = (t.entry or {}).get("wall_s")
        wall_text = f"{float(wall):.0f}" if isinstance(wall, int | float) else "–"
        place = t.detail if t.state in DONE else str(runner.log_path(study, t.job))
        lines.append(f"| {t.key} | {t.where or '–'} | {t.state} | {wall_text} | {place} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ here
def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries when it is set, else torch's count."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_envs(jobs: int, *, gpus: Sequence[str], cpus: int) -> list[dict[str, str]]:
    """One environment per concurrent job: with GPUs, its own GPU (``CUDA_VISIBLE_DEVICES``); always its share of
    the ``cpus`` CPU threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, at least 1). One job: no change ([{}]).

    Raises:
        ConfigError: more jobs than GPUs (each job needs its own GPU).
    """
    if jobs == 1:
        return [{}]
    if gpus and jobs > len(gpus):
        raise ConfigError(f"--jobs {jobs}: only {len(gpus)} GPU(s) visible ({', '.join(gpus)}) and each job gets its "
                          f"own; use --jobs {len(gpus)} or fewer")
    threads = str(max(1, cpus // jobs))
    return [{**({"CUDA_VISIBLE_DEVICES": gpus[k]} if gpus else {}), "OMP_NUM_THREADS": threads,
             "MKL_NUM_THREADS": threads} for k in range(jobs)]


class LocalBackend:
    """Jobs on this machine: each :func:`tools.study.runner.run_job` in a thread (its run a subprocess), at most
    ``jobs`` at a time, each with its slot's environment (:func:`slot_envs`).

    Args:
        study: the study.
        jobs: how many jobs run at once.
        launch: how a run is started (default :func:`tools.study.runner.launch_local`, looked up at call time).
        gpus: the GPUs to pin jobs to (default :func:`visible_gpus`, asked only when ``jobs`` > 1).
        cpus: the CPU threads to share (default: those this process may use).
    """

    submits_ahead = False

    def __init__(self, study: Study, *, jobs: int = 1, launch: runner.Launcher | None = None,
                 gpus: Sequence[str] | None = None, cpus: int | None = None) -> None:
        self.study, self.launch = study, launch
        if jobs > 1 and gpus is None:
            gpus = visible_gpus()
        self.slots = slot_envs(jobs, gpus=list(gpus or ()), cpus=cpus or len(os.sched_getaffinity(0)))
        self.busy: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study-job")

    def free(self) -> int:
        return len(self.slots) - len(self.busy)

    def adopt(self, tracked: Sequence[Tracked]) -> dict[str, Update]:
        return {}  # a job started here ends with this process

    def start(self, tracked: Tracked, after: Sequence[Tracked]) -> Update:
        slot = next(k for k in range(len(self.slots)) if k not in self.busy)
        env = self.slots[slot]
        tracked.handle = self.busy[slot] = self.pool.submit(self._run, tracked.job, env)
        pinned = ", ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")
        return Update("running", where="here" + (f", {pinned}" if pinned else ""))

    def _run(self, job: Job, env: Mapping[str, str]) -> tuple[Path | None, dict[str, Any] | None]:
        state: runner.State = {}
        done = runner.run_job(self.study, job, state, launch=self.launch, env=env or None)
        return done, state.get(job.key)

    def poll(self, active: Sequence[Tracked]) -> dict[str, Update]:
        out: dict[str, Update] = {}
        for t in active:
            future: Future = t.handle
            if not future.done():
                continue
            del self.busy[next(k for k, f in self.busy.items() if f is future)]
            done, entry = future.result()  # an error of the runner itself is a bug: it stops the study
            if done is None:
                out[t.key] = Update("failed", detail="the run did not finish")
            else:
                out[t.key] = Update("finished", detail=str(done), entry=entry or {"run": str(done)})
        return out

    def cancel(self, tracked: Tracked) -> None:
        raise RuntimeError(f"{tracked.key}: a local job is never queued")  # submits_ahead is False

    def wait(self) -> None:
        if self.busy:
            wait(list(self.busy.values()), return_when=FIRST_COMPLETED)

    def interrupted(self, active: Sequence[Tracked]) -> str:
        self.pool.shutdown(wait=True, cancel_futures=True)
        return ("their runs were interrupted with this process (Ctrl-C reaches them too); running the study again "
                "resumes them")


# ------------------------------------------------------------------------------------------------ the choice
def settings_with(settings: LauncherSettings, *, kind: str | None = None, jobs: int | None = None,
                  slurm: Mapping[str, Any] | None = None, sbatch: Sequence[str] = ()) -> LauncherSettings:
    """The study's ``launcher:`` block with the command line's values on top (None: not given).

    Args:
        slurm: :class:`~tools.study.plan.SlurmSettings` fields (``partition``, ``time_min``, ...).
        sbatch: ``option=value`` (or ``option`` for a flag) strings added to ``slurm.sbatch``.

    Raises:
        ConfigError: a value the settings refuse, naming the command line.
    """
    extra: dict[str, str | bool] = {}
    for item in sbatch:
        option, sep, value = item.partition("=")
        extra[option.strip()] = value if sep else True
    try:
        fields = {k: v for k, v in (slurm or {}).items() if v is not None}
        if extra:
            fields["sbatch"] = {**settings.slurm.sbatch, **extra}
        slurm_settings: SlurmSettings = replace(settings.slurm, **fields) if fields else settings.slurm
        return replace(settings, slurm=slurm_settings, **{k: v for k, v in (("kind", kind), ("jobs", jobs))
                                                          if v is not None})
    except ValueError as err:
        raise ConfigError(f"command line: {err}") from err


def backend_for(study: Study, settings: LauncherSettings) -> Backend:
    """The backend ``settings`` ask for (SLURM: :meth:`tools.study.slurm.SubmititBackend.on_slurm`)."""
    if settings.kind == "local":
        return LocalBackend(study, jobs=settings.jobs)
    from tools.study import slurm

    return slurm.SubmititBackend.on_slurm(study, settings.slurm)
