"""The study on SLURM, through submitit (``python -m tools.study STUDY.yaml --launcher slurm``).

Each job (one method and seed) is a SLURM job running :class:`StudyJob` on its compute node: it calls
:func:`tools.study.runner.run_job` there, which skips a finished run, resumes an interrupted one, resolves the run
folders of the jobs it needs (they did not exist when it was submitted) and runs ``core/Main.py`` as a subprocess
with its log in ``<study>/logs/<job>.log``; the job returns its ``runs.json`` entry. Every job is submitted at once, one
that needs another's weights or stage-1 checkpoint with ``--dependency=afterok:<that job's id>``, so independent
methods and seeds run side by side and a dependent job starts only after its source completed.

Time limits and preemption: SLURM signals the job ``signal_delay_s`` before its time limit (``USR2``, submitit's
checkpoint signal); submitit calls :meth:`StudyJob.checkpoint`, which ends the run with SIGTERM (``core/Main.py``
records it as interrupted; its ``latest.pt`` stays) and requeues the job, at most ``max_requeues`` times for time
limits. The requeued job finds the interrupted run and resumes it. A preempted job whose run SLURM ended with SIGTERM
resumes the same way when SLURM requeues it.

The study process only submits and watches. The job ids go to ``<study>/slurm/jobs.json`` and submitit's files
(batch script, pickles, the job's own output) to ``<study>/slurm/<job id>/``. States come from ``squeue`` (no
accounting database needed); a job that left the queue is judged by the result submitit wrote for it. If the study
process ends (Ctrl-C, a closed login session), the jobs go on: running the study again attaches to those still
queued or running (matched by id and job name) instead of submitting them twice, and takes the runs.json entries of
those that finished meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, pickle_load

from core.Configurator import ConfigError
from dl_utils.files import write_text_atomic
from tools.study import runner
from tools.study.launchers import JobState, Tracked, Update
from tools.study.plan import REPO, Job, SlurmSettings, Study, finished_run

logger = logging.getLogger(__name__)

# squeue's job states that are not final, and what the study calls them
LIVE_STATES: dict[str, JobState] = {
    "PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued", "PREEMPTED": "queued", "SUSPENDED": "queued", "RESV_DEL_HOLD": "queued",
    "RUNNING": "running", "COMPLETING": "running", "RESIZING": "running", "SIGNALING": "running",
    "STAGE_OUT": "running"}
REQUEUED_STATES = ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED")
RESULT_GRACE_S = 120.0  # how long a job that left the queue may take to show its result (a slow shared filesystem)
EXIT_MEANINGS = {1: "the run failed", 2: "a configuration error",
                 128 + signal.SIGINT: "interrupted by SIGINT (cancelled); the next submission resumes it",
                 128 + signal.SIGTERM: "interrupted by SIGTERM (preempted, cancelled or out of time); the next "
                                       "submission resumes it"}


class JobFailed(RuntimeError):
    """A study job whose run did not finish (raised on the compute node, so that SLURM marks the job FAILED and no
    ``afterok`` dependent starts)."""


def pythonpath_line() -> str:
    """The shell line that makes this repository importable in a job (the job unpickles :class:`StudyJob`)."""
    return f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"


def thread_env() -> dict[str, str]:
    """A job's thread count: SLURM's CPUs of the job (``SLURM_CPUS_PER_TASK``) unless ``OMP_NUM_THREADS`` is set."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        return {"OMP_NUM_THREADS": cpus, "MKL_NUM_THREADS": cpus}
    return {}


