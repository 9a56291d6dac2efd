"""trainer.params.model_mode: 'train' (default) trains in train mode; 'reference' keeps the whole model in eval mode
while training (the reference study's accident), recorded in the manifest, wandb's config and the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from core.Configurator import ConfigError, build
from core.evaluation import build_downstream, run_downstream
from core.optimizer_groups import StepContext
from core.Trainer import MODEL_MODE_LABELS, Trainer
from data.batch import Batch
from dl_utils.run import Run
from model_zoo.soft_intro import SoftIntroVAE
from tests.core._trainer_fixtures import FakeData, RecordingLogger, TinyAE, make_run
from tests.core.evaluation.fakes import FakeData as EvalData
from tests.core.evaluation.fakes import RecordingLogger as EvalLogger
from tests.core.evaluation.fakes import TinyModel, block


class ModeRecorder(TinyAE):
    """TinyAE with BatchNorm and dropout that records, per training call, the mode of every submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.modes: list[set[bool]] = []
        self.val_modes: list[set[bool]] = []

    def reconstruct(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(self.drop(torch.relu(self.norm(self.encoder(x))))))

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        self.modes.append({m.training for m in self.modules()})
        return super().training_losses(batch)

    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.val_modes.append({m.training for m in self.modules()})
        return {"recon_mae": (self.reconstruct(batch.image) - batch.image).abs().mean()}


@pytest.mark.parametrize("mode", ["train", "reference"])
def test_every_training_step_runs_in_the_configured_mode(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = ModeRecorder()
    start = model.norm.running_mean.clone()
    log = RecordingLogger()
    trainer = Trainer.from_options(model=model, data=FakeData(n_train=8), run=make_run(tmp_path, logger=log),
                                   max_epochs=2, progress=False, model_mode=mode)
    trainer.fit()
    assert len(model.modes) == 4  # 2 epochs of 2 batches, validation between them
    assert model.modes == [{mode == "train"}] * 4  # every module, every step (a validation in between included)
    assert model.val_modes and all(m == {False} for m in model.val_modes)  # validation: eval mode either way
    # reference: BatchNorm normalised with its running statistics, which therefore never moved
    assert torch.equal(model.norm.running_mean, start) == (mode == "reference")
    assert trainer.run.manifest()["training_model_mode"] == MODEL_MODE_LABELS[mode]
    assert log.config["training_model_mode"] == mode


def test_reference_mode_reaches_a_model_with_optimizer_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    torch.manual_seed(0)
    model = SoftIntroVAE(image_size=8, channels=(4,), zdim=2, beta_neg=2.0)
    seen: list[set[bool]] = []
    original = SoftIntroVAE.training_step

    def spy(self: SoftIntroVAE, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        seen.append({m.training for m in self.modules()})
        return original(self, batch, ctx)

    monkeypatch.setattr(SoftIntroVAE, "training_step", spy)
    Trainer.from_options(model=model, data=FakeData(n_train=8, with_val=False), run=make_run(tmp_path),
                         max_steps=2, progress=False, model_mode="reference").fit()
    assert seen == [{False}, {False}]


def test_an_unknown_model_mode_is_refused_at_its_yaml_path(tmp_path: Path) -> None:
    block = {"module_name": "core.Trainer", "class_name": "Trainer", "params": {"model_mode": "eval"}}
    with pytest.raises(ConfigError, match="trainer.params.model_mode: 'eval' is not one of 'train', 'reference'"):
        build(block, "trainer", base=Trainer, model=TinyAE(), run=make_run(tmp_path))


def test_the_report_names_the_training_mode_of_the_run(tmp_path: Path) -> None:
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=0, logger=EvalLogger())
    run.update_manifest(training_model_mode=MODEL_MODE_LABELS["reference"])  # what Trainer.fit wrote
    run_downstream(build_downstream({"detection": block("detection")}), model=TinyModel().eval(), data=EvalData(),
                   run=run, progress=False)
    assert run.manifest()["backends"]["training_model_mode"] == MODEL_MODE_LABELS["reference"]
    header = (tmp_path / "report.md").read_text().split("\n## ")[1]
    assert header.startswith("Backends and settings")
    assert f"| training_model_mode | {MODEL_MODE_LABELS['reference']} |" in header
