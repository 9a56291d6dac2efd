"""SI-VAE and RA: sub-step freezing, the embedding loss, CLAHE/blur against skimage/scipy, per-image maps, learning."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.exposure import equalize_adapthist

from core.optimizer_groups import StepContext
from core.Trainer import Trainer
from data.batch import Batch
from model_zoo import soft_intro
from model_zoo.phanes import PHANES
from model_zoo.saliency import clahe, gaussian_blur
from model_zoo.soft_intro import RA, SoftIntroVAE
from optim.losses.perceptual import PerceptualSetting
from tests.core._trainer_fixtures import make_run

TINY = {"image_size": 16, "channels": (4, 8), "zdim": 4, "beta_neg": 4.0}
RANDOM_LPIPS = PerceptualSetting(net="squeeze", backend="random")


class _Data:
    def __init__(self, size: int = 16) -> None:
        self.images = torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(0))

    def train_dataloader(self, **_: object) -> list[Batch]:
        return [Batch(image=self.images[:4]), Batch(image=self.images[4:])]

    def val_dataloader(self) -> None:
        return None


@pytest.mark.parametrize("warmup", [0, 1], ids=["introspective", "vae_warmup"])
def test_each_sub_step_updates_only_its_own_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    warmup: int) -> None:
    torch.manual_seed(0)
    model = SoftIntroVAE(**TINY, vae_warmup_steps=warmup)
    trainer = Trainer.from_options(model=model, data=_Data(), run=make_run(tmp_path), max_steps=1,
                                   progress=False)
    seen: list[tuple[str, bool, bool]] = []
    original = StepContext.backward_step

    def spy(ctx: StepContext, name: str, loss: torch.Tensor) -> None:  # gradients of this sub-step's loss alone
        loss.backward(retain_graph=True)
        seen.append((name, all(p.grad is None for p in model.decoder.parameters()),
                     all(p.grad is None for p in model.encoder.parameters())))
        original(ctx, name, loss)

    monkeypatch.setattr(StepContext, "backward_step", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    # the encoder loss reaches no decoder parameter, the decoder loss no encoder parameter
    assert seen == [("encoder", True, False), ("decoder", False, True)]
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder"}
    logged = trainer.run.logger.train[-1][1]
    assert {"encoder_loss", "decoder_loss", "rec", "kl", "exp_elbo_real", "exp_elbo_fake"} <= set(logged)


def test_vae_warmup_trains_the_plain_elbo_then_turns_introspective(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RA(**TINY, perceptual=None, vae_warmup_steps=2)
    calls: list[int] = []
    original = model._encoder_loss
    model._encoder_loss = lambda *a, **k: (calls.append(1), original(*a, **k))[1]  # the introspective loss
    trainer = Trainer.from_options(model=model, data=_Data(), run=make_run(tmp_path), max_steps=4,
                                   log_interval=1, progress=False)
    trainer.fit()
    logged = [values for _, values in trainer.run.logger.train]
    assert len(calls) == 2  # batches 3 and 4 only
    assert all(v["exp_elbo_real"] == 0 == v["exp_elbo_fake"] for v in logged[:2])
    assert all(v["exp_elbo_real"] > 0 and v["exp_elbo_fake"] > 0 for v in logged[2:])
    assert all(v["embedding"] > 0 for v in logged)  # RA's extra encoder term is trained in the warm-up too
    s = model.scale  # the warm-up encoder loss is the ELBO (+ RA's embedding term), nothing else
    for v in logged[:2]:
        assert v["encoder_loss"] == pytest.approx(s * (model.beta_rec * v["rec"] + model.beta_kl * v["kl"])
                                                  + v["embedding"], rel=1e-5)
    with pytest.raises(ValueError, match="vae_warmup_steps=-1 must be an integer >= 0"):
        SoftIntroVAE(**TINY, vae_warmup_steps=-1)


def _running_stats(model: SoftIntroVAE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _zero_width_posterior(model: SoftIntroVAE) -> None:
    """logvar = -200: sigma = e^-100 vanishes next to mu in float32, so the sampled z of a real image is its mu."""
    with torch.no_grad():
        model.encoder.head.weight[model.zdim:] = 0
        model.encoder.head.bias[model.zdim:] = -200


PHANES_TINY = {"image_size": 16, "channels": (4, 8), "zdim": 4, "beta_neg": 4.0, "inpaint_channels": (4, 8, 8),
               "aot_blocks": 1, "aot_rates": (1, 2), "disc_channels": (4, 8), "n_ellipses": 2,
               "disc_blur_kernel": 5, "disc_blur_sigma": 1.0, "perceptual": None, "style_weight": 0.0,
               "perceptual_weight": 0.0}
FAMILY: dict[str, Callable[..., SoftIntroVAE]] = {
    "si_vae": lambda **kw: SoftIntroVAE(**TINY, **kw), "ra": lambda **kw: RA(**TINY, perceptual=None, **kw),
    "phanes": lambda **kw: PHANES(**PHANES_TINY, **kw)}


@pytest.mark.parametrize("warmup", [0, 1], ids=["introspective", "vae_warmup"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_one_training_step_updates_batchnorm_statistics_from_the_real_passes_only(tmp_path: Path, name: str,
                                                                                 warmup: int) -> None:
    torch.manual_seed(0)
    model = FAMILY[name](vae_warmup_steps=warmup)
    _zero_width_posterior(model)
    real_only = copy.deepcopy(model).train()
    before = _running_stats(model)
    x = _Data().images[:4]  # the first training batch
    with torch.no_grad():  # the real passes alone: E(x) and D(z) with z = mu(x)
        real_only.decoder(real_only.encode(x)[0])
    Trainer.from_options(model=model, data=_Data(), run=make_run(tmp_path), max_steps=1,
                         progress=False).fit()
    after, expected = _running_stats(model), _running_stats(real_only)
    assert any(not torch.equal(expected[k], before[k]) for k in expected)  # the real passes did move them
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_keeping_the_statistics_changes_no_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps with and without the statistics guard: the same weights (train-mode BatchNorm normalises with the
    batch's own statistics either way), only the running statistics differ."""
    results = []
    for guarded in (True, False):
        if not guarded:
            monkeypatch.setattr(soft_intro, "keep_running_stats", lambda *_: contextlib.nullcontext())
        torch.manual_seed(0)
        model = RA(**TINY, perceptual=None)
        Trainer.from_options(model=model, data=_Data(), run=make_run(tmp_path / str(guarded)),
                             max_steps=2, progress=False).fit()
        results.append(model.state_dict())
    guarded_state, unguarded_state = results
    weights = [k for k in guarded_state if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(guarded_state[k], unguarded_state[k]) for k in weights)
    assert not all(torch.equal(guarded_state[k], unguarded_state[k]) for k in guarded_state if "running_" in k)


