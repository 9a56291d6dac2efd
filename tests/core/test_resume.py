"""Resume: a run SIGKILLed mid-epoch and resumed ends with exactly the weights of an uninterrupted run; an
interrupted run of every shipped ``_cpu`` config resumes by the command its interruption names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core.Main import main
from core.Trainer import Trainer
from dl_utils import checkpoint as ckpt
from dl_utils.errors import RunInterrupted
from tests.core._trainer_fixtures import FakeData, TinyAE, make_run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "projects" / "normative_eval" / "configs"
# Every shipped _cpu config (one per method family; a second stage names the stage-1 config and its key).
CPU_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*_cpu.yaml"))
SECOND_STAGE = {"fanogan_cpu": ("fanogan_wgan_cpu", "wgan_checkpoint"), "ltm_cpu": ("vqvae_cpu", "vqvae_checkpoint")}
# Tiny runs: two logged steps of batch 2 with a checkpoint after each, one validation batch, no evaluation.
TINY = ("data.params.batch_size=2", "data.params.eval_batch_size=2", "trainer.params.max_steps=2",
        "trainer.params.max_epochs=1", "trainer.params.checkpoint_every_steps=1", "trainer.params.log_interval=1",
        "trainer.params.val_max_batches=1",
        "downstream_tasks=null", "wandb.mode=disabled")


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
    return Trainer.from_options(model=TinyAE(), data=FakeData(), run=make_run(tmp_path, resume_from=resume_from),
                                progress=False, **params)


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


def _main(config: str, *sets: str) -> int:
    """``core/Main.py`` on a shipped config, tiny; runs go to ``./runs`` (no ``experiment.*`` override, so the
    stored config has no ``experiment:`` block, as a user's first run of a method file has none)."""
    args = ["--config_path", str(CONFIGS / f"{config}.yaml"), "--log_level", "WARNING"]
    for value in (*TINY, *sets):
        args += ["--set", value]
    return main(args)


def _interrupt_after_first_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first write of ``latest.pt`` completes, then the run is interrupted as SIGINT interrupts it."""
    real = ckpt.save_checkpoint

    def save(path, state):
        written = real(path, state)
        if Path(path).name == "latest.pt":
            monkeypatch.setattr(ckpt, "save_checkpoint", real)
            raise RunInterrupted("SIGINT")
        return written

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_every_cpu_config_resumes_an_interrupted_run_by_the_documented_command(
        config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    assert len(CPU_CONFIGS) >= 17  # the shipped families: the glob found them
    sets: tuple[str, ...] = ()
    if config in SECOND_STAGE:  # a stage-1 checkpoint first (one step of its own config)
        stage1, key = SECOND_STAGE[config]
        (tmp_path / "stage1").mkdir()
        monkeypatch.chdir(tmp_path / "stage1")
        assert _main(stage1, "trainer.params.max_steps=1") == 0
        (first,) = (tmp_path / "stage1").glob("runs/*/*/*/checkpoints/latest.pt")
        sets = (f"model.params.{key}={first}",)
    monkeypatch.chdir(tmp_path)
    _interrupt_after_first_checkpoint(monkeypatch)
    assert _main(config, *sets) == 130
    (run_dir,) = (tmp_path / "runs").glob("*/*/*")
    assert "experiment" not in yaml.safe_load((run_dir / "config.yaml").read_text())
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    config_before = (run_dir / "config.yaml").read_bytes()
    # the line the interruption logs: "resume with --set experiment.resume=<run folder>"; the stored config has no
    # experiment: block (this exited 2 before: "the config differs ... in experiment: '<absent>' -> {'resume': ...}")
    assert _main(config, *sets, f"experiment.resume={run_dir}") == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [e["event"] for e in manifest["events"]] == ["running", "interrupted", "resumed", "running", "finished"]
    assert manifest["events"][2]["from_step"] == 1 and (run_dir / "config.yaml").read_bytes() == config_before
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2
