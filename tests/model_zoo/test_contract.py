"""CPU contract test that every registered method passes (tiny sizes, random [2,1,32,32] input in [0,1]).

Parametrised from :data:`model_zoo.registry.METHODS`: every entry gets the training contract, scorers also the
scorer contract; a trainable class of ``model_zoo`` without an entry fails :func:`test_every_trainable_class_is_
registered`. Every test builds the model through :func:`core.Configurator.build`, exactly as ``core/Main.py`` does.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import types
from pathlib import Path

import pytest
import torch

import model_zoo
from core.Configurator import build
from core.Trainer import Trainer
from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from dl_utils.run import Run
from model_zoo.base import AnomalyModel, AnomalyOutput, MaskThresholdModel, TrainableModel
from model_zoo.registry import METHODS, SIZE, Method, entries_of, stage1_problem

SCORERS = [m for m in METHODS if m.kind == "scorer"]


def _build(method: Method, workdir: Path) -> TrainableModel:
    torch.manual_seed(0)
    model = build(method.block(workdir), "model", base=TrainableModel)
    randomize_zero_layers(model)  # MONAI's diffusion UNet starts with eps = 0; the checks need a non-trivial network
    return model


@pytest.fixture(params=METHODS, ids=[m.name for m in METHODS])
def trainable(request: pytest.FixtureRequest, tmp_path: Path) -> TrainableModel:
    return _build(request.param, tmp_path)


@pytest.fixture(params=SCORERS, ids=[m.name for m in SCORERS])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> AnomalyModel:
    return _build(request.param, tmp_path)


def _anomaly(model: AnomalyModel, x: torch.Tensor, seed: int) -> AnomalyOutput:
    """``get_anomaly`` as the evaluation calls it (a model that needs a calibrated mask threshold gets one)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, MaskThresholdModel) and model.needs_mask_threshold:
        return model.get_anomaly(x, generator=generator, mask_threshold=0.1)
    return model.get_anomaly(x, generator=generator)


def _trainable_classes(module: types.ModuleType) -> list[type]:
    """Concrete public TrainableModel subclasses defined in ``module``."""
    return [obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, TrainableModel)
            and not inspect.isabstract(obj) and not name.startswith("_")]


def test_every_trainable_class_is_registered() -> None:
    modules = [importlib.import_module(info.name)
               for info in pkgutil.walk_packages(model_zoo.__path__, prefix="model_zoo.")]
    found = {(cls.__module__, cls.__qualname__) for module in modules for cls in _trainable_classes(module)}
    registered = {(m.module_name, m.class_name) for m in METHODS}
    assert len(found) >= 16  # the walk sees the zoo (fails if it silently imported nothing)
    missing = sorted(f"{module}.{name}" for module, name in found - registered)
    assert not missing, f"trainable classes without an entry in model_zoo/registry.py METHODS: {missing}"
    assert registered <= found, f"registry entries naming no trainable class: {sorted(registered - found)}"
    assert len({m.name for m in METHODS}) == len(METHODS), "registry entry names must be unique"


def test_the_walk_finds_an_unregistered_class() -> None:
    module = types.ModuleType("model_zoo.fake_method")

    class Orphan(AnomalyModel):
        def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
            return {}

        def get_anomaly(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
            return AnomalyOutput(anomaly_map=x, anomaly_score=x.mean(dim=(1, 2, 3)))

    Orphan.__module__ = module.__name__
    module.Orphan, module.AnomalyModel = Orphan, AnomalyModel  # an imported base is not the module's own class
    assert _trainable_classes(module) == [Orphan] and entries_of(Orphan) == []


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_builds_from_block_as_its_kind(trainable: TrainableModel) -> None:
    assert isinstance(trainable, TrainableModel)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) > 0
    (method,) = {m.kind: m for m in entries_of(type(trainable))}.values()  # one kind per class
    if method.kind == "scorer":
        assert isinstance(trainable, AnomalyModel) and stage1_problem(type(trainable)) is None
    else:  # a stage-1 network trains but does not score, and says what does
        assert not isinstance(trainable, AnomalyModel) and not hasattr(trainable, "get_anomaly")
        assert method.next_stage and method.next_stage in stage1_problem(type(trainable))


def _one_training_interface(model: TrainableModel) -> str:
    """'losses' (training_losses on one optimizer) or 'step' (optimizer_groups and its own training_step)."""
    own_losses = type(model).training_losses is not TrainableModel.training_losses
    own_step = type(model).training_step is not TrainableModel.training_step
    assert own_losses != own_step, f"{type(model).__name__} must implement exactly one of training_losses and " \
                                   "training_step (with optimizer_groups)"
    assert bool(model.optimizer_groups()) == own_step
    return "step" if own_step else "losses"


