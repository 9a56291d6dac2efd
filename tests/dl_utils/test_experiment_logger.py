import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dl_utils.experiment_logger import ExperimentLogger, resolve_wandb_mode  # noqa: E402
from tests.wandb_reader import find_run_file, read_run  # noqa: E402


def test_disabled_mode_writes_run_folder_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = ExperimentLogger(run_dir=tmp_path, mode="disabled")
    log.log_train({"loss": torch.tensor(0.5), "kl": 2.0}, step=3)
    log.log_val({"recon_mae": 0.25}, step=3)
    log.log_eval("detection", "lesions", {"auroc": 0.75, "n": 10})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig_path = log.log_figure("eval/detection/roc", fig)
    img_path = log.log_image("example", torch.rand(1, 8, 8))
    table_path = log.log_table("eval/table", [{"a": 1, "b": 2}, {"a": 3, "b": 4}])
    log.close()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"eval/detection/lesions/auroc": 0.75, "eval/detection/lesions/n": 10.0,
                       "train/kl": 2.0, "train/loss": 0.5, "val/recon_mae": 0.25}
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 3, "train/loss": 0.5, "train/kl": 2.0}
    assert fig_path.is_file() and img_path.is_file() and table_path.read_text().startswith("a,b")
    assert not (tmp_path / "manifest.json").exists() and log.wandb_entry is None  # the run writes the manifest
    assert not (tmp_path / "wandb").exists()


def test_offline_run_holds_logged_scalars(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = ExperimentLogger(run_dir=tmp_path, mode="offline", project="test", config={"lr": 0.001})
    for step in range(3):
        log.log_train({"loss": 1.0 / (step + 1)}, step=step)
    log.log_eval("rqi", "healthy_test", {"rqi": 0.5})
    log.update_config(backends={"fid_network": "fid_helper (/x/default_1.pt)"})
    log.close()
    run = read_run(find_run_file(tmp_path))
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert losses == pytest.approx([1.0, 0.5, 1 / 3])
    assert [row["trainer/step"] for row in run["history"] if "train/loss" in row] == [0, 1, 2]
    assert run["summary"]["eval/rqi/healthy_test/rqi"] == 0.5
    assert run["config"]["lr"] == 0.001
    assert run["config"]["backends"] == {"fid_network": "fid_helper (/x/default_1.pt)"}


def test_offline_run_holds_everything_logged_while_the_cores_are_busy(tmp_path, monkeypatch):
    # A loaded machine once left the offline run without history rows after close(): close() must wait for
    # wandb's service to write everything. Busy-loop processes keep every core busy for the whole test.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(os.cpu_count() or 1, 4))]
    try:
        log = ExperimentLogger(run_dir=tmp_path, mode="offline", project="test")
        for step in range(1, 201):
            log.log_train({"loss": 1.0 / step}, step=step)
        log.log_eval("rqi", "healthy_test", {"rqi": 0.25})
        log.close()
        run = read_run(find_run_file(tmp_path))  # read at once: no waiting after close()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert [row["trainer/step"] for row in run["history"] if "train/loss" in row] == list(range(1, 201))
    assert run["summary"]["eval/rqi/healthy_test/rqi"] == 0.25
    assert json.loads((tmp_path / "metrics.json").read_text())["train/loss"] == 1 / 200


def test_metrics_json_only_for_a_finished_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = ExperimentLogger(run_dir=tmp_path, mode="disabled")
    log.log_eval("rqi", "healthy_test", {"rqi": 0.5})
    assert not (tmp_path / "metrics.json").exists()
    assert json.loads((tmp_path / "metrics.partial.json").read_text()) == {"eval/rqi/healthy_test/rqi": 0.5}
    log.close(exit_code=1)
    assert not (tmp_path / "metrics.json").exists()
    resumed = ExperimentLogger(run_dir=tmp_path, mode="disabled")  # a resume keeps what was logged
    resumed.log_train({"loss": 2.0}, step=1)
    resumed.close()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"eval/rqi/healthy_test/rqi": 0.5,
                                                                   "train/loss": 2.0}
    assert not (tmp_path / "metrics.partial.json").exists()


def test_disabled_rank_is_a_no_op(tmp_path):
    log = ExperimentLogger(run_dir=tmp_path / "rank1", mode="disabled", enabled=False)
    log.log_train({"loss": 1.0}, step=0)
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_wandb_mode_validation(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE"):
        resolve_wandb_mode("offline")
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(None) == "offline"