def checkpoint_signal() -> signal.Signals:
    """The signal SLURM sends before a job's time limit, as submitit asks for it (``USR2`` unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


def _ignore_checkpoint_signal() -> None:
    signal.signal(checkpoint_signal(), signal.SIG_IGN)


class StudyJob(submitit.helpers.Checkpointable):
    """One study job where SLURM (or submitit's local executor) runs it; submitit pickles it with the parsed study.

    Args:
        study: the parsed study (paths absolute, as the study process resolved them).
        job: the job (method and seed).
        program: replaces ``python core/Main.py`` in the run's command line (None: this Python and ``core/Main.py``);
            the rest of the command (``--config_path ... --set ...``) stays.
        grace_s: how long :meth:`checkpoint` waits for the run to end after SIGTERM before it kills it.
    """

    def __init__(self, study: Study, job: Job, *, program: Sequence[str] | None = None, grace_s: float = 60.0) -> None:
        self.study, self.job, self.grace_s = study, job, grace_s
        self.program = tuple(program) if program else None
        self._process: subprocess.Popen | None = None
        self._code: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}

    def __call__(self) -> dict[str, Any]:
        """Run the job here; its runs.json entry (run, wall time, load, where it ran).

        Raises:
            JobFailed: the run did not finish (naming the exit code and the log).
        """
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stdout)  # the job's output file, which errors name
        environment = submitit.JobEnvironment()
        where = f"{'SLURM' if environment.cluster == 'slurm' else environment.cluster} job {environment.job_id} on " \
                f"{environment.hostname}"
        logger.info("%s: starting (%s)", self.job.key, where)
        state: runner.State = {}
        done = runner.run_job(self.study, self.job, state, launch=self._launch, env=thread_env() or None)
        if done is None:
            if self._code is None:  # run_job said why on this job's output
                raise JobFailed(f"not started (a run it needs has not finished, or its newest run belongs to a live "
                                f"or unverifiable process): see {environment.paths.stdout}")
            raise JobFailed(f"the run exited with {self._code} ({EXIT_MEANINGS.get(self._code, 'see the log')})")
        return {**(state.get(self.job.key) or {"run": str(done)}), "where": where}

    def _launch(self, command: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None) -> int:
        line = [*self.program, *command[2:]] if self.program else list(command)
        with log_path.open("a", encoding="utf-8") as log:
            # SLURM sends the checkpoint signal to every process of the job: the run ignores it (its default action
            # would kill the run unrecorded) and is ended by checkpoint() with SIGTERM instead
            self._process = subprocess.Popen(line, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **(env or {})}, preexec_fn=_ignore_checkpoint_signal)
            # poll rather than wait(): the checkpoint signal's handler must be able to wait for the process itself
            while (code := self._process.poll()) is None:
                time.sleep(0.5)
        self._code = code
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the time-limit (or preemption) signal: end the run so that it is recorded as
        interrupted, then hand submitit a fresh job to requeue (it resumes the run)."""
        process = self._process
        if process is not None and process.poll() is None:
            logger.warning("%s: time limit near or preempted: ending the run (SIGTERM); the requeued job resumes it",
                           self.job.key)
            process.terminate()
            deadline = time.monotonic() + self.grace_s
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.poll() is None:
                logger.error("%s: the run did not end within %.0f s of SIGTERM; killed", self.job.key, self.grace_s)
                process.kill()
        return submitit.helpers.DelayedSubmission(StudyJob(self.study, self.job, program=self.program,
                                                           grace_s=self.grace_s))


@dataclass(frozen=True)
class QueueRow:
    """One job as ``squeue`` lists it."""

    state: str
    node: str
    name: str


def squeue_states(ids: Sequence[str]) -> dict[str, QueueRow] | None:
    """``squeue``'s view of the jobs ``ids`` (finished ones too, while the controller still lists them); a job it
    no longer knows is absent. None when squeue itself failed (the states are then unknown, not final)."""
    if not ids:
        return {}
    try:
        done = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}",
                               "--format=%i|%T|%N|%j"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("squeue failed (%s); job states unknown until the next look", err)
        return None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        logger.warning("squeue failed (exit %d: %s); job states unknown until the next look", done.returncode,
                       done.stderr.strip())
        return None
    rows: dict[str, QueueRow] = {}
    for line in done.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            rows[parts[0]] = QueueRow(state=parts[1].split()[0], node=parts[2], name=parts[3])
    return rows


