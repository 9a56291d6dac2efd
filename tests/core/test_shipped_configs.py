"""Every shipped ``_cpu`` config trains a few steps and evaluates end to end through ``core/Main.py``.

The cases are every ``projects/normative_eval/configs/*_cpu.yaml`` (a new config is enrolled by existing), on the
embedded benchmark at smoke size (``tests.smoke_data``). Two-stage configs chain from their first stage, as the CPU
study does: f-AnoGAN's encoder on a WGAN-GP run, LTM on a VQ-VAE run, AutoDDPM evaluating a DDPM's weights. Whether
the configs *learn* is checked elsewhere (``tests/model_zoo/test_cpu_configs_learn.py``, ``test_learning.py``).
"""

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
# second stage -> (first stage, model.params key of the first stage's checkpoint, provenance name)
CHAINS = {"fanogan_cpu": ("fanogan_wgan_cpu", "wgan_checkpoint", "stage1_wgan"),
          "ltm_cpu": ("vqvae_cpu", "vqvae_checkpoint", "stage1_vqvae")}
WEIGHTS_FROM = {"autoddpm_cpu": "ddpm_cpu"}  # evaluates another config's weights; no training of its own
STAGE1_ONLY = {"fanogan_wgan_cpu"}  # trains, scores nothing: no evaluation
SEVERAL_OPTIMIZERS = {"si_vae_cpu", "ra_cpu", "phanes_cpu", "fanogan_wgan_cpu"}
SHIPPED = sorted(p.stem for p in CONFIGS.glob("*_cpu.yaml"))
pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid"),
              pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]


def _run(config: str, out: Path, *extra: str) -> Path:
    code = main(["--config_path", str(CONFIGS / f"{config}.yaml"), "--log_level", "WARNING",
                 "--set", f"experiment.output_dir={out}", "--set", "wandb.mode=disabled",
                 "--set", "trainer.params.max_steps=2", "--set", "trainer.params.max_epochs=1",
                 "--set", "trainer.params.val_interval=1", "--set", "trainer.params.val_max_batches=1",
                 *SMOKE_DATA, *extra])
    assert code == 0, config
    (run_dir,) = [p for p in out.glob("*/*/*") if p.is_dir()]
    return run_dir


# Inception features cost ~0.1 s per image on a CPU: a small AHI (the main job runs it in full)
SMALL_AHI = ("--set", "downstream_tasks.ahi.params.reference_limit=20",
             "--set", "downstream_tasks.ahi.params.datasets=[hypointense_lesion]")


def test_every_shipped_cpu_config_is_a_case() -> None:
    assert len(SHIPPED) >= 17 and set(CHAINS) | set(WEIGHTS_FROM) | STAGE1_ONLY | SEVERAL_OPTIMIZERS <= set(SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_cpu_config_trains_and_evaluates(config: str, tmp_path: Path, one_thread: None) -> None:
    if config in STAGE1_ONLY:
        run_dir = _run(config, tmp_path, "--set", "downstream_tasks=null")
    elif config in CHAINS:
        stage1, key, name = CHAINS[config]
        checkpoint = _run(stage1, tmp_path / "stage1", "--set", "downstream_tasks=null") / "checkpoints" / "latest.pt"
        run_dir = _run(config, tmp_path / "stage2", "--set", f"model.params.{key}={checkpoint}", *SMALL_AHI)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["model_provenance"][name]["sha256"] == file_sha256(checkpoint)
        best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        assert best["provenance"][name]["path"] == str(checkpoint.resolve())
    elif config in WEIGHTS_FROM:
        weights = _run(WEIGHTS_FROM[config], tmp_path / "weights", "--set", "downstream_tasks=null")
        run_dir = _run(config, tmp_path / "evaluate", "--set", "experiment.task=evaluate",
                       "--set", f"experiment.weights={weights / 'checkpoints' / 'best.pt'}", *SMALL_AHI)
    else:
        run_dir = _run(config, tmp_path, *SMALL_AHI)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if config not in STAGE1_ONLY:
        missing = [task for task in TASKS if not any(k.startswith(f"eval/{task}/") for k in metrics)]
        assert missing == [], f"{config}: no numbers from tasks {missing}"
    if config in WEIGHTS_FROM:
        return
    assert any(k.startswith("train/") for k in metrics)
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    if config in SEVERAL_OPTIMIZERS:  # one state per group, no single-optimizer state
        assert len(latest["optimizers"]) >= 2
    if config in ("ra_cpu", "phanes_cpu"):  # which saliency network was used is on record
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert "saliency_perceptual" in manifest["model_provenance"]
