"""model_diagnostics: prior samples for models with a prior, reconstructions by noise level for diffusion models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.Configurator import build
from core.evaluation import DownstreamEvaluator
from core.evaluation.context import EvalContext
from core.evaluation.tasks.diagnostics import PartialDiffusionModel, noise_settings
from dl_utils.reinit import randomize_zero_layers
from model_zoo.base import AnomalyModel
from model_zoo.registry import method
from tests.core.evaluation.fakes import FakeData, TinyModel


def _run(model: AnomalyModel, **options):
    ctx = EvalContext(model=model, data=FakeData(), device="cpu", seed=0, progress=False)
    return DownstreamEvaluator(task="model_diagnostics", **options)(ctx)


def _model(name: str) -> AnomalyModel:
    torch.manual_seed(0)
    model = build(method(name).block(Path("unused")), "model", base=AnomalyModel)  # vae, ddpm: no stage-1 file
    randomize_zero_layers(model)
    return model


def test_prior_samples_figure():
    result = _run(_model("vae"), n_samples=6)
    figure = result.figures["prior_samples"]
    assert sum(1 for ax in figure.axes if ax.images) == 6 and "noise_levels" not in result.figures
    assert "no diagnostics" not in " ".join(result.notes)
    assert "prior_samples" not in _run(_model("vae"), n_samples=0).figures


def test_noise_levels_around_the_models_own_and_one_draw_each():
    model = _model("anoddpm_simplex")  # strided, L = 2, 2 steps
    assert isinstance(model, PartialDiffusionModel)
    settings = noise_settings(model, None)
    assert [s.noise_level for s in settings] == [1, 2, 4]  # 0.25 L and 0.5 L both round to 1
    assert [s.steps for s in settings] == [2, 2, 2] and {s.draws for s in settings} == {1}
    assert [s.steps for s in noise_settings(model, [0, 5])] == [1, 2]  # capped at L + 1
    with pytest.raises(ValueError, match="noise_level"):
        noise_settings(model, [5000])
    result = _run(model, noise_levels=[1, 3])
    figure = result.figures["noise_levels"]
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["input", "L=1", "|x - x_rec| L=1", "L=3", "|x - x_rec| L=3"]
    assert len(figure.axes) == 2 * 5  # a healthy and a pathological row
    assert "'healthy_test' and 'lesions'" in " ".join(result.notes)


def test_models_without_either_get_a_note():
    result = _run(TinyModel())
    assert not result.figures and "no diagnostics" in result.notes[0]
