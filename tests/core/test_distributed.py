"""Distributed setup and a 2-process torchrun (gloo, CPU) run of the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.Configurator import ConfigError
from core.Trainer import Trainer
from dl_utils.distributed import barrier, cleanup, init_distributed, is_distributed
from tests.core._trainer_fixtures import FakeData, RecordingLogger, TinyAE, make_run

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_without_torchrun_env(no_torchrun_env: None) -> None:
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not is_distributed()
    barrier()  # no-op
    cleanup()  # no-op


def test_bad_requests_are_clear_errors(no_torchrun_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="device 'tpu' is not one of 'auto', 'gpu', 'cpu'"):
        init_distributed("tpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'gpu' was asked for but CUDA is not available"):
            init_distributed("gpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK is not set"):
        init_distributed("cpu")


def test_trainer_refuses_world_size_without_process_group(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="world_size=2 but no process group"):
        Trainer.from_options(model=TinyAE(), data=FakeData(), run=make_run(tmp_path, world_size=2))


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in TORCHRUN_VARS:
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.core._trainer_fixtures", "--mode", "ddp", "--run-dir", str(tmp_path / "ddp"),
           "--out", str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The same global batch (8) in one process: 16 images, no shuffling, no randomness.
    torch.manual_seed(0)
    model, log = TinyAE(), RecordingLogger()
    Trainer.from_options(model=model, data=FakeData(n_train=16, batch_size=8, shuffle=False),
                         run=make_run(tmp_path / "single", logger=log), max_epochs=2, log_interval=1, progress=False,
                         optimizer={"module_name": "torch.optim", "class_name": "SGD", "params": {"lr": 0.5}}).fit()

    rank0 = json.loads((tmp_path / "ddp_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "ddp_rank1.json").read_text())
    assert rank1["saves"] == [] and rank1["train_logs"] == [] and rank1["val_logs"] == []  # rank 0 writes
    assert sorted(Path(p).name for p in rank0["saves"]) == ["best.pt", "best.pt", "latest.pt", "latest.pt"]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]
    # Gradients are averaged over the ranks, so losses and weights equal the single-process run up to float
    # summation order (tolerance 1e-5).
    ddp_losses = [values["loss"] for _, values in rank0["train_logs"]]
    single_losses = [values["loss"] for _, values in log.train]
    assert len(ddp_losses) == len(single_losses) == 4
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    ddp_weights = torch.load(tmp_path / "ddp.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-5, atol=1e-6)
