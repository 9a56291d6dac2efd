"""The run: folder files, status transitions, resume events, config differences, history rewinding, liveness."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dl_utils.errors import RunFolderError, RunInterrupted
from dl_utils.run import (
    Run,
    config_differences,
    owner_record,
    owner_state,
    read_manifest,
    read_status,
    rewind_history,
    run_state,
)

CPU = torch.device("cpu")


class ClosingLogger:
    """Records the exit codes it was closed with."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def close(self, exit_code: int = 0) -> None:
        self.closed.append(exit_code)


def test_start_writes_the_resolved_config_and_the_provenance(tmp_path):
    run = Run(run_dir=tmp_path / "r", device=CPU, seed=3, config={"name": "x", "data": {"size": (8, 8)}})
    run.start(config_path="x.yaml", task="train", weights=None, split_files={"a.csv": "0" * 64})
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text()) == {"name": "x", "data": {"size": [8, 8]}}
    manifest = read_manifest(tmp_path / "r")
    assert (manifest["config_path"], manifest["task"], manifest["seed"]) == ("x.yaml", "train", 3)
    assert manifest["split_files"] == {"a.csv": "0" * 64} and manifest["owner"]["pid"] == os.getpid()
    assert set(manifest["git"]) == {"commit", "dirty"} and manifest["device"]["device"] == "cpu"
    assert read_status(tmp_path / "r") == "running" and [e["event"] for e in manifest["events"]] == ["running"]


def test_status_transitions_are_recorded_as_events(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)
    run.update_manifest(started="t0", seed=1)
    run.set_status("running")
    run.set_status("failed", error="DataError: x.png")
    run.add_event("resumed", from_step=4)
    run.set_status("finished")
    manifest = run.manifest()
    assert manifest["status"] == "finished" and "error" not in manifest
    assert (manifest["started"], manifest["seed"]) == ("t0", 1)
    assert [e["event"] for e in manifest["events"]] == ["running", "failed", "resumed", "finished"]
    assert manifest["events"][1]["error"] == "DataError: x.png" and manifest["events"][2]["from_step"] == 4
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        run.set_status("done")


def test_status_write_failure_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "file").write_text("")  # a run folder that cannot exist
    Run(run_dir=tmp_path / "file" / "folder", device=CPU).set_status("failed", error="x")
    assert "could not record run status 'failed'" in caplog.text


def test_only_rank_zero_writes(tmp_path):
    other = Run(run_dir=tmp_path, device=CPU, rank=1, world_size=2)
    other.start(config_path="x.yaml", task="train")
    other.update_manifest(a=1)
    other.set_status("finished")
    other.heartbeat()
    assert list(tmp_path.iterdir()) == []


def test_recording_finishes_and_closes_the_logger(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU, logger=ClosingLogger())
    with run.recording(task="train"):
        run.start(config_path="x.yaml", task="train")
        run.heartbeat()
    assert run.logger.closed == [0] and read_status(tmp_path) == "finished"
    assert run.manifest()["heartbeat"] and [e["event"] for e in run.manifest()["events"]] == ["running", "finished"]


def test_recording_records_a_failure_in_one_line_and_re_raises(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU, logger=ClosingLogger())
    with pytest.raises(ValueError), run.recording(task="train"):
        run.start(config_path="x.yaml", task="train")
        raise ValueError("first line\nsecond line")
    assert run.logger.closed == [1]
    assert (read_status(tmp_path), run.manifest()["error"]) == ("failed", "ValueError: first line second line")


def test_recording_an_interruption_says_how_to_resume(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)  # interrupted before the logger was opened
    with pytest.raises(RunInterrupted) as caught, run.recording(task="train"):
        run.start(config_path="x.yaml", task="train")
        raise RunInterrupted("SIGTERM")
    assert read_status(tmp_path) == "interrupted" and run.manifest()["error"] == "interrupted by SIGTERM"
    assert caught.value.outcome == (f"{tmp_path / 'manifest.json'} says 'interrupted' (resume with "
                                    f"--set experiment.resume={tmp_path})")


