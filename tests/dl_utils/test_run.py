"""Run-folder lifecycle: status transitions, resume events, config differences and history rewinding."""

import json

import pytest

from dl_utils.run import add_event, config_differences, read_manifest, rewind_history, set_status, update_manifest


def test_status_transitions_are_recorded_as_events(tmp_path):
    update_manifest(tmp_path, started="t0", seed=1)
    set_status(tmp_path, "running")
    set_status(tmp_path, "failed", error="DataError: x.png")
    add_event(tmp_path, "resumed", from_step=4)
    set_status(tmp_path, "finished")
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "finished" and "error" not in manifest
    assert (manifest["started"], manifest["seed"]) == ("t0", 1)
    assert [e["event"] for e in manifest["events"]] == ["running", "failed", "resumed", "finished"]
    assert manifest["events"][1]["error"] == "DataError: x.png" and manifest["events"][2]["from_step"] == 4
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        set_status(tmp_path, "done")


def test_status_write_failure_is_logged_not_raised(tmp_path, caplog):
    set_status(tmp_path / "missing" / "folder", "failed", error="x")
    assert "could not record run status 'failed'" in caplog.text


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