def test_ra_embedding_loss_hand_computed() -> None:
    model = RA(**TINY, perceptual=None, embedding_weight=0.5)
    f = [torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)]
    assert model._extra_encoder_terms(f, f)["embedding"].item() == pytest.approx(0.0, abs=1e-6)
    # F_r = 2F: cosine 1, so each level contributes 0.5 * mean(F^2)
    doubled = [2 * t for t in f]
    expected = 0.5 * sum(0.5 * t.pow(2).mean().item() for t in f)
    assert model._extra_encoder_terms(f, doubled)["embedding"].item() == pytest.approx(expected, rel=1e-5)


def test_clahe_follows_skimage_per_image() -> None:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = (0.3 + 0.2 * torch.sin(6 * xx) * torch.cos(4 * yy)).clamp(0, 1)
    noisy = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) ** 2
    batch = torch.stack([smooth, noisy])[:, None]
    ours = clahe(batch)
    for i, image in enumerate((smooth, noisy)):
        reference = equalize_adapthist(image.numpy().astype(np.float64))
        assert np.abs(ours[i, 0].numpy() - reference).mean() < 0.05
        assert np.corrcoef(ours[i, 0].numpy().ravel(), reference.ravel())[0, 1] > 0.98
        torch.testing.assert_close(clahe(batch[i:i + 1])[0], ours[i])  # no statistic over the batch


