"""The shipped reference configs of DAE, ceVAE, MAE and MorphAEus build the reference networks (parameter counts).

Every ``_cpu`` config's end-to-end run is in ``tests/core/test_shipped_configs.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.Configurator import build, load_config
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
