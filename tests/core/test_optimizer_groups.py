"""The trainer with several named optimizers: sub-steps, alternation, schedulers, checkpoints, exact resume, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.Configurator import ConfigError
from core.Trainer import Trainer
from dl_utils import checkpoint as ckpt
from model_zoo.fanogan import WGANGP
from optim.losses.adversarial import gradient_penalty
from tests.core._group_fixtures import KillableWGAN, TwoPartAE, ddp_params
from tests.core._trainer_fixtures import FakeData, RecordingLogger, TinyAE, make_run

ROOT = Path(__file__).resolve().parents[2]
ADAM = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.01}}


def _launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _gan_trainer(tmp_path: Path, **params: Any) -> Trainer:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {"max_epochs": 1, "progress": False, "monitor": "wasserstein", "optimizer": ADAM}
    return Trainer.from_options(model=KillableWGAN(), data=FakeData(), run=make_run(tmp_path),
                                **{**defaults, **params})


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_gan_run(tmp_path: Path) -> None:
    # 6 batches per epoch, 3 epochs; latest.pt every 4 batches; the killed run dies inside batch 10, after the
    # mid-epoch checkpoint of batch 8. z, the GP's alpha, dropout, augmentation, BN statistics, both Adam states,
    # both per-step schedulers, EMA and the alternation phase (n_critic 2) must all come back exactly.
    fixtures = ("-m", "tests.core._group_fixtures")
    reference = _launch(*fixtures, "--run-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.pt"))
    killed = _launch(*fixtures, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "killed.pt"),
                     "--kill-at-step", "10")
    out_ref, _ = reference.communicate(timeout=180)
    out_killed, _ = killed.communicate(timeout=180)
    assert reference.returncode == 0, out_ref
    assert killed.returncode == -signal.SIGKILL, out_killed
    latest = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert (latest["epoch"], latest["step"], latest["trainer"]["batch_in_epoch"]) == (1, 8, 2)
    assert "optimizer" not in latest and set(latest["optimizers"]) == {"critic", "generator"}

    resumed = _launch(*fixtures, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "resumed.pt"),
                      "--resume")
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    ref, res = (torch.load(tmp_path / name, weights_only=True) for name in ("ref.pt", "resumed.pt"))
    assert ref["step"] == res["step"] == 18
    for part in ("model", "ema"):
        for key, value in ref[part].items():
            assert torch.equal(value, res[part][key]), f"{part}.{key} differs after resume"
    assert any("running_mean" in key for key in ref["model"])  # BN buffers were compared too
    ref_latest, run_latest = (torch.load(tmp_path / d / "checkpoints" / "latest.pt", weights_only=True)
                              for d in ("ref", "run"))
    for group in ("critic", "generator"):
        assert ref_latest["schedulers"][group] == run_latest["schedulers"][group]
        for index, state in ref_latest["optimizers"][group]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, run_latest["optimizers"][group]["state"][index][name]), (group, name)


def test_generator_steps_on_every_n_critic_th_batch_and_schedulers_step_per_epoch(tmp_path: Path) -> None:
    milestone = {"module_name": "torch.optim.lr_scheduler", "class_name": "MultiStepLR",
                 "params": {"milestones": [1], "gamma": 0.1}}
    trainer = _gan_trainer(tmp_path, max_epochs=2, lr_scheduler=milestone,
                           optimizers={"generator": {"optimizer": {"module_name": "torch.optim", "class_name": "Adam",
                                                                   "params": {"lr": 0.02, "betas": [0.5, 0.999]}}}})
    trainer.fit()
    critic, generator = trainer.groups.optimizers["critic"], trainer.groups.optimizers["generator"]
    # 12 batches: the critic steps on each, the generator on batches 0, 2, 4, ..., 10 (n_critic 2)
    assert int(critic.state[critic.param_groups[0]["params"][0]]["step"]) == 12
    assert int(generator.state[generator.param_groups[0]["params"][0]]["step"]) == 6
    # the per-group betas reach the optimizer; the MultiStepLR fired once after epoch 1, not with a loss
    assert generator.param_groups[0]["betas"] == (0.5, 0.999)
    assert critic.param_groups[0]["lr"] == pytest.approx(0.001)
    assert generator.param_groups[0]["lr"] == pytest.approx(0.002)
    step, logged = trainer.run.logger.train[-1]
    assert {"loss", "critic", "gp", "wasserstein", "generator", "lr_critic", "lr_generator"} <= set(logged)


def test_frozen_except_keeps_gradients_out_of_other_groups(tmp_path: Path) -> None:
    trainer = _gan_trainer(tmp_path)
    model = trainer.model
    ctx = trainer.groups.context(0)
    with ctx.frozen_except("critic"):
        assert all(not p.requires_grad for p in model.generator.parameters())
        model.critic(model.generator(torch.randn(2, 4))).mean().backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.requires_grad for p in model.generator.parameters())  # restored
    with pytest.raises(KeyError, match="unknown optimizer group"):
        ctx.backward_step("encoder", torch.zeros(()))


def test_gradient_penalty_matches_its_closed_form_and_double_backward() -> None:
    # critic(x) = <w, x>: the input gradient is w everywhere, so GP = (|w| - 1)^2 and dGP/dw = 2(|w| - 1) w/|w|
    w = torch.tensor([[[[3.0, 4.0]]]], requires_grad=True)
    real, fake = torch.rand(5, 1, 1, 2), torch.rand(5, 1, 1, 2)
    gp = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake)
    assert gp.item() == pytest.approx(16.0)
    gp.backward()
    torch.testing.assert_close(w.grad, 2 * (5.0 - 1.0) * w.detach() / 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stays float32 under autocast
        assert gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake).dtype == torch.float32


def test_checkpoint_holds_every_group_and_refuses_another_models_groups(tmp_path: Path) -> None:
    trainer = _gan_trainer(tmp_path / "gan")
    trainer.fit()
    state = torch.load(tmp_path / "gan" / "checkpoints" / "latest.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "scaler"} & set(state)  # one checkpoint format for every model
    assert set(state["optimizers"]) == set(state["schedulers"]) == set(state["scalers"]) == {"critic", "generator"}
    single = Trainer.from_options(model=TinyAE(), data=FakeData(), run=make_run(tmp_path / "ae"),
                                  max_epochs=1, progress=False)
    single.fit()
    assert set(torch.load(tmp_path / "ae" / "checkpoints" / "latest.pt", weights_only=True)["optimizers"]) == {
        "model"}
    wrong = make_run(tmp_path / "gan2", resume_from=tmp_path / "ae" / "checkpoints" / "latest.pt")
    gan = Trainer.from_options(model=KillableWGAN(), data=FakeData(), run=wrong, progress=False,
                               monitor="wasserstein")
    with pytest.raises(ckpt.CheckpointError, match="does not fit KillableWGAN"):
        gan.fit()


@pytest.mark.parametrize(("params", "message"), [
    ({"optimizers": {"encoder": {}}}, r"unknown group\(s\) \['encoder'\]; KillableWGAN declares \['critic', "),
    ({"optimizers": {"critic": {"optimiser": ADAM}}}, "optimiser"),
    ({"loss_weights": {"critic": 2.0}}, "loss_weights does not apply"),
])
def test_bad_group_configuration_is_refused(tmp_path: Path, params: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        _gan_trainer(tmp_path, **params)


def test_groups_must_partition_the_trainable_parameters(tmp_path: Path) -> None:
    class Orphan(WGANGP):
        def optimizer_groups(self):  # the generator is left out: it would silently never train
            return {"critic": list(self.critic.parameters())}

    with pytest.raises(ConfigError, match=r"trainable parameters in no group .*generator\."):
        Trainer.from_options(model=Orphan(image_size=8, latent_dim=4, generator_channels=(4, 4),
                                          critic_channels=(4, 4)), data=FakeData(), run=make_run(tmp_path))
    with pytest.raises(ConfigError, match="declares no optimizer_groups"):
        Trainer.from_options(model=TinyAE(), data=FakeData(), run=make_run(tmp_path), progress=False,
                             optimizers={"critic": {}})


def test_bf16_autocast_gan_steps_stay_finite(tmp_path: Path) -> None:
    trainer = _gan_trainer(tmp_path, amp="bf16", max_steps=4)
    trainer.fit()
    assert trainer.step == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_torchrun_two_processes_match_one_process_with_two_groups(tmp_path: Path) -> None:
    env_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in env_vars}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.core._group_fixtures", "--mode", "ddp", "--run-dir", str(tmp_path / "ddp"),
           "--out", str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    torch.manual_seed(0)
    model, log = TwoPartAE(), RecordingLogger()
    Trainer.from_options(model=model, data=FakeData(n_train=16, batch_size=8, shuffle=False),
                         run=make_run(tmp_path / "single", logger=log), **ddp_params()).fit()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["train_logs"] == pytest.approx([values["loss"] for _, values in log.train], rel=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    # the two sub-steps really ran with their own learning rates: the weights moved away from the start
    torch.manual_seed(0)
    assert not torch.equal(TwoPartAE().decoder.weight, model.decoder.weight)


def test_plateau_schedulers_step_only_with_the_monitored_value(tmp_path: Path) -> None:
    plateau = {"module_name": "torch.optim.lr_scheduler", "class_name": "ReduceLROnPlateau",
               "params": {"patience": 0, "factor": 0.5}}
    trainer = _gan_trainer(tmp_path, lr_scheduler=plateau, optimizers={"generator": {"lr_scheduler": None}})
    groups = trainer.groups
    assert groups.schedulers["generator"] is None
    groups.step_epoch()  # never steps a plateau scheduler (it would need a value)
    groups.step_plateau(1.0)
    groups.step_plateau(2.0)  # worse: patience 0 halves the critic's lr
    assert groups.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(0.005)
    assert groups.optimizers["generator"].param_groups[0]["lr"] == pytest.approx(0.01)


def test_fp16_uses_one_gradient_scaler_per_group(tmp_path: Path) -> None:
    trainer = _gan_trainer(tmp_path, amp="fp16", max_steps=2)
    trainer.fit()
    assert all(scaler.is_enabled() for scaler in trainer.groups.scalers.values())
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state["scalers"]) == {"critic", "generator"} and all(s is not None for s in state["scalers"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_torchrun_gan_replicas_stay_identical(tmp_path: Path) -> None:
    # two ranks start from different weights and draw different z / alpha / dropout masks: the initial broadcast,
    # the per-batch buffer broadcast (BatchNorm statistics, as DDP's broadcast_buffers) and the per-group gradient
    # averaging keep every parameter identical on both ranks after 8 batches. Buffers are synchronised at the start
    # of each batch, so after the last one they differ, as under DDP; rank 0 writes the checkpoints.
    env_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in env_vars}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.core._group_fixtures", "--mode", "ddp-gan", "--run-dir", str(tmp_path / "ddp"),
           "--out", str(tmp_path / "gan.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank0, rank1 = (torch.load(tmp_path / f"gan_rank{r}.pt", weights_only=True) for r in (0, 1))
    parameters = [name for name, _ in KillableWGAN().named_parameters()]
    for key in parameters:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
    torch.manual_seed(0)
    assert not torch.equal(KillableWGAN().critic.head.weight, rank0["critic.head.weight"])  # it did train