def test_fail_ends_the_block_as_failed_without_raising(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU, logger=ClosingLogger())
    with run.recording(task="predict"):
        run.start(config_path="x.yaml", task="predict")
        run.fail("predict: stopped at a bad input")
    assert run.logger.closed == [1] and run.manifest()["error"] == "predict: stopped at a bad input"
    assert read_status(tmp_path) == "failed"


def test_create_makes_a_new_folder_or_continues_the_resumed_one(tmp_path):
    first = Run.create(output_dir=tmp_path, experiment="e", name="n", device=CPU)
    second = Run.create(output_dir=tmp_path, experiment="e", name="n", device=CPU)
    assert first.run_dir.parent == tmp_path / "e" / "n" and first.run_dir != second.run_dir
    assert first.resume_from is None
    resumed = Run.create(output_dir=tmp_path, experiment="e", name="n", resume=first.run_dir, device=CPU, seed=4)
    assert resumed.run_dir == first.run_dir and resumed.resume_from == first.run_dir / "checkpoints" / "latest.pt"
    assert resumed.seed == 4


def test_resume_moves_history_records_the_event_and_runs_again(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)
    run.start(config_path="x.yaml", task="train")
    run.set_status("interrupted", error="interrupted by SIGINT")
    (tmp_path / "history.jsonl").write_text(json.dumps({"step": 2}) + "\n" + json.dumps({"step": 5}) + "\n")
    run.resume(config_path="y.yaml", from_epoch=1, from_step=2, changed={"trainer.params.max_steps": {"old": 5,
                                                                                                      "new": 9}})
    manifest = run.manifest()
    event = manifest["events"][-2]
    assert (event["event"], event["from_step"], event["superseded_history_rows"]) == ("resumed", 2, 1)
    assert event["changed"] == {"trainer.params.max_steps": {"old": 5, "new": 9}}
    assert manifest["status"] == "running" and manifest["config_path"] == "x.yaml"  # provenance kept
    assert (tmp_path / "history.jsonl").read_text() == json.dumps({"step": 2}) + "\n"


def test_config_differences_lists_every_changed_leaf():
    old = {"a": {"lr": 0.001, "b": [1, 2]}, "c": 1}
    new = {"a": {"lr": 0.002, "b": [1, 2]}, "d": 2}
    assert config_differences(old, new) == [("a.lr", 0.001, 0.002), ("c", 1, "<absent>"), ("d", "<absent>", 2)]


def test_rewind_history_moves_rows_after_the_checkpoint(tmp_path):
    rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.9}, {"step": 2, "val/recon_mae": 0.5},
            {"step": 3, "train/loss": 0.8}, {"step": None, "eval/x": 1.0}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rewind_history(tmp_path, 2) == 2
    kept = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    moved = [json.loads(line) for line in (tmp_path / "history.superseded.jsonl").read_text().splitlines()]
    assert kept == rows[:3]
    assert moved == [{"superseded_by_resume_from_step": 2, **r} for r in rows[3:]]
    assert rewind_history(tmp_path, 2) == 0  # nothing after the checkpoint any more


def test_a_block_absent_from_the_stored_config_compares_leaf_by_leaf():
    stored = {"model": {"lr": 1}}  # a method file: no experiment block of its own
    assert config_differences(stored, {"model": {"lr": 1}, "experiment": {"resume": "r"}}) == [
        ("experiment.resume", "<absent>", "r")]
    assert config_differences({**stored, "experiment": None}, {**stored, "experiment": {"seed": 3}}) == [
        ("experiment.seed", "<absent>", 3)]
    assert config_differences(stored, {"model": None}) == [("model.lr", 1, "<absent>")]
    assert config_differences({"a": {"b": 1}}, {"a": 2}) == [("a", {"b": 1}, 2)]  # a block against a value


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_owner_state_sees_a_live_process_a_dead_one_and_a_reused_process_id(tmp_path):
    me = owner_record()
    assert (me["host"], me["pid"]) == (socket.gethostname(), os.getpid()) and me["start_ticks"] is not None
    assert owner_state(me) == ("alive", f"process {os.getpid()} on host {me['host']} is running")
    child = _sleeper()
    record = owner_record(child.pid)
    assert owner_state(record)[0] == "alive"
    child.kill()
    time.sleep(0.2)  # killed, not yet reaped: a zombie
    assert owner_state(record) == ("gone", f"process {child.pid} on host {me['host']} is gone (it ended; a zombie "
                                           "awaits its parent)")
    child.wait()
    assert owner_state(record) == ("gone", f"process {child.pid} on host {me['host']} is gone")
    reused = {**me, "start_ticks": me["start_ticks"] - 1}  # our process id, recorded for a process started earlier
    assert owner_state(reused) == ("gone", f"process {os.getpid()} on host {me['host']} is gone (that process id "
                                           "now belongs to another process)")
    assert owner_state({**me, "boot_id": "another-boot"})[0] == "gone"


