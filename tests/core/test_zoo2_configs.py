"""Every `_cpu` config of the several-network methods trains for a few steps and evaluates (two-stage chains too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.Main import main
from dl_utils.run import file_sha256
from tests.smoke_data import SMOKE_DATA

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "normative_eval" / "configs"
TASKS = ("thresholds", "detection", "segmentation", "localization", "rqi", "ahi", "caci")


def _run(config: str, out: Path, *extra: str) -> Path:
    code = main(["--config_path", str(CONFIGS / f"{config}.yaml"), "--log_level", "WARNING",
                 "--set", f"experiment.output_dir={out}", "--set", "wandb.mode=disabled",
                 "--set", "trainer.params.max_steps=2", "--set", "trainer.params.max_epochs=1",
                 "--set", "trainer.params.val_interval=1", *SMOKE_DATA, *extra])
    assert code == 0
    (run_dir,) = [p for p in out.glob("*/*/*") if p.is_dir()]
    return run_dir


def _evaluation_overrides() -> tuple[str, ...]:
    # Inception features cost ~0.1 s per image on a CPU: keep the AHI small (as the quickstart test does)
    return ("--set", "downstream_tasks.ahi.params.reference_limit=20",
            "--set", "downstream_tasks.ahi.params.datasets=[hypointense_lesion]")


def _check_evaluated(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task in TASKS:
        assert any(k.startswith(f"eval/{task}/") for k in metrics), f"no numbers from task {task}"
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("config", ["si_vae_cpu", "ra_cpu", "phanes_cpu", "vqvae_cpu"])
def test_single_stage_cpu_config_trains_and_evaluates(config: str, tmp_path: Path, one_thread: None) -> None:
    run_dir = _run(config, tmp_path, *_evaluation_overrides())
    manifest = _check_evaluated(run_dir)
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    if config != "vqvae_cpu":  # several optimizers: one state per group, no single-optimizer state
        assert latest["optimizer"] is None and len(latest["optimizers"]) >= 2
    if config in ("ra_cpu", "phanes_cpu"):  # which saliency network was used is on record
        assert "saliency_perceptual" in manifest["model_provenance"]


@pytest.mark.slow
@pytest.mark.parametrize(("stage1", "stage2", "key", "name"), [
    ("fanogan_wgan_cpu", "fanogan_cpu", "wgan_checkpoint", "stage1_wgan"),
    ("vqvae_cpu", "ltm_cpu", "vqvae_checkpoint", "stage1_vqvae"),
])
def test_two_stage_cpu_configs_chain(stage1: str, stage2: str, key: str, name: str, tmp_path: Path,
                                     one_thread: None) -> None:
    first = _run(stage1, tmp_path / "one", "--set", "downstream_tasks=null")
    checkpoint = first / "checkpoints" / "latest.pt"
    second = _run(stage2, tmp_path / "two", "--set", f"model.params.{key}={checkpoint}", *_evaluation_overrides())
    manifest = _check_evaluated(second)
    assert manifest["model_provenance"][name]["sha256"] == file_sha256(checkpoint)
    best = torch.load(second / "checkpoints" / "best.pt", weights_only=True)
    assert best["provenance"][name]["path"] == str(checkpoint.resolve())
