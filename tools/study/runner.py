"""Running a study's jobs: skip a finished run, resume an interrupted one, start the rest, record wall times.

The seam for other launchers: :func:`run_job` hands a job's command line and log file to a ``launch`` callable
(:data:`Launcher`) that returns the exit code; :func:`launch_local` runs it here. :func:`run_jobs` runs jobs one after
another, each after the jobs it needs (``weights_from``, ``stage1``, same seed), which :meth:`Study.jobs` lists
before it; :mod:`tools.study.launchers` runs them several at a time or on SLURM, calling :func:`run_job` where the
job runs (so a job resolves its dependencies when it starts, not when it is queued).

One study process per study folder: :func:`lock_study` holds an OS lock (``fcntl.flock`` on ``<study>/.study.lock``,
released by the kernel however the process ends, SIGKILL included); a second process is refused with one line
naming the holder, or waits for it. A job whose newest run is being trained by a live process (a user's
``core/Main.py``, say) is neither resumed nor started again, nor one owned by another host (whether it still runs
cannot be seen from here); one whose process died is resumed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from dl_utils.run import now, owner_record, run_state
from tools.study.plan import REPO, Job, Study, finished_run, run_status, runs_of_job

logger = logging.getLogger(__name__)

Launcher = Callable[[Sequence[str], Path], int]
State = dict[str, dict[str, object]]


def launch_local(command: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` in this machine's working directory, appending its output to ``log_path``; its exit code.
    ``env``: variables set for it on top of this process's environment (a GPU or thread pinning)."""
    with log_path.open("a", encoding="utf-8") as log:
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd(), check=False,
                              env={**os.environ, **env} if env else None).returncode


def command(study: Study, job: Job, extra: Sequence[str]) -> list[str]:
    """``python core/Main.py --config_path <config> --set ...``: the job's defining overrides (the study's, the
    seed, the method's), the run's place, the wandb group (the study) and job type (the method), then ``extra``."""
    placing = [f"experiment.name={study.experiment}", f"experiment.output_dir={study.output_dir}",
               f"name={job.method.name}", f"wandb.group={study.name}", f"wandb.job_type={job.method.name}"]
    out = [sys.executable, str(REPO / "core" / "Main.py"), "--config_path", str(job.method.config)]
    for s in [*job.overrides(study), *placing, *extra]:  # the study's placing wins over an override
        out += ["--set", s]
    return out


def _dependency_sets(study: Study, job: Job) -> list[str] | None:
    """The ``--set`` values pointing at the finished runs this job needs; None when one of them is missing."""
    extra: list[str] = []
    method = job.method
    if method.weights_from is not None:
        source = finished_run(study, Job(method=study.method(method.weights_from), seed=job.seed))
        if source is None:
            logger.error("%s: needs the weights of %s, which has no finished run", job.key, method.weights_from)
            return None
        extra += ["experiment.task=evaluate", f"experiment.weights={source / 'checkpoints' / 'best.pt'}"]
    if method.stage1 is not None:
        source = finished_run(study, Job(method=study.method(method.stage1.method), seed=job.seed))
        if source is None:
            logger.error("%s: needs the stage-1 checkpoint of %s, which has no finished run", job.key,
                         method.stage1.method)
            return None
        extra.append(f"{method.stage1.key}={source / 'checkpoints' / method.stage1.checkpoint}")
    return extra


def log_path(study: Study, job: Job) -> Path:
    """The job's log: ``<study folder>/logs/<job key, '/' as '_'>.log`` (every attempt appends to it)."""
    return study.folder / "logs" / f"{job.key.replace('/', '_')}.log"


