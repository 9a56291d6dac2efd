"""Running a study's jobs: skip a finished run, resume an interrupted one, start the rest, record wall times.

The seam for other launchers: :func:`run_job` hands a job's command line and log file to a ``launch`` callable
(:data:`Launcher`) that returns the exit code; :func:`launch_local` runs it here. :func:`run_jobs` runs jobs one after
another, each after the jobs it needs (``weights_from``, ``stage1``, same seed), which :meth:`Study.jobs` lists
before it; :mod:`tools.study.launchers` runs them several at a time or on SLURM, calling :func:`run_job` where the
job runs (so a job resolves its dependencies when it starts, not when it is queued).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
    resumed = bool(runs) and run_status(runs[-1]) == "resumable"
    if resumed:
        extra.append(f"experiment.resume={runs[-1]}")
        logger.info("%s: resuming the interrupted run %s", job.key, runs[-1])
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
