"""Guards of the shipped ``_cpu`` configs of AE, VAE, DDPM, AnoDDPM-simplex, AutoDDPM, SI-VAE, RA and PHANES: each
still learns.

Every case loads the shipped YAML (data size, network, optimizer and learning rate, EMA and its warm-up,
inference setting) and changes only the length of training: ``trainer.params.max_steps`` is cut to the
``steps`` below (the shipped runs are 570 steps for AE, 3800 for VAE, 1500 for the diffusion models and 900 for
the SI-VAE family, whose plain-VAE warm-up is cut with them, 300 -> 100), and validation is skipped. The model is
trained with the project's Trainer and evaluated like a run (EMA weights when the config keeps an EMA). The
thresholds are what these shortened runs must reach on the embedded benchmark's hypointense lesions (pixel AUROC
inside brain OR lesion; image AUROC against the healthy test images at least 0.55); the shipped runs reach more
(the README's CPU study table, ``python -m tools.study projects/normative_eval/studies/cpu_study.yaml``).

A config change that stops learning (a learning rate off by 10x, an EMA that never leaves its initial
weights, an inference from a noise level the model cannot restore, a broken map) fails here.
Slow: about eight minutes on one CPU thread in all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from core.Configurator import build, load_config
from core.data_module import DataModule
from core.evaluation import DownstreamEvaluator, evaluate
from core.Trainer import Trainer
from dl_utils.checkpoint import load_model_weights
from model_zoo.autoddpm import AutoDDPM
from model_zoo.base import AnomalyModel
from tests.core._trainer_fixtures import make_run
from tests.model_zoo._learning import WithoutValidation, hypointense_separation

SOFT_INTRO_STEPS = 200
SOFT_INTRO_WARMUP = ("model.params.vae_warmup_steps=100",)
SI_VAE_MIN, RA_MIN, PHANES_MIN = 0.7, 0.6, 0.7  # pixel AUROC; measured 2026-12-05, 1 thread (pixel / image):
# si_vae_cpu 0.736 / 0.639, ra_cpu 0.709 / 0.704, phanes_cpu 0.897 / 0.760

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "normative_eval" / "configs"
logger = logging.getLogger(__name__)


def train_shipped(name: str, steps: int, run_dir: Path, overrides: tuple[str, ...] = ()
                  ) -> tuple[AnomalyModel, DataModule, Path]:
    """Build ``<name>.yaml`` as shipped, train it for ``steps`` optimizer steps (``overrides``: the shortened
    schedule's other lengths); return the model holding the weights a run evaluates (EMA when kept), its data, and
    its ``best.pt``."""
    torch.manual_seed(0)
    config = load_config(CONFIGS / f"{name}.yaml", [f"trainer.params.max_steps={steps}",
                                                      "trainer.params.max_epochs=10000", *overrides])
    data = build(config["data"], "data", base=DataModule)
    model = build(config["model"], "model", base=AnomalyModel)
    trainer = build(config["trainer"], "trainer", base=Trainer, model=model, data=WithoutValidation(data),
                    run=make_run(run_dir))
    trainer.fit()
    best = run_dir / "checkpoints" / "best.pt"
    load_model_weights(model, best)
    return model.eval(), data, best


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps", "min_auroc", "overrides"), [
    ("ae_cpu", 300, 0.75, ()),
    ("vae_cpu", 600, 0.75, ()),
    ("ddpm_cpu", 400, 0.75, ()),
    ("anoddpm_simplex_cpu", 400, 0.7, ()),
    # the SI-VAE family: the plain-VAE warm-up cut with the schedule (shipped: 300 of 600 batches)
    ("si_vae_cpu", SOFT_INTRO_STEPS, SI_VAE_MIN, SOFT_INTRO_WARMUP),
    ("ra_cpu", SOFT_INTRO_STEPS, RA_MIN, SOFT_INTRO_WARMUP),
    ("phanes_cpu", SOFT_INTRO_STEPS, PHANES_MIN, SOFT_INTRO_WARMUP),
])
def test_shortened_cpu_config_separates_hypointense_lesions(name: str, steps: int, min_auroc: float,
                                                            overrides: tuple[str, ...], tmp_path: Path,
                                                            one_thread: None) -> None:
    model, data, best = train_shipped(name, steps, tmp_path, overrides)
    hypointense_separation(model, data).check(f"{name} after {steps} steps", min_pixel=min_auroc)
    if name == "ddpm_cpu":  # AutoDDPM's _cpu config evaluates these weights, as the CPU study does
        config = load_config(CONFIGS / "autoddpm_cpu.yaml")
        auto = build(config["model"], "model", base=AnomalyModel)
        assert isinstance(auto, AutoDDPM)
        load_model_weights(auto, best)
        calibrated = evaluate(auto, data, {"calibration": DownstreamEvaluator(task="mask_calibration")})  # as a run
        tau = calibrated["calibration"]["val"]["mask_threshold"]  # a per-call input: the model keeps no threshold
        hypointense_separation(auto, data, mask_threshold=tau).check("autoddpm_cpu on those weights",
                                                                     min_pixel=min_auroc)