def test_owner_state_cannot_tell_for_another_host_or_no_owner():
    state, why = owner_state({**owner_record(), "host": "elsewhere"})
    assert state == "unknown" and "on host elsewhere, not this host" in why and "cannot be seen from here" in why
    assert owner_state({}) == ("unknown", "no owner process recorded (a run from before owners were recorded)")


def test_run_state_reports_a_running_run_whose_process_is_gone_as_died(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)
    run.start(config_path="x.yaml", task="train")
    run.heartbeat(step=7)
    state = run_state(tmp_path)
    assert (state.status, state.state, state.owner_state) == ("running", "running", "alive")
    child = _sleeper()
    child.kill()
    child.wait()
    run.update_manifest(owner=owner_record(os.getpid()) | {"pid": child.pid})
    state = run_state(tmp_path)
    assert (state.status, state.state, state.owner_state) == ("running", "died", "gone")
    assert state.heartbeat["step"] == 7
    assert state.describe().startswith(f"died (process {child.pid} on host ")
    assert " at step 7, " in state.describe() and state.describe().endswith(" ago)")
    run.set_status("interrupted", error="interrupted by SIGINT")
    assert run_state(tmp_path).state == "interrupted" and run_state(tmp_path).owner_state is None


def test_heartbeat_is_written_at_most_every_interval_unless_forced(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)
    run.start(config_path="x.yaml", task="train")
    run.heartbeat(step=1)
    assert run.manifest()["heartbeat"]["step"] == 1
    run.heartbeat(step=2)  # within HEARTBEAT_INTERVAL_S of the last one: not written
    assert run.manifest()["heartbeat"]["step"] == 1
    run.heartbeat(step=3, force=True)  # a checkpoint
    assert run.manifest()["heartbeat"]["step"] == 3


def test_resume_of_a_died_run_records_the_death_and_takes_ownership(tmp_path):
    run = Run(run_dir=tmp_path, device=CPU)
    run.start(config_path="x.yaml", task="train")
    run.update_manifest(owner={"host": socket.gethostname(), "pid": 2 ** 22 + 1}, heartbeat={"time": "t", "step": 4})
    previous = run_state(tmp_path)
    assert previous.state == "died"
    run.resume(config_path="x.yaml", from_epoch=0, from_step=4, changed={}, previous=previous)
    manifest = run.manifest()
    assert [e["event"] for e in manifest["events"]] == ["running", "died", "resumed", "running"]
    assert manifest["events"][1]["last_heartbeat"] == {"time": "t", "step": 4}
    assert manifest["owner"]["pid"] == os.getpid() and run_state(tmp_path).state == "running"


def test_rewind_history_moves_a_line_cut_by_a_kill_and_refuses_a_damaged_file(tmp_path):
    rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.9}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "tra')
    assert rewind_history(tmp_path, 2) == 1
    assert [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()] == rows
    moved = json.loads((tmp_path / "history.superseded.jsonl").read_text())
    assert moved == {"superseded_by_resume_from_step": 2, "unparsed": '{"step": 3, "tra'}
    (tmp_path / "history.jsonl").write_text('{"step": 1\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(RunFolderError, match=r"history.jsonl line 1 is not JSON"):
        rewind_history(tmp_path, 2)
