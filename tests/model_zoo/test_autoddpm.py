"""AutoDDPM: empty and partial masks, RePaint against hand-computed references, network-call counts, both map
formulas, the calibrated mask threshold, per-image masks and smoothing, perceptual injection."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.Configurator import ConfigError, build
from dl_utils.reinit import randomize_zero_layers
from model_zoo.autoddpm import AutoDDPM, gaussian_blur, per_image_quantile
from model_zoo.base import AnomalyModel, MaskThresholdModel
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.procedures import Schedule, repaint
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting, UNetSetting

TINY_NET = UNetSetting(channels=(8, 16, 16), num_head_channels=8, norm_num_groups=8)


pytestmark = pytest.mark.usefixtures("one_thread_module")


class StandInPerceptual(nn.Module):
    """Cheap deterministic stand-in for PerceptualDistance: a smoothed absolute difference, [B,1,H,W]."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def spatial(self, x: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return gaussian_blur((x - y).abs(), 1.0) * 4.0 + 0.05


def tiny_autoddpm(**overrides: Any) -> AutoDDPM:
    """L_r = 4 (full chain), L_i = 3, U = 2; the UNet's zero-initialised output layers re-initialised (eps != 0)."""
    torch.manual_seed(0)
    params = {"network": TINY_NET, "inference": InferenceSetting(noise_level=4),
              "repaint": RepaintSetting(noise_level=3, resample_steps=2), **overrides}
    model = AutoDDPM(**params).eval()
    assert randomize_zero_layers(model) > 0
    model.set_perceptual(StandInPerceptual())
    return model


@pytest.fixture(scope="module")
def schedule_1000() -> Schedule:
    """The reference linear schedule (T = 1000, 1e-4 -> 2e-2) in float64."""
    return Schedule.from_betas(torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))


def smooth_images(n: int = 2, size: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(n, 1, size, size, generator=g), 1.5).clamp(0, 1)


def test_empty_mask_returns_the_input() -> None:
    model = tiny_autoddpm(tau=1e9)
    x = smooth_images()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert out.extras["mask"].sum() == 0
    assert torch.equal(out.extras["x_inp"], x) and torch.equal(out.extras["stitched"], x)
    assert out.anomaly_map.abs().max() == 0 and out.anomaly_score.abs().max() == 0


class ZeroNoise:
    """Noise source that draws nothing: every sample is 0 (RePaint becomes a deterministic recursion)."""

    def sample(self, like: Tensor, timesteps: Any, *, generator: Any = None) -> Tensor:
        return torch.zeros_like(like)