def sbatch_parameters(settings: SlurmSettings, *, cwd: Path) -> dict[str, Any]:
    """:class:`submitit.SlurmExecutor` parameters for ``settings`` (the job runs in ``cwd``, as the study does)."""
    params: dict[str, Any] = {
        "time": settings.time_min, "cpus_per_task": settings.cpus_per_job, "signal_delay_s": settings.signal_delay_s,
        "stderr_to_stdout": True, "setup": [pythonpath_line(), *settings.setup],
        "additional_parameters": {"chdir": str(cwd), **settings.sbatch}}
    if settings.partition:
        params["partition"] = settings.partition
    if settings.gpus_per_job:
        params["gpus_per_node"] = settings.gpus_per_job
    if settings.mem_gb:
        params["mem"] = f"{round(settings.mem_gb * 1024)}M"
    return params


class SubmititBackend:
    """Study jobs through a submitit executor: SLURM (:meth:`on_slurm`; the cluster orders dependent jobs) or
    submitit's ``LocalExecutor`` (tests; this process orders them).

    Args:
        study: the study.
        executor: a submitit executor with its parameters set (its folder should contain ``%j``).
        poll_s: seconds between two looks at the jobs.
        program, grace_s: passed to every :class:`StudyJob`.
    """

    def __init__(self, study: Study, executor: submitit.Executor, *, poll_s: float,
                 program: Sequence[str] | None = None, grace_s: float = 60.0) -> None:
        self.study, self.executor, self.poll_s = study, executor, poll_s
        self.program, self.grace_s = program, grace_s
        self.slurm = isinstance(executor, submitit.SlurmExecutor)
        self.submits_ahead = self.slurm
        self.record = study.folder / "slurm" / "jobs.json"
        self._ended_at: dict[str, float] = {}

    @classmethod
    def on_slurm(cls, study: Study, settings: SlurmSettings) -> SubmititBackend:
        """The SLURM backend (jobs submitted with sbatch from this machine).

        Raises:
            ConfigError: sbatch, squeue or srun is not on this machine.
        """
        missing = [tool for tool in ("sbatch", "squeue", "srun", "scancel") if shutil.which(tool) is None]
        if missing:
            raise ConfigError(f"--launcher slurm: {', '.join(missing)} not found on PATH; run the study where jobs can "
                              f"be submitted (a login node), or start a local cluster (tools/slurm_local/setup.sh)")
        executor = submitit.SlurmExecutor(folder=study.folder / "slurm" / "%j", max_num_timeout=settings.max_requeues)
        executor.update_parameters(**sbatch_parameters(settings, cwd=Path.cwd()))
        return cls(study, executor, poll_s=settings.poll_s, grace_s=max(5.0, settings.signal_delay_s - 30.0))

    def job_name(self, job: Job) -> str:
        return f"{self.study.name}:{job.key}"

    def _where(self, job_id: str, node: str = "") -> str:
        kind = "SLURM job" if self.slurm else "submitit local job"
        return f"{kind} {job_id}" + (f" on {node}" if node and node != "(null)" else "")

    def _read_record(self) -> dict[str, str]:
        return json.loads(self.record.read_text()) if self.record.is_file() else {}

    def _write_record(self, key: str, job_id: str) -> None:
        recorded = {**self._read_record(), key: job_id}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record, json.dumps(recorded, indent=2, sort_keys=True))

    def _job(self, job_id: str) -> submitit.SlurmJob:
        return submitit.SlurmJob(folder=self.study.folder / "slurm" / "%j", job_id=job_id)

    def free(self) -> int:
        return len(self.study.methods) * len(self.study.seeds)  # the cluster (or submitit) queues them

    def adopt(self, tracked: Sequence[Tracked]) -> dict[str, Update]:
        """SLURM jobs of this study recorded in ``jobs.json``: those still queued or running are attached to, those
        that finished with the job's current finished run give their runs.json entry.

        Raises:
            ConfigError: squeue cannot tell the recorded jobs' states (submitting again could run a job twice).
        """
        recorded = self._read_record() if self.slurm else {}
        mine = [t for t in tracked if t.key in recorded]
        if not mine:
            return {}
        rows = squeue_states([recorded[t.key] for t in mine])
        if rows is None:
            raise ConfigError(f"squeue cannot tell the states of the jobs this study submitted earlier "
                              f"({self.record}); not submitting them again")
        out: dict[str, Update] = {}
        for t in mine:
            job_id, row = recorded[t.key], rows.get(recorded[t.key])
            job = self._job(job_id)
            if row is not None and row.name == self.job_name(t.job) and row.state in LIVE_STATES:
                t.handle, t.launcher_id = job, job_id
                out[t.key] = Update(LIVE_STATES[row.state], detail="submitted earlier, attached",
                                    where=self._where(job_id, row.node))
                continue
            if not job.paths.result_pickle.is_file():
                continue
            outcome, value = pickle_load(job.paths.result_pickle)
            done = finished_run(self.study, t.job)
            if outcome == "success" and done is not None and value.get("run") == str(done):
                t.handle, t.launcher_id = job, job_id
                out[t.key] = Update("finished", detail=str(done), entry=value, where=value.get("where"))
        return out

    def start(self, tracked: Tracked, after: Sequence[Tracked]) -> Update:
        if self.slurm:
            dependency = "afterok:" + ":".join(str(d.launcher_id) for d in after) if after else None
            self.executor.update_parameters(job_name=self.job_name(tracked.job), dependency=dependency)
        try:
            job = self.executor.submit(StudyJob(self.study, tracked.job, program=self.program, grace_s=self.grace_s))
        except (FailedJobError, FailedSubmissionError) as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            return Update("failed", detail=f"not submitted: {lines[-1] if lines else err}")
        tracked.handle, tracked.launcher_id = job, str(job.job_id)
        self._write_record(tracked.key, tracked.launcher_id)
        detail = "after " + ", ".join(f"{d.key} ({d.launcher_id})" for d in after) if after else ""
        return Update("queued", detail=detail, where=self._where(tracked.launcher_id))

    def poll(self, active: Sequence[Tracked]) -> dict[str, Update]:
        rows = squeue_states([str(t.launcher_id) for t in active]) if self.slurm else {}
        if rows is None:
            return {}
        out: dict[str, Update] = {}
        for t in active:
            job_id = str(t.launcher_id)
            if self.slurm:
                row = rows.get(job_id)
                if row is not None and row.state in LIVE_STATES:
                    state = LIVE_STATES[row.state]
                    if row.state in REQUEUED_STATES or (state == "queued" and t.state == "running"):
                        detail = "requeued (time limit or preemption): the run resumes when the job starts again"
                    else:  # a queued job keeps what it waits for, a running one what it was (attached)
                        detail = t.detail if state == t.state or state == "queued" else ""
                    out[t.key] = Update(state, detail=detail, where=self._where(job_id, row.node))
                    continue
                ended = row.state if row is not None else "no longer listed by squeue"
            else:
                if t.handle.state == "RUNNING":
                    out[t.key] = Update("running", where=self._where(job_id))
                    continue
                ended = t.handle.state
            update = self._outcome(t, ended)
            if update is not None:
                out[t.key] = update
        return out

    def _outcome(self, t: Tracked, ended: str) -> Update | None:
        """A job that left the queue (``ended``: its last state): finished or failed by its result; None while the
        result may still be on its way."""
        result = t.handle.paths.result_pickle
        if not result.is_file():
            first = self._ended_at.setdefault(t.key, time.monotonic())
            if time.monotonic() - first < RESULT_GRACE_S and ended in ("COMPLETED", "FINISHED"):
                return None
            return Update("failed", detail=f"{ended}, without a result (see {t.handle.paths.stdout})")
        outcome, value = pickle_load(result)
        if outcome == "success":
            return Update("finished", detail=str(value["run"]), entry=value, where=value.get("where"))
        lines = [line.strip() for line in str(value).splitlines() if line.strip()]
        reason = lines[-1].removeprefix(f"{JobFailed.__module__}.{JobFailed.__name__}: ") if lines else "no reason"
        return Update("failed", detail=f"{ended}: {reason}")

    def cancel(self, tracked: Tracked) -> None:
        tracked.handle.cancel(check=False)

    def wait(self) -> None:
        time.sleep(self.poll_s)

    def interrupted(self, active: Sequence[Tracked]) -> str:
        ids = " ".join(str(t.launcher_id) for t in active)
        if not self.slurm:
            return f"submitit's local jobs {ids} go on in the background"
        return (f"the SLURM jobs {ids} stay queued or running; running the study again attaches to them "
                f"(`scancel {ids}` withdraws them)")
