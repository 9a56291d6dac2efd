"""The shipped DAE, ceVAE, MAE and MorphAEus configs: the reference ones build the reference networks, and every
``_cpu`` variant trains a few steps and evaluates end to end through ``core/Main.py`` (slow: minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.Configurator import build, load_config
from core.Main import main
from model_zoo.base import AnomalyModel

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "normative_eval" / "configs"
pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid"),
              pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]


@pytest.mark.parametrize(("name", "millions"), [("dae", 7.70), ("cevae", 15.24), ("mae", 63.66),
                                                ("morphaeus", 3.85)])
def test_reference_configs_build_the_reference_networks(name: str, millions: float) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config["data"]["params"]["target_size"] == [128, 128]
    model = build(config["model"], "model", base=AnomalyModel)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dae_cpu", "cevae_cpu", "mae_cpu", "morphaeus_cpu"])
def test_cpu_config_trains_and_evaluates(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code = main([
        "--config_path", str(CONFIGS / f"{name}.yaml"), "--log_level", "WARNING",
        "--set", f"experiment.output_dir={tmp_path}", "--set", "wandb.mode=offline",
        "--set", "trainer.params.max_steps=3", "--set", "trainer.params.max_epochs=1",
        "--set", "trainer.params.val_max_batches=1",
        # the Inception-based AHI costs ~0.1 s per image on a CPU; the other tasks run in full
        "--set", "downstream_tasks.ahi.enabled=false",
    ])
    assert code == 0
    (run_dir,) = [p for p in tmp_path.glob("*/*/*") if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task in ("detection", "segmentation", "rqi", "caci"):
        assert any(k.startswith(f"eval/{task}/") for k in metrics), f"{name}: no numbers from task {task}"