def test_repaint_hand_computed_with_zero_noise_and_zero_eps(schedule_1000: Schedule) -> None:
    # eps = 0 and no noise: x0_hat = z_t / sqrt(abar_t) and the posterior mean maps sqrt(abar_t) v to
    # sqrt(abar_{t-1}) v (Ho et al. eq. 7: [abar_{t-1} beta_t + abar_t (1 - abar_{t-1})] / (1 - abar_t)
    # = abar_{t-1}); the jump back sqrt(1 - beta_t) maps sqrt(abar_{t-1}) v to sqrt(abar_t) v. So for t = 2..1, U = 2,
    # the network sees (masked pixel, known pixel) = sqrt(abar_t) (s, k) at every call but the first (where the
    # known pixel still holds the noised start), and the result is (sqrt(abar_0) s, k): the loop ends at step 0.
    ab = schedule_1000.abar
    s, s_known, k = 0.8, 0.6, 0.3
    start = torch.tensor([[[[s, s_known]]]], dtype=torch.float64)
    known = torch.tensor([[[[0.1, k]]]], dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    seen: list[tuple[int, list[float]]] = []

    def eps(z: Tensor, t: Tensor) -> Tensor:
        seen.append((int(t[0]), z.flatten().tolist()))
        return torch.zeros_like(z)

    out = repaint(eps, known, start, mask, noise_level=2, resample_steps=2, schedule=schedule_1000,
                  noise=ZeroNoise(), clip=None)  # type: ignore[arg-type]
    expected_calls = [(2, [s, s_known]), (2, [s, k]), (1, [s, k]), (1, [s, k])]
    assert [t for t, _ in seen] == [t for t, _ in expected_calls]  # L_i * U calls, t = L_i..1
    for (t, values), (_, (a, b)) in zip(seen, expected_calls, strict=True):
        assert values == pytest.approx([math.sqrt(ab(t)) * a, math.sqrt(ab(t)) * b], rel=1e-12, abs=0)
    assert out.flatten().tolist() == pytest.approx([math.sqrt(ab(0)) * s, k], rel=1e-12, abs=0)
    assert math.sqrt(ab(0)) * s != pytest.approx(s, rel=1e-6)  # ending at step -1 instead would be detected


def test_repaint_noise_levels_match_the_closed_form_recursion(schedule_1000: Schedule) -> None:
    # Gaussian noise, eps = 0, full mask, 96x96 independent pixels: the chain is linear, so the mean and variance of
    # every pixel follow a scalar recursion derived from the algorithm (noise to L; per call: x -> x / sqrt(alpha_t)
    # plus the posterior variance (1 - abar_{t-1}) / (1 - abar_t) beta_t; per jump: alpha_t x + beta_t noise).
    level, repeats, s = 6, 3, 0.5
    ab = schedule_1000.abar
    mean, var = math.sqrt(ab(level)) * s, 1.0 - ab(level)
    for t in range(level, 0, -1):
        alpha = ab(t) / ab(t - 1)
        for u in range(repeats):
            mean, var = mean / math.sqrt(alpha), var / alpha + (1 - ab(t - 1)) / (1 - ab(t)) * (1 - alpha)
            if u < repeats - 1:
                mean, var = mean * math.sqrt(alpha), var * alpha + (1 - alpha)
    start = torch.full((1, 1, 96, 96), s, dtype=torch.float64)
    out = repaint(lambda z, _t: torch.zeros_like(z), torch.zeros_like(start), start, torch.ones_like(start),
                  noise_level=level, resample_steps=repeats, schedule=schedule_1000, noise=DiffusionNoise(),
                  generator=torch.Generator().manual_seed(0), clip=None)
    n = out.numel()
    assert float(out.mean()) == pytest.approx(mean, abs=4 * math.sqrt(var / n))
    assert float(out.var()) == pytest.approx(var, rel=4 * math.sqrt(2 / n))  # 4 standard errors


@pytest.mark.parametrize("inference", [InferenceSetting(noise_level=4), InferenceSetting(sampler="strided",
                                       noise_level=4, steps=2), InferenceSetting(sampler="ddim", noise_level=3,
                                       steps=3)], ids=["ddpm", "strided", "ddim"])
def test_network_calls_equal_the_unet_forward_calls(inference: InferenceSetting) -> None:
    model = tiny_autoddpm(tau=-1.0)
    calls: list[int] = []
    model.unet.register_forward_pre_hook(lambda _m, _a, kw: calls.append(int(kw["timesteps"][0])), with_kwargs=True)
    model.get_anomaly(smooth_images(), generator=torch.Generator().manual_seed(0), inference=inference)
    assert len(calls) == model.network_calls(inference) == inference.network_calls + 3 * 2
    assert calls == inference.timesteps + [3, 3, 2, 2, 1, 1]  # then RePaint: t = L_i..1, U = 2 each


def test_partial_mask_keeps_the_input_outside_and_both_map_formulas() -> None:
    x = smooth_images()
    mask = torch.zeros_like(x)
    mask[..., 4:10, 5:12] = 1
    outs = {}
    for formula in ("study", "paper"):
        model = tiny_autoddpm(map_formula=formula)
        outs[formula] = out = model.get_anomaly(x, generator=torch.Generator().manual_seed(1), mask=mask)
        keep = mask == 0
        assert torch.equal(out.extras["x_inp"][keep], x[keep])
        assert not torch.allclose(out.extras["x_inp"][~keep], x[~keep])
        assert out.reconstruction is not None and torch.equal(out.reconstruction, out.extras["x_inp"].clamp(0, 1))
        torch.testing.assert_close(out.anomaly_score, out.anomaly_map.mean(dim=(1, 2, 3)))
    study, paper = outs["study"], outs["paper"]
    torch.testing.assert_close(study.extras["x_inp"], paper.extras["x_inp"])  # same draws, only the map differs
    x_rec, x_hat = study.extras["x_rec"], study.extras["x_inp"].clamp(0, 1)
    p = StandInPerceptual().spatial(x, x_rec)
    torch.testing.assert_close(study.anomaly_map, (x - x_rec).abs() * gaussian_blur(p, 2.0) * (x - x_hat).abs())
    torch.testing.assert_close(paper.anomaly_map, (x - x_hat).abs() * paper.extras["c"])
    assert study.anomaly_map[mask == 0].abs().max() == 0  # |x - x_inp| vanishes outside the mask in both
    assert not torch.allclose(study.anomaly_map, paper.anomaly_map)


def test_c_mask_statistic_and_extras() -> None:
    x = smooth_images()
    c0 = tiny_autoddpm(tau=-1.0).mask_statistic(x, generator=torch.Generator().manual_seed(0))
    tau = float(torch.quantile(c0.flatten(), 0.9))  # a fixed tau that masks some pixels of these images
    model = tiny_autoddpm(tau=tau)
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    x_rec = out.extras["x_rec"]
    r = (x_rec - x).abs()
    r = (r / per_image_quantile(r, 0.95)).clamp(max=1)
    c = (gaussian_blur((x - x_rec).abs(), 1.0) * 4.0 + 0.05) * r
    torch.testing.assert_close(out.extras["c"], c)
    expected_mask = torch.nn.functional.max_pool2d((c > tau).float(), 3, stride=1, padding=1)
    assert torch.equal(out.extras["mask"], expected_mask) and 0 < expected_mask.sum() < expected_mask.numel()
    torch.testing.assert_close(out.extras["stitched"], (1 - expected_mask) * x + expected_mask * x_rec)
    assert set(out.extras) == {"x_rec", "mask", "stitched", "x_inp", "c"}
    # the calibration statistic is c exactly as at test time (same generator state: the reconstruction draws first)
    assert torch.equal(model.mask_statistic(x, generator=torch.Generator().manual_seed(0)), out.extras["c"])
    assert "RePaint from L_i=3 with U=2, 6 network calls" in model.inference_label()


def test_calibrated_threshold_is_a_per_call_input_the_model_never_keeps() -> None:
    model = tiny_autoddpm(tau="calibrated")
    x = smooth_images()
    assert isinstance(model, MaskThresholdModel) and model.needs_mask_threshold
    with pytest.raises(RuntimeError, match="no threshold is set"):
        model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    c = model.mask_statistic(x, generator=torch.Generator().manual_seed(0))
    state, provenance, label = dict(vars(model)), model.provenance(), model.inference_label()
    for value in (float(torch.quantile(c.flatten(), 0.9)), float(torch.quantile(c.flatten(), 0.5))):
        out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0), mask_threshold=value)
        expected = torch.nn.functional.max_pool2d((c > value).float(), 3, stride=1, padding=1)
        assert torch.equal(out.extras["mask"], expected)  # each call its own threshold
    assert dict(vars(model)) == state and model.provenance() == provenance and model.inference_label() == label
    assert model.needs_mask_threshold  # still: nothing was stored
    assert "tau=calibrated (from healthy data)" in label and set(provenance) == {"perceptual"}
    with pytest.raises(ValueError, match="tau=0.13 is set in the config"):
        tiny_autoddpm().get_anomaly(x, mask_threshold=0.2)
    with pytest.raises(ValueError, match="finite number"):
        model.get_anomaly(x, mask_threshold=float("nan"))
    assert model.mask_threshold_rule == {"rule": "calibrated"}
    assert tiny_autoddpm().mask_threshold_rule == {"rule": "fixed", "value": 0.13, "source": "config"}
    assert not tiny_autoddpm().needs_mask_threshold
    assert tiny_autoddpm(tau=-1.0).mask_threshold_rule["rule"] == "per-image percentile"


