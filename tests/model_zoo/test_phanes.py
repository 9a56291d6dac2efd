"""PHANES: four optimizer groups, the fixed generator adversarial term and E-step, per-image maps, masks, learning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.Trainer import Trainer
from data.batch import Batch
from dl_utils import checkpoint as ckpt
from dl_utils.run import file_sha256
from model_zoo.phanes import PHANES, ellipse_masks, residual_masks
from model_zoo.soft_intro import RA
from optim.losses.perceptual import PerceptualSetting
from tests.core._trainer_fixtures import make_run

RANDOM_LPIPS = PerceptualSetting(net="squeeze", backend="random")
TINY: dict[str, Any] = {"image_size": 32, "channels": (8, 16), "zdim": 8, "beta_neg": 8.0,
                        "inpaint_channels": (8, 16, 32), "aot_blocks": 1, "aot_rates": (1, 2),
                        "disc_channels": (8, 16, 32, 64), "n_ellipses": 5, "disc_blur_kernel": 35,
                        "disc_blur_sigma": 5.0, "perceptual": RANDOM_LPIPS, "vgg_backend": "random"}


def _grads(model: PHANES, loss: torch.Tensor, part: str) -> list[torch.Tensor]:
    params = list(getattr(model, part).parameters())
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params, strict=True)]


def test_generator_adversarial_term_reaches_the_inpainter() -> None:
    torch.manual_seed(0)
    with_adv = PHANES(**TINY, use_gen_adv=True)
    without = PHANES(**TINY, use_gen_adv=False)
    without.load_state_dict(with_adv.state_dict())
    x = torch.rand(2, 1, 32, 32)
    m_syn = ellipse_masks(2, 32, 5, device=x.device, generator=torch.Generator().manual_seed(0))
    g_adv = _grads(with_adv, with_adv._inpainter_losses(x, m_syn, m_syn)[0], "inpainter")
    g_plain = _grads(without, without._inpainter_losses(x, m_syn, m_syn)[0], "inpainter")
    assert any(not torch.allclose(a, b) for a, b in zip(g_adv, g_plain, strict=True))


def test_the_encoder_step_detaches_the_re_reconstructions_only_in_the_study_recipe() -> None:
    torch.manual_seed(0)
    study, through = PHANES(**TINY), PHANES(**TINY, e_step_detach=False)
    through.load_state_dict(study.state_dict())
    x, eps = torch.rand(2, 1, 32, 32), torch.randn(2, 8)
    grads = []
    for model in (study, through):
        torch.manual_seed(1)  # the same z draws in both
        grads.append(_grads(model, model._encoder_loss(x, eps)[0], "encoder"))
    assert any(not torch.allclose(a, b) for a, b in zip(*grads, strict=True))


def test_the_study_recipe_is_the_default_and_the_label_names_every_departure() -> None:
    label = PHANES(**TINY).inference_label()
    assert label.count("(the study's)") == 4 and "not the study's" not in label
    assert "soft test mask" in label and "detaches the re-reconstructions" in label
    assert "no generator adversarial term" in label and "trained jointly" in label
    variant = PHANES(**TINY, mask_filter="binary", e_step_detach=False, use_gen_adv=True).inference_label()
    assert variant.count("(not the study's)") == 3 and "binary test mask" in variant
    assert "generator adversarial term on (weight 0.01)" in variant
    with pytest.raises(ValueError, match="mask_filter='hard' is not one of 'soft', 'binary'"):
        PHANES(**TINY, mask_filter="hard")


def test_soft_and_binary_test_masks() -> None:
    a = torch.full((1, 1, 32, 32), 0.2)
    a[..., 10:15, 10:15] = 1.0  # 25 px, about 2.4 %: above the 95th percentile
    binary = PHANES(**TINY, mask_filter="binary").test_mask(a)
    soft = PHANES(**TINY).test_mask(a)
    assert binary[..., 10:15, 10:15].all() and binary.sum() < 100 and binary[..., 25:, 25:].sum() == 0
    assert soft.all()  # the soft filter keeps the moderate residual everywhere (0.2 blurred > 0.1)
    a[..., 10:15, 10:15] = 0.0
    a[..., 20, 20] = 1.0  # one hot pixel: the 95th percentile is 0.2, only the pixel lies above it
    assert PHANES(**TINY, mask_filter="binary").test_mask(a)[..., 20, 20] == 1
    assert PHANES(**TINY, mask_filter="binary").test_mask(a)[..., 5, 5] == 0


def test_one_trainer_step_updates_all_four_networks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PHANES(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer.from_options(model=model, data=_OneBatch(), run=make_run(tmp_path), max_steps=1,
                                   progress=False)
    trainer.fit()
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder", "inpainter", "discriminator"}
    assert set(trainer.groups.optimizers) == {"encoder", "decoder", "inpainter", "discriminator"}
    logged = trainer.run.logger.train[-1][1]
    assert {"inpaint_l1", "style", "perceptual", "discriminator_loss", "mask_fraction"} <= set(logged)
    assert "generator_adv" not in logged  # the study's recipe: no generator adversarial term
    assert not any("vgg" in k or "lpips" in k for k in model.state_dict())
    assert model._vgg is not None and "_vgg" not in dict(model.named_modules())


class _OneBatch:
    def train_dataloader(self, **_: object) -> list[Batch]:
        return [Batch(image=torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)))]

    def val_dataloader(self) -> None:
        return None


def _ra_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    ra = RA(**{k: TINY[k] for k in ("image_size", "channels", "zdim", "beta_neg", "perceptual")}).train()
    with torch.no_grad():
        ra.decoder(ra.encode(torch.rand(4, 1, 32, 32))[0])  # non-default BatchNorm statistics
    return ckpt.save_checkpoint(path, {"model": ra.state_dict(), "ema": None})


def test_phanes_on_a_frozen_ra_trains_only_the_inpainter_and_the_discriminator(tmp_path: Path) -> None:
    path = _ra_checkpoint(tmp_path / "ra.pt")
    model = PHANES(**TINY, coarse_checkpoint=str(path))
    for key, value in torch.load(path, weights_only=True)["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    model.train()
    assert model.inpainter.training and not model.encoder.training and not model.decoder.training
    assert model.provenance()["stage1_ra"] == {"path": str(path.resolve()), "sha256": file_sha256(path),
                                               "weights": "model"}
    assert f"coarse RA frozen from {path.resolve()}" in model.inference_label()
    before = ckpt.clone_state_dict(model)
    trainer = Trainer.from_options(model=model, data=_OneBatch(), run=make_run(tmp_path / "run"),
                                   max_steps=2, progress=False)
    assert set(trainer.groups.optimizers) == {"inpainter", "discriminator"}
    trainer.fit()
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith(("encoder.", "decoder.")):
            assert torch.equal(after[key], value), f"frozen {key} changed (weights or BatchNorm statistics)"
    assert {k.split(".")[0] for k, v in before.items() if not torch.equal(after[k], v)} == {"inpainter",
                                                                                              "discriminator"}
    assert "encoder_loss" not in trainer.run.logger.train[-1][1]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["provenance"]["stage1_ra"]["sha256"] == file_sha256(path)


def test_a_coarse_checkpoint_that_is_not_an_ra_is_refused(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path / "phanes.pt", {"model": PHANES(**TINY).state_dict(), "ema": None})
    with pytest.raises(ckpt.CheckpointError, match=r"RA checkpoint .*phanes.pt does not fit: unexpected keys"):
        PHANES(**TINY, coarse_checkpoint=str(path))


def test_maps_are_per_image() -> None:
    torch.manual_seed(0)
    model = PHANES(**TINY).eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    full = model.get_anomaly(x)
    single = model.get_anomaly(x[2:3])
    torch.testing.assert_close(single.anomaly_map[0], full.anomaly_map[2])
    torch.testing.assert_close(single.extras["mask"][0], full.extras["mask"][2])


def test_the_clahe_clip_limit_reaches_the_test_residual_and_the_training_masks() -> None:
    torch.manual_seed(0)
    default = PHANES(**TINY).eval()
    changed = PHANES(**TINY, clahe_clip_limit=0.5).eval()
    changed.load_state_dict(default.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(default.get_anomaly(x).anomaly_map, changed.get_anomaly(x).anomaly_map)
    x_r = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.random.fork_rng():
        m_default = default._training_masks(x, x_r)[1]
    m_changed = changed._training_masks(x, x_r)[1]
    assert not torch.equal(m_default, m_changed)


def test_residual_masks_keep_only_large_components() -> None:
    residual = torch.zeros(1, 1, 32, 32)
    residual[0, 0, 2:4, 2:4] = 1.0  # 4 px: dropped
    residual[0, 0, 10:15, 10:15] = 1.0  # 25 px: kept (and slightly smoothed)
    mask = residual_masks(residual)
    assert mask[0, 0, 2:4, 2:4].sum() == 0
    assert mask[0, 0, 11:14, 11:14].all()
    assert mask.sum() <= 25


def test_ellipse_masks_are_drawn_from_the_generator_in_the_middle_half() -> None:
    a = ellipse_masks(4, 64, 5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    b = ellipse_masks(4, 64, 5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a.flatten(1).sum(1) >= 5).all()
    assert a[..., :8, :].sum() == 0 and a[..., 56:, :].sum() == 0  # centres in [16, 48), semi-axes <= ~8 px


def test_without_vgg19_weights_the_terms_are_off_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    model = PHANES(**{**TINY, "vgg_backend": "auto"})
    x = torch.rand(2, 1, 32, 32)
    _, _, terms = model._inpainter_losses(x, torch.zeros_like(x), torch.zeros_like(x))
    assert terms["style"] == 0 and terms["perceptual"] == 0
    assert "unavailable" in model.provenance()["vgg19"]


def test_dilations_the_inpainters_middle_cannot_pad_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"aot_rates=\[1, 2, 4, 8\].*\[1, 7\].*8x8 middle \(image_size 32"):
        PHANES(**{**TINY, "aot_rates": (1, 2, 4, 8)})
    PHANES(**{**TINY, "aot_rates": (1, 7)})  # the largest dilation the 8x8 middle can pad
