"""AutoDDPM: empty and full masks, RePaint against a MONAI-step reference, per-image masks, injection."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.Configurator import build
from dl_utils.reinit import randomize_zero_layers
from model_zoo.autoddpm import AutoDDPM, gaussian_blur, per_image_quantile
from model_zoo.base import AnomalyModel
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.procedures import repaint
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting, UNetSetting

TINY_NET = UNetSetting(channels=(8, 16, 16), num_head_channels=8, norm_num_groups=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add contention on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def smooth_images(n: int = 2, size: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(n, 1, size, size, generator=g), 1.5).clamp(0, 1)


def test_empty_mask_returns_the_input() -> None:
    model = tiny_autoddpm(tau=1e9)
    x = smooth_images()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert out.extras["mask"].sum() == 0
    torch.testing.assert_close(out.extras["x_inp"], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.extras["stitched"], x)
    assert out.anomaly_map.abs().max() < 1e-6 and out.anomaly_score.abs().max() < 1e-6


def _reference_full_inpainting(model: AutoDDPM, x: Tensor, seed: int) -> Tensor:
    """RePaint of the whole image written with MONAI's DDPMScheduler.step, drawing random numbers in the same
    order as the procedure (known part, reverse step, jump back); with a full mask the known part is unused."""
    g = torch.Generator().manual_seed(seed)
    x_rec = model.reconstruct(x, generator=g)
    sched, level = model.scheduler, model.repaint.noise_level
    z = sched.add_noise(x_rec, torch.randn(x.shape, generator=g), torch.tensor([level]))
    for t in range(level, -1, -1):
        for u in range(model.repaint.resample_steps):
            if t > 0:
                torch.randn(x.shape, generator=g)  # the known part's noise
            eps = model.unet(z, timesteps=torch.full((x.shape[0],), t))
            z, _ = sched.step(eps, t, z, generator=g)
            if u < model.repaint.resample_steps - 1:
                beta = float(sched.betas[t])
                z = math.sqrt(1 - beta) * z + math.sqrt(beta) * torch.randn(x.shape, generator=g)
    return z


def test_full_mask_equals_resampled_inpainting_of_the_whole_image() -> None:
    model = tiny_autoddpm()
    x = smooth_images()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(3), mask=torch.ones_like(x))
    with torch.no_grad():
        expected = _reference_full_inpainting(model, x, seed=3)
    torch.testing.assert_close(out.extras["x_inp"], expected, atol=1e-3, rtol=1e-3)
    # the stitched image is x_rec where the mask is 1
    torch.testing.assert_close(out.extras["stitched"], out.extras["x_rec"])
    # with a full mask the known image is never used: another one changes nothing
    def inpaint(known: Tensor) -> Tensor:
        return repaint(model.eps, known, out.extras["x_rec"], torch.ones_like(x), noise_level=2, resample_steps=2,
                       schedule=model.schedule, noise=model.noise, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        assert torch.equal(inpaint(x), inpaint(1 - x))


def test_partial_mask_keeps_the_input_outside_and_map_formula() -> None:
    model = tiny_autoddpm(c_smoothing_sigma=2.0)
    x = smooth_images()
    mask = torch.zeros_like(x)
    mask[..., 4:10, 5:12] = 1
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(1), mask=mask)
    keep = mask == 0
    torch.testing.assert_close(out.extras["x_inp"][keep], x[keep], atol=1e-6, rtol=0)
    assert not torch.allclose(out.extras["x_inp"][~keep], x[~keep])
    expected_map = (x - out.extras["x_inp"].clamp(0, 1)).abs() * gaussian_blur(out.extras["c"], 2.0)
    torch.testing.assert_close(out.anomaly_map, expected_map)
    torch.testing.assert_close(out.anomaly_score, expected_map.mean(dim=(1, 2, 3)))
    assert out.reconstruction is not None and torch.equal(out.reconstruction, out.extras["x_inp"].clamp(0, 1))


def test_c_mask_and_network_calls() -> None:
    model = tiny_autoddpm(tau=0.5)
    calls: list[int] = []
    model.unet.register_forward_pre_hook(lambda _m, _a, kw: calls.append(int(kw["timesteps"][0])), with_kwargs=True)
    x = smooth_images()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    # L_r + 1 reconstruction calls, then (L_i + 1) * U re-sampling calls
    assert calls == [4, 3, 2, 1, 0] + [t for t in (3, 2, 1, 0) for _ in range(2)]
    x_rec = out.extras["x_rec"]
    r = (x_rec - x).abs()
    r = (r / per_image_quantile(r, 0.95)).clamp(max=1)
    c = (gaussian_blur((x - x_rec).abs(), 1.0) * 4.0 + 0.05) * r
    torch.testing.assert_close(out.extras["c"], c)
    expected_mask = torch.nn.functional.max_pool2d((c > 0.5).float(), 3, stride=1, padding=1)
    assert torch.equal(out.extras["mask"], expected_mask)
    assert set(out.extras) == {"x_rec", "mask", "stitched", "x_inp", "c"}
    assert len(calls) == model.network_calls() == 5 + 8
    assert "RePaint from L_i=3 with U=2, 8 network calls" in model.inference_label()


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


def test_perceptual_block_is_lazy_and_outside_the_state_dict() -> None:
    block = {"module_name": "model_zoo.autoddpm", "class_name": "AutoDDPM", "params": {
        "network": {"channels": [8, 16, 16], "num_head_channels": 8, "norm_num_groups": 8},
        "inference": {"noise_level": 2}, "repaint": {"noise_level": 1, "resample_steps": 1},
        "perceptual": {"net": "squeeze", "backend": "random"}}}
    model = build(block, "model", base=AnomalyModel).eval()
    keys_before = set(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    assert model._perceptual is None  # built on first use
    out = model.get_anomaly(torch.rand(1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert model._perceptual is not None and "RANDOM" in model.perceptual.backend_name
    assert set(model.state_dict()) == keys_before and all(k.startswith("unet.") for k in keys_before)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert out.extras["c"].shape == (1, 1, 32, 32)
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
    with pytest.raises(ValueError, match="c_smoothing_sigma"):
        tiny_autoddpm(c_smoothing_sigma=0.0)
    with pytest.raises(ValueError, match="no spatial"):
        tiny_autoddpm().set_perceptual(nn.Identity())