def test_clahe_at_a_working_size_does_not_amplify_the_noise_of_small_tiles() -> None:
    # at 32x32 a tile holds 16 px and the clip limit is one pixel: every pixel becomes about its rank among 16, so the
    # Rician-like noise of x against a smooth reconstruction dominates |C(x_hat) - C(x)|; equalised at 128x128
    # (256-px tiles, as the study's slices) the lesion stands out (measured contrast ratio 4.2 against 14.5)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    inside = ((xx ** 2 + yy ** 2) < 0.9).float()
    smooth = (0.6 + 0.2 * torch.cos(3 * xx) * torch.sin(2 * yy)) * inside
    noise = 0.02 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * inside
    x = (smooth + noise).clamp(0, 1)
    x[12:16, 12:16] = 0.1
    lesion = torch.zeros(32, 32, dtype=torch.bool)
    lesion[12:16, 12:16] = True
    healthy = (inside > 0) & ~lesion

    def contrast(size: int | None) -> float:
        residual = (clahe(smooth[None, None], size=size) - clahe(x[None, None], size=size)).abs()[0, 0]
        return (residual[lesion].mean() / residual[healthy].mean()).item()

    assert contrast(128) > 2 * contrast(None), (contrast(None), contrast(128))
    batch = torch.stack([smooth, x])[:, None]
    at_128 = clahe(batch, size=128)
    assert at_128.shape == batch.shape and at_128.min() >= 0 and at_128.max() <= 1
    torch.testing.assert_close(clahe(batch, size=32), clahe(batch))  # the input's own size: unchanged
    torch.testing.assert_close(clahe(batch[1:], size=128)[0], at_128[1])  # per image


def test_ra_equalises_at_clahe_size_and_says_so() -> None:
    torch.manual_seed(0)
    base = {**TINY, "image_size": 32}
    default = RA(**base, perceptual=None).eval()
    resized = RA(**base, perceptual=None, clahe_size=128).eval()
    resized.load_state_dict(default.state_dict())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(resized.clahe(x), clahe(x, size=128))
    assert not torch.equal(default.get_anomaly(x).anomaly_map, resized.get_anomaly(x).anomaly_map)
    assert "at 128x128" in resized.provenance()["clahe"] and "on the input" in default.provenance()["clahe"]
    for bad in (12, 0, True, 64.0):
        with pytest.raises(ValueError, match="clahe_size"):
            RA(**base, perceptual=None, clahe_size=bad)


def test_gaussian_blur_matches_scipy_mirror_mode() -> None:
    x = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(x, 2.0)
    for i in range(2):
        reference = gaussian_filter(x[i, 0].numpy(), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i, 0].numpy(), reference, atol=1e-10)


def test_ra_maps_are_per_image_and_vanish_for_a_perfect_reconstruction() -> None:
    torch.manual_seed(0)
    model = RA(**{**TINY, "image_size": 32}, perceptual=RANDOM_LPIPS).eval()  # SqueezeNet needs >= 32 px
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    full = model.get_anomaly(x).anomaly_map
    torch.testing.assert_close(model.get_anomaly(x[1:2]).anomaly_map[0], full[1])
    assert model.residual_map(x, x).abs().max() == 0
    assert "saliency_perceptual" in model.provenance() and "RANDOM" in model.provenance()["saliency_perceptual"]
    assert not any("perceptual" in key or "lpips" in key for key in model.state_dict())


def test_sampled_test_maps_follow_the_generator() -> None:
    torch.manual_seed(0)
    model = SoftIntroVAE(**TINY, test_samples=3).eval()
    x = torch.rand(2, 1, 16, 16)
    first = model.get_anomaly(x, generator=torch.Generator().manual_seed(5)).anomaly_map
    second = model.get_anomaly(x, generator=torch.Generator().manual_seed(5)).anomaly_map
    other = model.get_anomaly(x, generator=torch.Generator().manual_seed(6)).anomaly_map
    assert torch.equal(first, second) and not torch.equal(first, other)
    deterministic = SoftIntroVAE(**TINY).eval()
    deterministic.load_state_dict(model.state_dict())
    assert torch.equal(deterministic.get_anomaly(x).reconstruction, deterministic.decoder(deterministic.encode(x)[0]))
