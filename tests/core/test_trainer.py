"""CPU tests of the generic training loop (tiny conv autoencoder, 8x8 images)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from core.Configurator import ConfigError, build
from core.Trainer import Trainer
from core.trainer_options import EarlyStopping, EMAOptions, Optimization, Reporting, Validation
from data.batch import Batch
from dl_utils import checkpoint as ckpt
from dl_utils.run import Run
from tests.core._trainer_fixtures import FakeData, RecordingLogger, TinyAE, make_run

TRAINER_BLOCK = {"module_name": "core.Trainer", "class_name": "Trainer"}
CHECKPOINT_KEYS = {"model", "ema", "optimizers", "schedulers", "scalers", "epoch", "step", "best_metric", "rng",
                   "config", "trainer"}


def make_trainer(tmp_path: Path, model: TinyAE | None = None, data: FakeData | None = None,
                 **params: object) -> tuple[Trainer, RecordingLogger]:
    torch.manual_seed(0)
    log = RecordingLogger()
    params.setdefault("progress", False)
    trainer = build({**TRAINER_BLOCK, "params": params}, "trainer", base=Trainer, model=model or TinyAE(),
                    data=data or FakeData(), run=make_run(tmp_path, logger=log))
    return trainer, log


class ScriptedAE(TinyAE):
    """Validation returns a scripted ``recon_mae`` sequence and snapshots the weights it was evaluated on."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.snapshots, self.val_batches = values, [], 0

    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if self.val_batches % 2 == 0:  # 2 val batches per validation: snapshot once per validation
            self.snapshots.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        value = self.values[(self.val_batches // 2) % len(self.values)]
        self.val_batches += 1
        return {"recon_mae": torch.tensor(value)}


class NaNAt(TinyAE):
    """Returns a NaN ``mse`` from the given step (1-based) on."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.nan_step = step

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        terms = super().training_losses(batch)
        if self.calls >= self.nan_step:
            terms["mse"] = terms["mse"] * float("nan")
        return terms


def test_fit_logs_every_term_and_writes_loadable_checkpoints(tmp_path: Path) -> None:
    trainer, log = make_trainer(tmp_path, max_epochs=2, log_interval=2, progress=True)  # bar off: no tty
    best = trainer.fit()
    assert best == tmp_path / "checkpoints" / "best.pt"
    assert [step for step, _ in log.train] == [2, 4, 6, 8, 10, 12]  # 6 batches of 4 per epoch
    assert all(set(values) == {"loss", "mse", "l1", "lr"} for _, values in log.train)
    assert all(math.isclose(v["loss"], v["mse"] + v["l1"], rel_tol=1e-5) for _, v in log.train)
    (step, timing), = [(step, v) for step, v in log.scalars if "train/wall_s" in v]  # the training time, once
    assert step == 12 and timing["train/wall_s"] > 0
    assert [step for step, _ in log.val] == [6, 12]
    assert trainer.data.seeds == [7, 8]  # train loader seeded with run.seed + epoch
    for name in ("best.pt", "latest.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert set(state) == CHECKPOINT_KEYS
        assert state["config"] == {"name": "tiny", "trainer": {"max_epochs": 3}}
    latest = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["epoch"], latest["step"], latest["trainer"]["batch_in_epoch"]) == (2, 12, 0)
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp file


def test_yaml_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.params\.amp: 'fp32' is not one of 'auto', 'bf16'"):
        make_trainer(tmp_path, amp="fp32")
    with pytest.raises(ConfigError, match="max_epoch.*did you mean 'max_epochs'"):
        make_trainer(tmp_path, max_epoch=3)
    with pytest.raises(ConfigError, match="ema_decy: unknown parameter .did you mean 'ema_decay'.*flat names"):
        make_trainer(tmp_path, ema_decy=0.9)
    with pytest.raises(ValueError, match="optimization.lr_scheduler_interval: 'batch' is not one of 'epoch', 'step'"):
        Optimization(lr_scheduler_interval="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="trainer.params.val_interval: must be > 0, got 0"):  # as written
        make_trainer(tmp_path, val_interval=0)
    with pytest.raises(ConfigError, match="trainer.params.validation.interval: must be > 0, got 0"):
        make_trainer(tmp_path, validation={"interval": 0})
    with pytest.raises(ConfigError, match="trainer.params.ema.decay: must lie in .0, 1."):
        make_trainer(tmp_path, ema={"decay": 1.5})
    with pytest.raises(ConfigError, match="trainer.params.optimizer.class_name: torch.optim has no class 'Adamm'"):
        make_trainer(tmp_path, optimizer={"module_name": "torch.optim", "class_name": "Adamm"})
    with pytest.raises(ConfigError, match="ema_warmup=true needs an ema_decay"):
        make_trainer(tmp_path, ema_warmup=True)


def test_loss_weights_weight_the_sum_and_unknown_names_fail(tmp_path: Path) -> None:
    trainer, log = make_trainer(tmp_path, max_steps=3, log_interval=1, loss_weights={"mse": 2.0, "l1": 0.0})
    trainer.fit()
    assert len(log.train) == 3
    assert all(math.isclose(v["loss"], 2.0 * v["mse"], rel_tol=1e-6) for _, v in log.train)
    trainer, _ = make_trainer(tmp_path / "b", max_steps=3, loss_weights={"mse": 1.0, "kl": 0.5})
    with pytest.raises(ValueError, match=r"unknown term\(s\) \['kl'\].*returns \['l1', 'mse'\]"):
        trainer.fit()


def test_best_weights_are_a_copy_and_early_stopping(tmp_path: Path) -> None:
    model = ScriptedAE([0.5, 0.1, 0.3, 0.4, 0.05])
    trainer, log = make_trainer(tmp_path, model=model, max_epochs=10, early_stopping_patience=2)
    best_path = trainer.fit()
    assert trainer.epoch == 4  # best at validation 2, then 2 validations without improvement
    assert [v["recon_mae"] for _, v in log.val] == pytest.approx([0.5, 0.1, 0.3, 0.4])
    assert trainer.best_metric == pytest.approx(0.1)
    best_snapshot = model.snapshots[1]
    final = model.state_dict()
    assert any(not torch.equal(best_snapshot[k], final[k]) for k in final)  # training went on
    for key in final:
        assert torch.equal(trainer.best_weights[key], best_snapshot[key])
        assert trainer.best_weights[key].data_ptr() != final[key].data_ptr()
    saved = torch.load(best_path, weights_only=True)
    assert saved["step"] == 12 and saved["best_metric"] == pytest.approx(0.1)
    assert all(torch.equal(saved["model"][k], best_snapshot[k]) for k in final)


class WarmupAE(ScriptedAE):
    """A scripted validation and a declared warm-up (as SI-VAE's plain-VAE phase)."""

    def __init__(self, values: list[float], warmup: int) -> None:
        super().__init__(values)
        self.warmup = warmup

    @property
    def warmup_steps(self) -> int:
        return self.warmup


def test_validations_during_the_models_warm_up_never_choose_best_or_count_for_patience(tmp_path: Path) -> None:
    # 6 steps per epoch; the warm-up covers the validations at steps 6 and 12 (the lowest values of all)
    model = WarmupAE([0.05, 0.04, 0.3, 0.2, 0.25, 0.26], warmup=12)
    trainer, log = make_trainer(tmp_path, model=model, max_epochs=6, early_stopping_patience=2)
    best = trainer.fit()
    assert [step for step, _ in log.val] == [6, 12, 18, 24, 30, 36]  # logged, all of them
    assert trainer.best_metric == pytest.approx(0.2) and trainer.epoch == 6  # patience counted after the warm-up
    saved = torch.load(best, weights_only=True)
    assert saved["step"] == 24 and all(torch.equal(saved["model"][k], model.snapshots[3][k]) for k in saved["model"])


def test_a_warm_up_longer_than_the_training_leaves_the_final_weights_as_best(tmp_path: Path) -> None:
    model = WarmupAE([0.1], warmup=100)
    trainer, _ = make_trainer(tmp_path, model=model, max_epochs=2)
    saved = torch.load(trainer.fit(), weights_only=True)
    assert saved["step"] == 12 and trainer.best_metric is None
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


def test_nan_loss_stops_with_the_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path, model=NaNAt(5), max_epochs=2, checkpoint_every_steps=2, log_interval=50)
    with pytest.raises(FloatingPointError, match=r"step 5 .*loss=nan, mse=nan, l1=\d"):
        trainer.fit()
    latest = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert latest["step"] == 4
    assert all(torch.isfinite(v).all() for v in latest["model"].values())


@pytest.mark.parametrize(("interval", "expected_lr"), [("epoch", 0.1 * 0.5**3), ("step", 0.1 * 0.5**18)])
def test_scheduler_steps_per_epoch_or_per_step(tmp_path: Path, interval: str, expected_lr: float) -> None:
    trainer, log = make_trainer(
        tmp_path, max_epochs=3, log_interval=1, lr_scheduler_interval=interval,
        optimizer={"module_name": "torch.optim", "class_name": "SGD", "params": {"lr": 0.1}},
        lr_scheduler={"module_name": "torch.optim.lr_scheduler", "class_name": "StepLR",
                      "params": {"step_size": 1, "gamma": 0.5}})
    trainer.fit()
    assert trainer.groups.optimizers["model"].param_groups[0]["lr"] == pytest.approx(expected_lr)
    logged = [v["lr"] for _, v in log.train]
    if interval == "epoch":
        assert logged == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 6)
    else:
        assert logged == pytest.approx([0.1 * 0.5**k for k in range(1, 19)])


def test_max_steps_stops_mid_epoch_and_validates_at_the_end(tmp_path: Path) -> None:
    trainer, log = make_trainer(tmp_path, max_epochs=5, max_steps=8)
    trainer.fit()
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (8, 1, 2)
    assert [step for step, _ in log.val] == [6, 8]
    latest = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["step"], latest["epoch"], latest["trainer"]["batch_in_epoch"]) == (8, 1, 2)