def test_gaussian_blur_is_scipys_per_image_over_the_spatial_axes() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(3, 1, 20, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 2.0, 2.0))  # the study's filter, one image at a time
    torch.testing.assert_close(gaussian_blur(x, 2.0), torch.from_numpy(expected), atol=1e-12, rtol=0)
    y = x.clone()
    y[1] = 0.0  # another image in the batch changes nothing in image 0 (no smoothing across the batch axis)
    assert torch.equal(gaussian_blur(y, 2.0)[0], gaussian_blur(x, 2.0)[0])


@pytest.mark.parametrize("tau", [0.12, -1.0])
def test_masks_are_per_image_never_pooled(tau: float) -> None:
    model = tiny_autoddpm(tau=tau)
    x = smooth_images(2, seed=0)
    y = x.clone()
    y[1] = (x[1] * 0.2 + 0.7).clamp(0, 1)  # a very different second image
    a = model.get_anomaly(x, generator=torch.Generator().manual_seed(4))
    b = model.get_anomaly(y, generator=torch.Generator().manual_seed(4))
    assert 0 < a.extras["mask"][0].sum() < a.extras["mask"][0].numel()
    assert torch.equal(a.extras["mask"][0], b.extras["mask"][0])
    assert not torch.equal(a.extras["c"][1], b.extras["c"][1])  # image 1 did change
    if tau < 0:  # adaptive: the 95th percentile of each image's c, before a 3x3 dilation
        frac = a.extras["mask"].mean(dim=(1, 2, 3))
        assert ((frac >= 0.04) & (frac <= 0.5)).all()