def test_a_training_step_is_finite_and_moves_every_optimizer_group(trainable: TrainableModel, x: torch.Tensor,
                                                                   tmp_path: Path) -> None:
    # the step core/Trainer.py runs per batch, past the model's warm-up (SI-VAE's plain-VAE phase), one SGD step
    _one_training_interface(trainable)
    trainer = Trainer.from_options(model=trainable, run=Run(run_dir=tmp_path / "run", device=torch.device("cpu")),
                                   optimizer={"module_name": "torch.optim", "class_name": "SGD",
                                              "params": {"lr": 0.01}}, progress=False)
    trainer.step = trainable.warmup_steps
    before = {n: p.detach().clone() for n, p in trainable.named_parameters() if p.requires_grad}
    trainable.train()
    terms = trainer.training_step(Batch(image=x))
    assert "loss" in terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values()), terms
    after = dict(trainable.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)
    for group, params in trainer.groups.params.items():
        names = [n for n, p in trainable.named_parameters() if any(p is q for q in params)]
        assert any(not torch.equal(before[n], after[n]) for n in names), f"group {group!r} did not move"


def test_training_losses_are_finite_and_reach_every_parameter(trainable: TrainableModel, x: torch.Tensor) -> None:
    if _one_training_interface(trainable) == "step":
        pytest.skip("trains through its own training_step (test_a_training_step_is_finite_and_moves_every_...)")
    trainable.train()
    losses = trainable.training_losses(Batch(image=x))
    assert losses and all(isinstance(k, str) for k in losses)
    for name, value in losses.items():
        assert value.ndim == 0, f"loss {name!r} must be a scalar, got shape {tuple(value.shape)}"
        assert torch.isfinite(value), f"loss {name!r} is not finite: {value}"
    torch.stack(list(losses.values())).sum().backward()
    params = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    assert any(p.grad.abs().sum() > 0 for _, p in params)


def test_calling_the_model_returns_training_losses(trainable: TrainableModel, x: torch.Tensor) -> None:
    # the trainer calls the (DDP-wrapped) module, so ``forward`` must stay ``training_losses``
    if _one_training_interface(trainable) == "step":
        pytest.skip("trains through its own training_step: never called as a module")
    trainable.train()
    buffers = {k: v.clone() for k, v in trainable.state_dict().items()}  # train-mode updates (a VQ EMA codebook)
    torch.manual_seed(0)
    called = trainable(Batch(image=x))
    trainable.load_state_dict(buffers)
    torch.manual_seed(0)
    direct = trainable.training_losses(Batch(image=x))
    assert called.keys() == direct.keys()
    for name in direct:
        torch.testing.assert_close(called[name], direct[name])


def test_validation_losses_are_finite_scalars(trainable: TrainableModel, x: torch.Tensor) -> None:
    trainable.eval()
    metrics = trainable.validation_losses(Batch(image=x), generator=torch.Generator().manual_seed(0))
    assert metrics
    assert all(v.ndim == 0 and math.isfinite(float(v)) for v in metrics.values())


def test_anomaly_output_shapes_values_and_device(model: AnomalyModel, x: torch.Tensor) -> None:
    model.eval()
    out = _anomaly(model, x, seed=0)
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == x.shape
    assert out.anomaly_score.shape == (x.shape[0],)
    tensors = [out.anomaly_map, out.anomaly_score, *out.extras.values()]
    if out.reconstruction is not None:
        assert out.reconstruction.shape == x.shape
        assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
        tensors.append(out.reconstruction)
    for t in tensors:
        assert t.device == x.device
        assert torch.isfinite(t).all()
    assert (out.anomaly_map >= 0).all()
    for name, t in out.extras.items():
        assert t.shape[0] == x.shape[0], f"extras[{name!r}] must be [B,...]"


def test_deterministic_under_generator_with_fixed_provenance(model: AnomalyModel, x: torch.Tensor) -> None:
    model.eval()
    provenance, label = model.provenance(), model.inference_label()
    first = _anomaly(model, x, seed=123)
    torch.rand(5)  # the global RNG must not matter
    second = _anomaly(model, x, seed=123)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.anomaly_score, second.anomaly_score)
    # what the evaluation records of the model is fixed once it exists (no network built on first use)
    assert model.provenance() == provenance and model.inference_label() == label
