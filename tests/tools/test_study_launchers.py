"""tools.study launchers: the launcher block and options, the schedule (dependencies, parallel jobs, pinning, blocked
jobs, progress lines, summary), and submitit (its local executor: jobs in their own processes that resolve their
dependencies when they start, and a job signalled before its time limit that is requeued and resumes its run).

The runs are made by tests/tools/_fake_main.py (a stand-in for core/Main.py that takes the same command line), so
each job costs a fraction of a second; tests/tools/test_study_slurm.py runs real methods on a real SLURM.
"""

import json
import logging
import sys
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import cloudpickle_dump

from core.Configurator import ConfigError
from tools.study import launchers, plan, runner, slurm

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "projects" / "normative_eval" / "configs"
FAKE_MAIN = Path(__file__).with_name("_fake_main.py")
LAUNCH_LOCAL = runner.launch_local


def _study(tmp_path: Path, methods: str, extra: str = "") -> plan.Study:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\nreference: null\n{extra}"
                    f"methods:\n{methods}")
    return plan.load_study(path)


def _method(name: str, *overrides: str, after: str | None = None) -> str:
    sets = ", ".join(overrides)
    return (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, name: {name}, overrides: [{sets}]"
            + (f", weights_from: {after}" if after else "") + "}\n")


def _fake_launch(command, log_path, *, env=None):
    """runner.launch_local with tests/tools/_fake_main.py in place of core/Main.py."""
    return LAUNCH_LOCAL([command[0], str(FAKE_MAIN), *command[2:]], log_path, env=env)


