"""f-AnoGAN: WGAN-GP stage, frozen stage-1 loading for the encoder stage, maps and scores, a short learning run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from core.evaluation.context import EvalContext
from core.Trainer import Trainer
from data.batch import Batch
from dl_utils import checkpoint as ckpt
from dl_utils.run import file_sha256
from model_zoo.base import AnomalyModel, TrainableModel
from model_zoo.fanogan import WGANGP, FAnoGAN
from model_zoo.registry import stage1_problem
from tests.core._trainer_fixtures import FakeData, make_run
from tests.model_zoo._learning import embedded_data, hypointense_separation, train

ARCH = {"image_size": 16, "latent_dim": 8, "generator_channels": (8, 8, 4), "critic_channels": (4, 8)}


def _wgan_checkpoint(path: Path, **arch: object) -> Path:
    torch.manual_seed(0)
    wgan = WGANGP(**{**ARCH, **arch})
    wgan.train()  # put some non-default statistics into the BN buffers
    for _ in range(3):
        wgan.generator(torch.randn(4, ARCH["latent_dim"]))
    return ckpt.save_checkpoint(path, {"model": wgan.state_dict(), "ema": None})


def test_stage2_loads_stage1_strictly_frozen_and_in_eval(tmp_path: Path) -> None:
    path = _wgan_checkpoint(tmp_path / "wgan.pt")
    model = FAnoGAN(**ARCH, wgan_checkpoint=str(path))
    stage1 = torch.load(path, weights_only=True)["model"]
    for key, value in stage1.items():
        assert torch.equal(model.state_dict()[key], value), key
    model.train()
    assert model.encoder.training and not model.generator.training and not model.critic.training
    assert not any(p.requires_grad for p in [*model.generator.parameters(), *model.critic.parameters()])
    assert model.provenance() == {"stage1_wgan": {"path": str(path.resolve()), "sha256": file_sha256(path),
                                                  "weights": "model"}}


def test_a_wgan_step_updates_batchnorm_statistics_from_the_real_batch_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = {**ARCH, "image_size": 8, "generator_channels": (8, 4), "critic_channels": (4, 8)}
    wgan = WGANGP(**small)
    for module in wgan.modules():  # no dropout, so the real pass below sees what the trainer's did
        if isinstance(module, torch.nn.Dropout2d):
            module.p = 0.0
    real_only = copy.deepcopy(wgan).train()
    data = FakeData(n_train=4, batch_size=4, shuffle=False, with_val=False)
    with torch.no_grad():
        real_only.critic(real_only.to_gan(next(iter(data.train_dataloader())).image))
    Trainer.from_options(model=wgan, data=data, run=make_run(tmp_path), max_steps=1,
            progress=False).fit()  # batch 0: a critic step (real, fakes, interpolates) and a generator step
    state, expected = wgan.state_dict(), real_only.state_dict()
    critic_stats = [k for k in state if k.startswith("critic.") and ("running_" in k or "num_batches" in k)]
    assert critic_stats
    for key in critic_stats:  # the real batch alone
        torch.testing.assert_close(state[key], expected[key], msg=key)
    counters = [k for k in state if k.startswith("generator.") and k.endswith("num_batches_tracked")]
    assert counters and all(state[k].item() == 1 for k in counters)  # one pass of z (the generator step repeats it)


def test_a_stage2_training_step_leaves_generator_and_critic_bit_identical(tmp_path: Path) -> None:
    path = _wgan_checkpoint(tmp_path / "wgan.pt", image_size=8, generator_channels=(8, 4), critic_channels=(4, 8))
    model = FAnoGAN(**{**ARCH, "image_size": 8, "generator_channels": (8, 4), "critic_channels": (4, 8)},
                    wgan_checkpoint=str(path))
    before = ckpt.clone_state_dict(model)
    trainer_run = make_run(tmp_path / "run")
    trainer = Trainer.from_options(model=model, data=FakeData(with_val=False), run=trainer_run,
                                   max_steps=2, progress=False)
    in_optimizer = {id(p) for group in trainer.groups.optimizers["model"].param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.encoder.parameters()}  # G and D are in no optimizer
    trainer.fit()
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(("generator.", "critic.")):
            assert torch.equal(after[key], value), f"frozen {key} changed (BN statistics or weights)"
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["provenance"]["stage1_wgan"]["sha256"] == file_sha256(path)


def test_stage1_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = _wgan_checkpoint(tmp_path / "wgan.pt", critic_channels=(4, 4))
    with pytest.raises(ckpt.CheckpointError, match="critic.* of WGAN-GP checkpoint .*wgan.pt"):
        FAnoGAN(**ARCH, wgan_checkpoint=str(path))
    with pytest.raises(RuntimeError, match="wgan_checkpoint"):
        FAnoGAN(**ARCH).training_losses(Batch(image=torch.rand(2, 1, 16, 16)))


def test_maps_are_per_image_and_scores_follow_the_mode(tmp_path: Path) -> None:
    path = _wgan_checkpoint(tmp_path / "wgan.pt")
    torch.manual_seed(1)
    model = FAnoGAN(**ARCH, wgan_checkpoint=str(path)).eval()
    x = torch.rand(4, 1, 16, 16)
    full = model.get_anomaly(x)
    single = model.get_anomaly(x[2:3])
    torch.testing.assert_close(single.anomaly_map[0], full.anomaly_map[2])
    torch.manual_seed(1)
    izif = FAnoGAN(**ARCH, wgan_checkpoint=str(path), score_mode="izif", kappa=0.0).eval().get_anomaly(x)
    # tanh GAN range: (2 x_hat - 1) - (2 x - 1) = 2 (x_hat - x), so the izi_f score with kappa 0 is 4 * MSE
    expected = 4 * (full.reconstruction - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(izif.anomaly_score, expected)
    assert not torch.allclose(izif.anomaly_score, full.anomaly_score)


def test_legacy_bn_eps_and_wgan_has_no_anomaly_map() -> None:
    legacy = WGANGP(**ARCH, legacy_bn_eps=True)
    fixed = WGANGP(**ARCH)
    eps = {m.eps for m in legacy.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert 0.8 in eps and {m.eps for m in fixed.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}
    # stage 1 trains but does not score: not an AnomalyModel, so the evaluation and prediction refuse it by name
    assert isinstance(fixed, TrainableModel) and not isinstance(fixed, AnomalyModel)
    assert not hasattr(fixed, "get_anomaly") and isinstance(FAnoGAN(**ARCH), AnomalyModel)
    assert "FAnoGAN" in stage1_problem(WGANGP) and stage1_problem(FAnoGAN) is None
    with pytest.raises(TypeError, match="WGANGP is a stage-1 network: it trains but does not score anomalies"):
        EvalContext(model=fixed, data=FakeData(), device="cpu")


@pytest.mark.slow
def test_short_fanogan_training_separates_hypointense_lesions(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    data = embedded_data(32)
    arch = {"image_size": 32, "latent_dim": 32, "generator_channels": (32, 32, 16), "critic_channels": (16, 32, 64)}
    adam = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 2e-4, "betas": [0.5, 0.999]}}
    wgan = train(WGANGP(**arch, n_critic=5), data, tmp_path / "wgan", steps=400, optimizer=adam,
                 monitor="wasserstein")
    assert all(torch.isfinite(p).all() for p in wgan.model.parameters())
    stage2 = FAnoGAN(**arch, wgan_checkpoint=str(tmp_path / "wgan" / "checkpoints" / "latest.pt"))
    before = _healthy_val_mse(stage2, data)
    adam_e = {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 1e-3, "betas": [0.5, 0.999]}}
    trainer = train(stage2, data, tmp_path / "encoder", steps=200, optimizer=adam_e)
    first, last = trainer.run.logger.train[0][1]["recon"], trainer.run.logger.train[-1][1]["recon"]
    assert last < first, (first, last)
    assert _healthy_val_mse(stage2, data) < 0.8 * before  # the encoder found the GAN's healthy reconstructions
    # Above chance (measured 0.80). Not above trivial baselines on this data: |x - mean training image| scores
    # 0.90 and the untrained pipeline (a near-constant G) 0.86 at 32x32, so this checks the wiring, not quality.
    hypointense_separation(stage2, data).check("f-AnoGAN", min_pixel=0.6)


@torch.no_grad()
def _healthy_val_mse(model: FAnoGAN, data: object) -> float:
    model.eval()
    values = [model.validation_losses(batch)["recon_mse"] for batch in data.eval_dataloader("val")]
    return float(torch.stack(values).mean())