def test_perceptual_block_is_built_with_the_model_and_outside_the_state_dict() -> None:
    block = {"module_name": "model_zoo.autoddpm", "class_name": "AutoDDPM", "params": {
        "network": {"channels": [8, 16, 16], "num_head_channels": 8, "norm_num_groups": 8},
        "inference": {"noise_level": 2}, "repaint": {"noise_level": 1, "resample_steps": 1},
        "perceptual": {"net": "squeeze", "backend": "random"}}}
    model = build(block, "model", base=AnomalyModel).eval()
    keys_before = set(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    provenance = model.provenance()  # fixed from construction on: the network is built with the model
    assert "RANDOM" in model.perceptual.backend_name and provenance == {"perceptual": model.perceptual.backend_name}
    out = model.get_anomaly(torch.rand(1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert model.provenance() == provenance
    assert set(model.state_dict()) == keys_before and all(k.startswith("unet.") for k in keys_before)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert out.extras["c"].shape == (1, 1, 32, 32)
    assert model.map_formula == "study" and model.repaint == RepaintSetting(noise_level=1, resample_steps=1)
    calibrated = build({**block, "params": {**block["params"], "tau": "calibrated", "map_formula": "paper"}}, "model",
                       base=AnomalyModel)
    assert calibrated.needs_mask_threshold and calibrated.map_formula == "paper"
    with pytest.raises(ConfigError, match=r"model\.params\.tau: 'auto' is not one of 'calibrated'"):
        build({**block, "params": {**block["params"], "tau": "auto"}}, "model", base=AnomalyModel)
    # a DDPM checkpoint loads strictly into AutoDDPM and back
    ddpm = DDPM(network=TINY_NET)
    model.load_state_dict(ddpm.state_dict(), strict=True)
    ddpm.load_state_dict(model.state_dict(), strict=True)


def test_helpers_and_validation() -> None:
    flat = torch.full((1, 1, 12, 12), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[..., 15, 15] = 1
    assert gaussian_blur(impulse, 2.0).sum() == pytest.approx(1.0, abs=1e-5)
    q = per_image_quantile(torch.arange(200.0).reshape(2, 1, 10, 10), 0.5)
    assert q.shape == (2, 1, 1, 1) and q.flatten().tolist() == pytest.approx([49.5, 149.5])
    with pytest.raises(ValueError, match="resample_steps=0"):
        RepaintSetting(resample_steps=0)
    with pytest.raises(ValueError, match=r"repaint\.noise_level=1000"):
        tiny_autoddpm(repaint=RepaintSetting(noise_level=1000))
    with pytest.raises(ValueError, match="smoothing_sigma=0.0"):
        tiny_autoddpm(smoothing_sigma=0.0)
    with pytest.raises(ValueError, match="map_formula='mixed'"):
        tiny_autoddpm(map_formula="mixed")
    with pytest.raises(ValueError, match=r"noise_level=0 must be >= 1"):
        RepaintSetting(noise_level=0)
    with pytest.raises(ValueError, match="tau='auto'"):
        tiny_autoddpm(tau="auto")
    with pytest.raises(ValueError, match="no spatial"):
        tiny_autoddpm().set_perceptual(nn.Identity())
