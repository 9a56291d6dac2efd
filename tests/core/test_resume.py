"""Resume: a run SIGKILLed mid-epoch and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.Trainer import Trainer
from dl_utils import checkpoint as ckpt
from tests.core._trainer_fixtures import FakeData, TinyAE, make_run

ROOT = Path(__file__).resolve().parents[2]


def _launch(run_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.core._trainer_fixtures", "--run-dir", str(run_dir), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # 24 images / batch 4 = 6 steps per epoch, 3 epochs; latest.pt every 4 steps. The killed run dies inside
    # step 10 (epoch 2, batch 4), after the mid-epoch checkpoint of step 8 (epoch 2, batch 2). Random input
    # noise, random augmentation, EMA, a per-step LR scheduler and clipping all have to be restored exactly.
    reference = _launch(tmp_path / "ref", tmp_path / "ref.pt")
    killed = _launch(tmp_path / "run", tmp_path / "killed.pt", "--kill-at-step", "10")
    rc_ref, out_ref = _finish(reference)
    rc_killed, out_killed = _finish(killed)
    assert rc_ref == 0, out_ref
    assert rc_killed == -signal.SIGKILL, out_killed
    assert not (tmp_path / "killed.pt").exists()
    latest = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["epoch"], latest["step"], latest["trainer"]["batch_in_epoch"]) == (1, 8, 2)

    rc, out = _finish(_launch(tmp_path / "run", tmp_path / "resumed.pt", "--resume"))
    assert rc == 0, out
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert ref["step"] == resumed["step"] == 18
    # Exact equality: same seeds, same single-threaded CPU kernels, same data order and RNG streams.
    for part in ("model", "ema"):
        for key, value in ref[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key} differs after resume"
    ref_best = torch.load(tmp_path / "ref" / "checkpoints" / "best.pt", weights_only=True)
    run_best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert ref_best["step"] == run_best["step"] and ref_best["best_metric"] == run_best["best_metric"]


def _trainer(tmp_path: Path, resume_from: Path | None, **params: object) -> Trainer:
    torch.manual_seed(0)
    return Trainer(model=TinyAE(), data=FakeData(), run=make_run(tmp_path, resume_from=resume_from), progress=False,
                   **params)


def test_resume_at_an_epoch_end_continues_to_the_same_weights(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full", None, max_epochs=2)
    full.fit()
    first = _trainer(tmp_path / "part", None, max_epochs=1)
    first.fit()
    resumed = _trainer(tmp_path / "part", tmp_path / "part" / "checkpoints" / "latest.pt", max_epochs=2)
    resumed.fit()
    assert resumed.step == full.step == 12
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


def test_resume_refuses_missing_and_weights_only_files(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found: .*nowhere.pt"):
        _trainer(tmp_path, tmp_path / "nowhere.pt").fit()
    weights_only = tmp_path / "imported.pt"
    ckpt.save_checkpoint(weights_only, {"model": TinyAE().state_dict(), "config": {}})
    with pytest.raises(ckpt.CheckpointError, match=r"imported.pt is not a training checkpoint \(no optimizer"):
        _trainer(tmp_path, weights_only).fit()
