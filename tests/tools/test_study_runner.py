"""The study runner's lock (one study process per folder) and its liveness rule (never a live run resumed)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dl_utils.run import owner_record
from tools.study import plan, runner

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "projects" / "normative_eval" / "configs"
HOLDER = ("import sys, time; from pathlib import Path; from tools.study.runner import lock_study; "
          "lock = lock_study(Path(sys.argv[1])); print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes the study lock and keeps it ``seconds`` (once it printed 'held')."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path):
    holder = _holder(tmp_path / "study", 120)
    try:
        with pytest.raises(runner.StudyLocked) as refused:
            runner.lock_study(tmp_path / "study")
        assert f"{tmp_path / 'study'} is in use by tools.study process {holder.pid} on host " \
               f"{socket.gethostname()} since " in str(refused.value)
        assert "pass --wait" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait()
    with runner.lock_study(tmp_path / "study") as lock:
        assert f"process {os.getpid()} on host" in Path(lock.name).read_text()


def test_wait_takes_the_lock_once_the_holder_ends(tmp_path):
    holder = _holder(tmp_path / "study", 2.0)
    start = time.monotonic()
    with runner.lock_study(tmp_path / "study", wait=True):
        waited = time.monotonic() - start
    assert waited > 1.5, "the lock was taken while its holder still held it"
    assert holder.wait(timeout=30) == 0


def _job_run(study: plan.Study, job: plan.Job, owner: dict) -> Path:
    """A run folder of ``job`` that says 'running' with a latest.pt, owned by ``owner``."""
    run = study.output_dir / study.experiment / job.method.name / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    (run / "config.yaml").write_text(json.dumps({"overrides": list(job.overrides(study))}))
    (run / "manifest.json").write_text(json.dumps({"status": "running", "owner": owner,
                                                   "heartbeat": {"time": "2026-01-01T00:00:00+0000", "step": 5}}))
    return run


@pytest.mark.parametrize(("owner", "resumed"), [
    ("this process", False),  # alive: a user's core/Main.py training it right now
    ("another host", False),  # cannot be checked from here
    ("a dead process", True),  # died: resumed
])
def test_a_live_run_is_never_resumed_and_a_died_one_is(owner: str, resumed: bool, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tools.study.runner")
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\nmethods:\n"
                    f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n")
    study = plan.load_study(path)
    (job,) = study.jobs()
    record = {"this process": owner_record(), "another host": {**owner_record(), "host": "elsewhere"},
              "a dead process": {**owner_record(), "pid": 2 ** 22 + 1}}[owner]  # above any Linux pid_max
    run = _job_run(study, job, record)
    calls: list[list[str]] = []

    def launch(command, log_path):
        calls.append(list(command))
        return 1

    assert runner.run_job(study, job, {}, launch=launch) is None
    if resumed:
        (command,) = calls
        assert f"experiment.resume={run}" in command
        assert f"resuming {run} (died (process {2 ** 22 + 1} on host" in caplog.text
    else:
        assert calls == []
        assert f"{run} " in caplog.text and "not resumed" in caplog.text