def run_job(study: Study, job: Job, state: State, *, launch: Launcher | None = None,
            env: Mapping[str, str] | None = None) -> Path | None:
    """Run (or skip, or resume) one job; returns its finished run folder, or None if it failed.

    ``launch`` starts the run (default :func:`launch_local`, looked up at call time); ``env`` (variables for the
    run's process, e.g. ``CUDA_VISIBLE_DEVICES``) is passed to it as ``env=`` when given.

    A finished run of the job (:func:`tools.study.plan.runs_of_job`: same method, seed and defining overrides) is
    kept as it is; the newest run of the job that holds ``checkpoints/latest.pt`` but did not finish is resumed
    (``experiment.resume``); otherwise a new run starts. A started run's wall time,
    mean 1-minute load average and CPU count go to ``state[job.key]``.
    """
    done = finished_run(study, job)
    if done is not None:
        logger.info("%s: finished run %s found, skipped", job.key, done)
        return done
    extra: list[str] = []
    runs = runs_of_job(study, job)
    other = [r for r in study.runs_of(job.method) if r not in runs and run_status(r) == "finished"]
    if other:
        logger.info("%s: %d finished run(s) of %s made with another seed or other overrides are not reused (newest: "
                    "%s)", job.key, len(other), job.method.name, other[-1])
    newest = run_state(runs[-1]) if runs else None
    if newest is not None and newest.owner_state == "alive":
        logger.error("%s: %s is %s; not resumed or started again (one trainer per run folder)", job.key, runs[-1],
                     newest.describe())
        return None
    if newest is not None and newest.owner_state == "unknown":
        logger.error("%s: %s says 'running', owned by %s; not resumed (if that process is gone: core/Main.py with "
                     "--set experiment.resume=%s --set experiment.force_resume=true)", job.key, runs[-1], newest.why,
                     runs[-1])
        return None
    resumed = bool(runs) and run_status(runs[-1]) == "resumable"
    if resumed:
        extra.append(f"experiment.resume={runs[-1]}")
        assert newest is not None
        logger.info("%s: resuming %s (%s)", job.key, runs[-1], newest.describe())
    needed = _dependency_sets(study, job)
    if needed is None:
        return None
    log = log_path(study, job)
    log.parent.mkdir(parents=True, exist_ok=True)
    line = command(study, job, [*extra, *needed])
    logger.info("%s: %s (log: %s)", job.key, " ".join(line[1:]), log)
    start = time.perf_counter()
    with LoadSampler() as load:
        code = (launch or launch_local)(line, log, **({"env": env} if env else {}))
    wall = time.perf_counter() - start
    done = finished_run(study, job)
    if code != 0 or done is None:
        logger.error("%s: failed (exit %d) after %.0f s; see %s", job.key, code, wall, log)
        return None
    state[job.key] = {"run": str(done), "wall_s": wall, "resumed": resumed, "load_average": load.mean,
                      "cpus": os.cpu_count()}
    logger.info("%s: finished in %.0f s (mean 1-minute load average %.2f on %s CPUs) (%s)", job.key, wall,
                load.mean, os.cpu_count(), done)
    return done


class StudyLocked(Exception):  # noqa: N818 - the message is the whole story: who holds the study
    """Another process holds the study folder's lock."""


LOCK_FILE = ".study.lock"


def lock_study(folder: Path, *, wait: bool = False) -> IO[str]:
    """Take the study folder's lock (one ``tools.study`` per study folder at a time).

    Returns the open lock file: the lock lasts while it stays open, and ends when it is closed or the process ends
    in any way (the kernel releases an ``flock`` of a killed process). The file names its holder (process, host,
    since when) for the message a second process gets.

    Args:
        folder: the study folder (created if needed).
        wait: wait for the holder to end instead of raising.

    Raises:
        StudyLocked: another process holds the lock and ``wait`` is False (the message names the holder).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        if not wait:
            handle.close()
            raise StudyLocked(f"{folder} is in use by {holder} (lock {path}); wait for it to end, or pass --wait to "
                              "start when it does") from None
        logger.info("waiting for %s to end (lock %s)", holder, path)
        fcntl.flock(handle, fcntl.LOCK_EX)
    me = owner_record()
    handle.seek(0)
    handle.truncate()
    handle.write(f"tools.study process {me['pid']} on host {me['host']} since {now()}\n")
    handle.flush()
    return handle


def read_state(study: Study) -> State:
    """``runs.json`` of the study folder (job key -> run, wall time, load), empty when there is none yet."""
    path = study.folder / "runs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_jobs(study: Study, jobs: Sequence[Job], state: State, *, launch: Launcher | None = None) -> list[str]:
    """Run ``jobs`` here, one after another in dependency order, writing ``runs.json`` after each; the keys of the
    jobs that failed (or could not start because a job they need failed). See :mod:`tools.study.launchers`."""
    from tools.study import launchers  # it builds on this module

    backend = launchers.LocalBackend(study, jobs=1, launch=launch)
    return launchers.failed_keys(launchers.run_schedule(study, jobs, state, backend))


class LoadSampler:
    """Samples the 1-minute load average every ``interval`` seconds while a run is in progress (a context
    manager); ``mean`` is their mean (the load at exit when the run was shorter than one interval), so a wall
    time can be read against how busy the machine was."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if not self.samples:
            self.samples.append(os.getloadavg()[0])

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)