def _calls(study: plan.Study, method: str) -> list[dict]:
    """Every call of the fake Main for ``method``'s runs, in start order."""
    rows = [json.loads(line) for run in study.runs_of(study.method(method))
            for line in (run / "calls.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["start"])


def _set(call: dict, key: str) -> str | None:
    argv = call["argv"]
    return next((argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv) if a == "--set"
                 and argv[i + 1].startswith(f"{key}=")), None)


# ------------------------------------------------------------------------------------------------ settings
def test_the_launcher_block_is_read_with_its_defaults(tmp_path):
    study = _study(tmp_path, _method("a"), "launcher:\n  kind: slurm\n  slurm: {partition: gpu, time_min: 90, "
                                           "gpus_per_job: 1, mem_gb: 16, sbatch: {account: lab, exclusive: true}, "
                                           "setup: [module load cuda]}\n")
    assert study.launcher.kind == "slurm" and study.launcher.jobs == 1
    s = study.launcher.slurm
    assert (s.partition, s.time_min, s.gpus_per_job, s.cpus_per_job, s.mem_gb) == ("gpu", 90, 1, 1, 16)
    assert s.sbatch == {"account": "lab", "exclusive": True} and s.setup == ("module load cuda",)
    assert _study(tmp_path, _method("a")).launcher == plan.LauncherSettings()


@pytest.mark.parametrize(("block", "message"), [
    ("{kind: slrum}", "launcher.kind: 'slrum' is not one of 'local', 'slurm'"),
    ("{jobs: 0}", "launcher: LauncherSettings: jobs: 0 must be >= 1"),
    ("{kind: slurm, jobs: 2}", "jobs: 2 applies to kind 'local'"),
    ("{slurm: {partiton: gpu}}", "launcher.slurm.partiton: unknown key (did you mean 'partition'?)"),
    ("{slurm: {time_min: 0}}", "launcher.slurm: SlurmSettings: time_min: 0 must be >= 1"),
    ("{slurm: {time_min: 2, signal_delay_s: 120}}", "signal_delay_s: 120 s is not shorter than time_min"),
    ("{slurm: {mem_gb: -1}}", "mem_gb: -1 must be > 0"),
    ("{slurm: {sbatch: {dependency: 'afterok:1'}}}", "sbatch: 'dependency' is set by the study"),
    ("{slurm: {sbatch: {cpus-per-task: 4}}}", "use cpus_per_job:"),
    ("{slurm: {sbatch: {--account: lab}}}", "without dashes"),
    ("{slurm: {sbatch: {account: [a, b]}}}", "launcher.slurm.sbatch: key 'account'"),
    ("{slurm: {setup: module load cuda}}", "launcher.slurm.setup: expected a list"),
])
def test_a_bad_launcher_block_is_refused_at_its_yaml_path(tmp_path, block, message):
    with pytest.raises(ConfigError, match="s.yaml: launcher") as err:
        _study(tmp_path, _method("a"), f"launcher: {block}\n")
    assert message in str(err.value)


def test_command_line_options_win_over_the_study_yaml(tmp_path):
    study = _study(tmp_path, _method("a"), "launcher: {slurm: {partition: cpu, sbatch: {account: lab}}}\n")
    merged = launchers.settings_with(study.launcher, kind="slurm", sbatch=["qos=high", "exclusive"],
                                     slurm={"partition": "gpu", "time_min": None, "mem_gb": 8.0})
    assert merged.kind == "slurm" and merged.slurm.partition == "gpu" and merged.slurm.mem_gb == 8.0
    assert merged.slurm.time_min == plan.SlurmSettings().time_min  # None: not given on the command line
    assert merged.slurm.sbatch == {"account": "lab", "qos": "high", "exclusive": True}
    assert launchers.settings_with(study.launcher) == study.launcher
    with pytest.raises(ConfigError, match="command line: jobs: 3 applies to kind 'local'"):
        launchers.settings_with(study.launcher, kind="slurm", jobs=3)
    with pytest.raises(ConfigError, match="command line: sbatch: 'time' is set by the study; use time_min:"):
        launchers.settings_with(study.launcher, sbatch=["time=10"])


def test_the_command_line_refuses_a_bad_option_with_exit_two(tmp_path):
    from tools.study import __main__ as cli

    study = _study(tmp_path, _method("a"))
    assert cli.main([str(study.source), "--launcher", "slurm", "--jobs", "2", "--no-wandb"]) == 2
    assert cli.main([str(study.source), "--time-min", "0", "--no-wandb"]) == 2


def test_slurm_options_become_sbatch_lines(tmp_path):
    settings = plan.SlurmSettings(partition="gpu", time_min=90, gpus_per_job=2, cpus_per_job=8, mem_gb=16,
                                  signal_delay_s=100, sbatch={"account": "lab", "exclusive": True},
                                  setup=("module load cuda",))
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -m x", folder=tmp_path / "%j",
                                 **slurm.sbatch_parameters(settings, cwd=tmp_path))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16384M", "#SBATCH --signal=USR2@100",
                 "#SBATCH --account=lab", "#SBATCH --exclusive", f"#SBATCH --chdir={tmp_path}", "module load cuda",
                 slurm.pythonpath_line()):
        assert line in script.splitlines(), line
    assert "--gpus-per-node" not in "\n".join(_make_sbatch_string(
        command="x", folder=tmp_path, **slurm.sbatch_parameters(plan.SlurmSettings(), cwd=tmp_path)).splitlines())