def test_ema_weights_are_validated_and_preferred_when_loading(tmp_path: Path) -> None:
    trainer, log = make_trainer(tmp_path, max_epochs=2, ema_decay=0.9,
                                optimizer={"module_name": "torch.optim", "class_name": "Adam",
                                           "params": {"lr": 0.01}})
    best = trainer.fit()
    state = torch.load(best, weights_only=True)
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    data = FakeData()
    expected = torch.stack([trainer.ema.module.validation_losses(b)["recon_mae"]
                            for b in data.val_dataloader()]).mean().item()
    assert log.val[-1][1]["recon_mae"] == pytest.approx(expected, rel=1e-6)
    fresh = TinyAE()
    description = ckpt.load_model_weights(fresh, best)
    assert description.startswith("EMA weights from") and "step 12" in description
    assert all(torch.equal(fresh.state_dict()[k], state["ema"][k]) for k in state["ema"])


def test_without_validation_best_holds_the_final_weights(tmp_path: Path) -> None:
    trainer, log = make_trainer(tmp_path, data=FakeData(with_val=False), max_epochs=1)
    best = trainer.fit()
    assert log.val == []
    saved = torch.load(best, weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_modes_train_on_cpu(tmp_path: Path, amp: str) -> None:
    trainer, log = make_trainer(tmp_path, max_steps=4, log_interval=2, amp=amp, grad_clip_norm=1.0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.groups.scalers["model"].is_enabled() is (amp == "fp16")
    assert all(math.isfinite(v["loss"]) for _, v in log.train)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


class RandomVal(TinyAE):
    """Validation draws its metric from the generator it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.val_batches = 0

    def validation_losses(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.val_batches += 1
        return {"recon_mae": torch.rand((), generator=generator)}


def test_validation_uses_a_fixed_generator_and_val_max_batches(tmp_path: Path) -> None:
    model = RandomVal()
    trainer, log = make_trainer(tmp_path, model=model, max_epochs=3, val_max_batches=1)
    trainer.fit()
    assert model.val_batches == 3  # one of the two val batches per validation
    expected = torch.rand((), generator=torch.Generator().manual_seed(7)).item()  # run.seed == 7
    assert [v["recon_mae"] for _, v in log.val] == pytest.approx([expected] * 3)
    assert trainer.bad_validations == 2  # equal is not better


def test_unknown_monitor_key_is_an_error(tmp_path: Path) -> None:
    trainer, _ = make_trainer(tmp_path, max_epochs=1, monitor="dice")
    with pytest.raises(ValueError, match=r"monitor: 'dice' is not among the validation metrics \['recon_mae'"):
        trainer.fit()


def test_training_step_needs_neither_data_nor_logger_and_fit_refuses_without_them(tmp_path: Path) -> None:
    adam = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.01}}
    full, _ = make_trainer(tmp_path / "full", max_epochs=1, max_steps=3, optimizer=adam)
    full.fit()
    torch.manual_seed(0)
    step_only = Trainer.from_options(model=TinyAE(), run=Run(run_dir=tmp_path / "step", device=torch.device("cpu")),
                                     optimizer=adam, progress=False)
    step_only.model.train()
    batches = list(FakeData().train_dataloader(seed=make_run(tmp_path).seed))[:3]
    losses = [float(step_only.training_step(batch)["loss"]) for batch in batches]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(full.model.state_dict()[k], v) for k, v in step_only.model.state_dict().items())
    with pytest.raises(ValueError, match=r"Trainer.fit\(\) needs data and logger"):
        step_only.fit()
    no_logger = Trainer.from_options(model=TinyAE(), data=FakeData(), progress=False,
                                     run=Run(run_dir=tmp_path / "nolog", device=torch.device("cpu")))
    with pytest.raises(ValueError, match=r"Trainer.train_epoch\(\) needs logger:"):
        no_logger.train_epoch()


def test_training_time_is_checkpointed_and_summed_over_a_resume(tmp_path: Path) -> None:
    first, _ = make_trainer(tmp_path, max_epochs=1)
    first.fit()
    spent = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["train_seconds"]
    assert spent > 0
    second = build({**TRAINER_BLOCK, "params": {"max_epochs": 2, "progress": False}}, "trainer", base=Trainer,
                   model=TinyAE(), data=FakeData(),
                   run=make_run(tmp_path, logger=(log := RecordingLogger()),
                                resume_from=tmp_path / "checkpoints" / "latest.pt"))
    second.fit()
    (_, timing), = [(step, v) for step, v in log.scalars if "train/wall_s" in v]
    assert timing["train/wall_s"] > spent  # the first run's seconds plus the resumed epoch's


def test_the_constructor_takes_typed_sub_blocks_and_at_most_twelve_parameters() -> None:
    assert len(inspect.signature(Trainer.__init__).parameters) - 1 <= 12  # self aside


def test_flat_and_nested_options_build_the_same_trainer_and_both_at_once_is_an_error(tmp_path: Path) -> None:
    adam = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.01}}
    flat, _ = make_trainer(tmp_path / "flat", max_epochs=2, optimizer=adam, ema_decay=0.9, val_interval=2,
                           monitor="recon_mae", early_stopping_patience=3, log_interval=7)
    nested, _ = make_trainer(tmp_path / "nested", max_epochs=2, optimization={"optimizer": adam}, ema={"decay": 0.9},
                             validation={"interval": 2, "monitor": "recon_mae"}, early_stopping={"patience": 3},
                             reporting={"log_interval": 7})  # progress: False from make_trainer, flat
    for trainer in (flat, nested):
        assert trainer.optimization == Optimization(optimizer=adam)
        assert trainer.ema_options == EMAOptions(decay=0.9)
        assert trainer.validation == Validation(interval=2)
        assert trainer.early_stopping == EarlyStopping(patience=3)
        assert trainer.reporting == Reporting(log_interval=7, progress=False)
    mixed, _ = make_trainer(tmp_path / "mixed", ema_decay=0.9, ema={"warmup": True})  # flat adds to a nested block
    assert mixed.ema_options == EMAOptions(decay=0.9, warmup=True)
    with pytest.raises(ConfigError, match=r"trainer.params.ema_decay and trainer.params.ema.decay are the same option"):
        make_trainer(tmp_path / "both", ema_decay=0.9, ema={"decay": 0.99})
    with pytest.raises(ConfigError, match=r"trainer.params.validation.intervall: unknown key .did you mean 'interval'"):
        make_trainer(tmp_path / "typo", validation={"intervall": 2})


def test_a_checkpoint_of_the_single_optimizer_format_resumes_exactly(tmp_path: Path) -> None:
    sgd = {"module_name": "torch.optim", "class_name": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    sched = {"module_name": "torch.optim.lr_scheduler", "class_name": "StepLR", "params": {"step_size": 1,
                                                                                        "gamma": 0.5}}
    whole, _ = make_trainer(tmp_path / "whole", max_epochs=2, optimizer=sgd, lr_scheduler=sched)
    whole.fit()
    first, _ = make_trainer(tmp_path / "first", max_epochs=1, optimizer=sgd, lr_scheduler=sched)
    first.fit()
    latest = tmp_path / "first" / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("optimizers", "schedulers", "scalers")}
    old.update(optimizer=state["optimizers"]["model"], scheduler=state["schedulers"]["model"], scaler=None)
    ckpt.save_checkpoint(latest, old)  # as written before the one optimisation path
    torch.manual_seed(0)
    log = RecordingLogger()
    resumed = build({**TRAINER_BLOCK, "params": {"max_epochs": 2, "optimizer": sgd, "lr_scheduler": sched,
                                                 "progress": False}}, "trainer", base=Trainer, model=TinyAE(),
                    data=FakeData(), run=make_run(tmp_path / "first", logger=log, resume_from=latest))
    resumed.fit()
    assert resumed.groups.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.025)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