# ------------------------------------------------------------------------------------------------ pinning
def test_each_parallel_job_gets_its_own_gpu_and_a_share_of_the_threads():
    assert launchers.slot_envs(1, gpus=["0", "1"], cpus=8) == [{}]  # one job: the environment as it is
    assert launchers.slot_envs(2, gpus=["3", "5"], cpus=8) == [
        {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"},
        {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}]
    assert launchers.slot_envs(4, gpus=[], cpus=2) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 4
    with pytest.raises(ConfigError, match="--jobs 3: only 2 GPU"):
        launchers.slot_envs(3, gpus=["0", "1"], cpus=8)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert launchers.visible_gpus() == ["2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launchers.visible_gpus() == []


# ------------------------------------------------------------------------------------------------ the schedule
def test_parallel_local_jobs_start_after_their_sources_on_their_own_gpus(tmp_path, caplog):
    study = _study(tmp_path, _method("a", "fake.seconds=0.4") + _method("b", after="a") +
                   _method("c", "fake.seconds=0.4"), "seeds: [1, 2]\n")
    backend = launchers.LocalBackend(study, jobs=2, launch=_fake_launch, gpus=["0", "1"], cpus=2)
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="tools.study.launchers"):
        tracked = launchers.run_schedule(study, study.jobs(), state, backend)
    assert [t.state for t in tracked] == ["finished"] * 6 and launchers.failed_keys(tracked) == []
    calls = {m: _calls(study, m) for m in "abc"}
    for seed in ("1", "2"):  # b evaluates a's weights of the same seed, and starts only after that run ended
        a = next(c for c in calls["a"] if _set(c, "experiment.seed") == seed)
        b = next(c for c in calls["b"] if _set(c, "experiment.seed") == seed)
        assert b["start"] >= a["end"] and _set(b, "experiment.task") == "evaluate"
        assert _set(b, "experiment.weights") == str(Path(a["run"]) / "checkpoints" / "best.pt")
    every = sorted((c for rows in calls.values() for c in rows), key=lambda c: c["start"])
    overlaps = [(x, y) for i, x in enumerate(every) for y in every[i + 1:] if y["start"] < x["end"]]
    assert overlaps, "two independent jobs should have run side by side"
    assert all(x["cuda"] != y["cuda"] for x, y in overlaps)  # never two at once on one GPU
    assert {c["cuda"] for c in every} == {"0", "1"} and {c["env_threads"] for c in every} == {"1"}
    assert max(sum(1 for c in every if c["start"] <= x["start"] < c["end"]) for x in every) <= 2
    saved = json.loads((study.folder / "runs.json").read_text())
    assert set(saved) == {t.key for t in tracked} and saved == state
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("b/seed1: running (here, CUDA_VISIBLE_DEVICES=") for line in lines) == 1
    assert sum(line.startswith("b/seed1: finished in") for line in lines) == 1


def test_a_failed_job_blocks_its_dependents_and_the_others_go_on(tmp_path, caplog):
    study = _study(tmp_path, _method("a", "fake.fail=1") + _method("b", after="a") + _method("c"))
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="tools.study.launchers"):
        tracked = launchers.run_schedule(study, study.jobs(), state,
                                         launchers.LocalBackend(study, jobs=1, launch=_fake_launch))
    assert {t.key: t.state for t in tracked} == {"a": "failed", "b": "blocked", "c": "finished"}
    assert launchers.failed_keys(tracked) == ["a", "b"] and set(state) == {"c"}
    assert not study.runs_of(study.method("b"))  # never started
    lines = [r.getMessage() for r in caplog.records]
    log = runner.log_path(study, study.jobs()[0])
    assert f"a: failed (here): the run did not finish; log: {log}" in lines
    assert "b: blocked: needs a, which did not finish" in lines
    table = launchers.summary(study, tracked).splitlines()
    assert table[0] == "| job | launcher | state | wall s | run or log |"
    assert table[2] == f"| a | here | failed | – | {log} |" and table[3].startswith("| b | – | blocked | – |")
    assert table[4].startswith("| c | here | finished |") and str(study.runs_of(study.method("c"))[0]) in table[4]
    # run again: c is skipped (its run is reused), a fails again, b stays blocked
    again = launchers.run_schedule(study, study.jobs(), state, launchers.LocalBackend(study, launch=_fake_launch))
    assert [t.state for t in again] == ["failed", "blocked", "skipped"] and len(_calls(study, "c")) == 1


# ------------------------------------------------------------------------------------------------ submitit
def _local_executor(tmp_path: Path, **parameters) -> submitit.LocalExecutor:
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit" / "%j")
    executor.update_parameters(timeout_min=parameters.pop("timeout_min", 5), setup=[slurm.pythonpath_line()],
                               **parameters)
    return executor


def test_submitit_jobs_resolve_their_dependencies_where_they_run(tmp_path, caplog):
    """Two submitit jobs in their own processes (each imports the study package: about 2 s apiece on 2 cores)."""
    study = _study(tmp_path, _method("a") + _method("b", after="a"))
    backend = slurm.SubmititBackend(study, _local_executor(tmp_path), poll_s=0.2,
                                    program=[sys.executable, str(FAKE_MAIN)])
    state: dict = {}
    with caplog.at_level(logging.INFO, logger="tools.study.launchers"):
        tracked = launchers.run_schedule(study, study.jobs(), state, backend)
    assert [t.state for t in tracked] == ["finished", "finished"], [t.detail for t in tracked]
    (a,), (b,) = _calls(study, "a"), _calls(study, "b")
    a_run = study.runs_of(study.method("a"))[0]
    assert b["start"] >= a["end"] and _set(b, "experiment.weights") == str(a_run / "checkpoints" / "best.pt")
    for t in tracked:  # the entry comes back from the job's process: its run, wall time and where it ran
        assert state[t.key]["run"] == t.detail == str(study.runs_of(t.job.method)[0])
        assert state[t.key]["where"].startswith("local job ") and state[t.key]["wall_s"] > 0
    lines = [r.getMessage() for r in caplog.records]
    assert f"b: queued (submitit local job {tracked[1].launcher_id})" in lines
    assert (runner.log_path(study, study.jobs()[1])).is_file()


def test_a_submitit_job_that_cannot_start_says_why_and_where(tmp_path):
    """Only the dependent job is scheduled (as with --only) and its source never ran: the job fails on its node."""
    study = _study(tmp_path, _method("a") + _method("b", after="a"))
    backend = slurm.SubmititBackend(study, _local_executor(tmp_path), poll_s=0.2,
                                    program=[sys.executable, str(FAKE_MAIN)])
    (t,) = launchers.run_schedule(study, study.jobs()[1:], {}, backend)
    assert t.state == "failed" and "not started (a run it needs has not finished" in t.detail
    output = Path(t.detail.rsplit("see ", 1)[1])
    assert output == t.handle.paths.stdout and "b: needs the weights of a, which has no finished run" in \
        output.read_text()
    assert not study.runs_of(study.method("b"))


def test_a_job_signalled_before_its_time_limit_is_requeued_and_resumes_its_run(tmp_path):
    """submitit's local executor sends the checkpoint signal (USR2) 6 s into a 12-s limit; the run trains for 30 s,
    so the job must end it as interrupted, be requeued and resume it (about 10 s in all)."""
    study = _study(tmp_path, _method("a", "fake.seconds=30", "fake.resume_seconds=0.5"))
    executor = _local_executor(tmp_path, timeout_min=0.2, signal_delay_s=6)
    backend = slurm.SubmititBackend(study, executor, poll_s=0.2, program=[sys.executable, str(FAKE_MAIN)],
                                    grace_s=3)
    state: dict = {}
    (t,) = launchers.run_schedule(study, study.jobs(), state, backend)
    assert t.state == "finished", t.detail
    (run,) = study.runs_of(study.method("a"))
    assert json.loads((run / "manifest.json").read_text())["events"] == ["running", "interrupted", "resumed",
                                                                         "finished"]
    first, second = _calls(study, "a")
    assert first["outcome"] == "interrupted" and second["outcome"] == "finished"
    assert first["usr2_ignored"]  # SLURM signals every process of the job; the run must not die of it
    assert _set(second, "experiment.resume") == str(run) and state["a"]["resumed"] is True


def test_a_second_study_process_attaches_to_the_jobs_of_the_first(tmp_path, monkeypatch):
    """jobs.json names the SLURM jobs an earlier study process submitted: one still queued is attached to (not
    submitted again), one that finished gives its entry, one whose id now names another job is submitted anew."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    study = _study(tmp_path, _method("a") + _method("b") + _method("c"))
    executor = submitit.SlurmExecutor(folder=study.folder / "slurm" / "%j")
    backend = slurm.SubmititBackend(study, executor, poll_s=0.01)
    backend.record.parent.mkdir(parents=True)
    backend.record.write_text(json.dumps({"a": "11", "b": "12", "c": "13"}))
    b_run = study.output_dir / "exp" / "b" / "20260101-000000"
    (b_run / "checkpoints").mkdir(parents=True)
    (b_run / "config.yaml").write_text(json.dumps({"overrides": []}))
    (b_run / "manifest.json").write_text(json.dumps({"status": "finished"}))
    entry = {"run": str(b_run), "wall_s": 5.0, "where": "SLURM job 12 on node1"}
    result = backend._job("12").paths.result_pickle
    result.parent.mkdir(parents=True)
    cloudpickle_dump(("success", entry), result)
    rows = {"11": slurm.QueueRow("PENDING", "", "s:a"), "13": slurm.QueueRow("RUNNING", "node2", "other:job")}
    monkeypatch.setattr(slurm, "squeue_states", lambda ids: {i: rows[i] for i in ids if i in rows})
    submitted = []
    monkeypatch.setattr(backend, "start", lambda t, after: submitted.append(t.key) or launchers.Update("failed"))
    tracked = launchers.Tracked(job=study.jobs()[0], needs=())
    updates = backend.adopt([tracked, *(launchers.Tracked(job=j, needs=()) for j in study.jobs()[1:])])
    assert updates["a"].state == "queued" and tracked.launcher_id == "11"
    assert updates["b"] == launchers.Update("finished", detail=str(b_run), entry=entry, where="SLURM job 12 on node1")
    assert "c" not in updates
    # the schedule: a is watched (squeue says it went on to run), b's entry lands in runs.json, c is submitted
    rows["11"] = slurm.QueueRow("RUNNING", "node1", "s:a")
    state: dict = {}
    monkeypatch.setattr(backend, "poll", lambda active: {t.key: launchers.Update("failed") for t in active})
    out = launchers.run_schedule(study, study.jobs(), state, backend)
    assert submitted == ["c"] and [t.state for t in out] == ["failed", "finished", "failed"]
    assert state == {"b": entry}
    monkeypatch.setattr(slurm, "squeue_states", lambda ids: None)
    with pytest.raises(ConfigError, match="squeue cannot tell"):
        backend.adopt([launchers.Tracked(job=study.jobs()[0], needs=())])


def test_squeue_lines_are_read_and_a_failing_squeue_is_not_taken_for_finished_jobs(monkeypatch):
    import subprocess

    def fake(stdout, stderr="", code=0):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(slurm.subprocess, "run", fake("12|PENDING|(null)|s:a\n13|RUNNING|vm|s:b/seed1\n"))
    assert slurm.squeue_states(["12", "13"]) == {"12": slurm.QueueRow("PENDING", "(null)", "s:a"),
                                                  "13": slurm.QueueRow("RUNNING", "vm", "s:b/seed1")}
    monkeypatch.setattr(slurm.subprocess, "run", fake("", "slurm_load_jobs error: Invalid job id specified", 1))
    assert slurm.squeue_states(["99"]) == {}  # none of them known any more
    monkeypatch.setattr(slurm.subprocess, "run", fake("", "Unable to contact slurm controller", 1))
    assert slurm.squeue_states(["12"]) is None


def test_the_study_command_runs_jobs_in_parallel_and_prints_the_summary(tmp_path, monkeypatch, capsys):
    from tools.study import __main__ as cli

    study = _study(tmp_path, _method("a", "fake.seconds=0.3") + _method("b", "fake.seconds=0.3"))
    monkeypatch.setattr(runner, "launch_local", _fake_launch)
    monkeypatch.setattr(launchers, "visible_gpus", lambda: [])
    assert cli.main([str(study.source), "--jobs", "2", "--no-wandb"]) == 0
    out = capsys.readouterr().out
    assert "jobs (local):\n| job | launcher | state | wall s | run or log |" in out
    assert out.count("| here, OMP_NUM_THREADS=") == 2 and out.count("| finished |") == 2
    (a,), (b,) = _calls(study, "a"), _calls(study, "b")
    assert a["start"] < b["end"] and b["start"] < a["end"]  # side by side
