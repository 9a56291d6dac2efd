from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from optim.losses.perceptual import BACKBONE_FILES, PerceptualDistance, PerceptualSetting


@pytest.fixture(scope="module")
def squeeze() -> PerceptualDistance:
    return PerceptualDistance(net="squeeze", backend="random")


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 6.28, 32)
    base = 0.5 + 0.4 * torch.sin(grid[None, :] * torch.tensor([1.0, 2.0])[:, None])  # [2,32] smooth rows
    x = base[:, None, :, None] * torch.ones(2, 1, 32, 32)
    noise = torch.randn(x.shape, generator=gen)
    return x, noise


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted download: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_random_backend_is_deterministic(squeeze: PerceptualDistance, images) -> None:
    x, noise = images
    y = (x + 0.1 * noise).clamp(0, 1)
    other = PerceptualDistance(net="squeeze", backend="random")
    assert torch.equal(squeeze(x, y), other(x, y))
    assert torch.equal(squeeze(x, y), squeeze(x, y))
    assert "RANDOM" in squeeze.backend_name


def test_identity_is_zero_and_noise_increases_distance(squeeze: PerceptualDistance, images) -> None:
    x, noise = images
    assert torch.allclose(squeeze(x, x), torch.zeros(2), atol=1e-6)
    assert squeeze.spatial(x, x).abs().max() < 1e-6
    small = squeeze(x, (x + 0.05 * noise).clamp(0, 1))
    large = squeeze(x, (x + 0.3 * noise).clamp(0, 1))
    assert (small > 0).all() and (large > small).all()


def test_shapes_gray_equals_rgb_and_scalar_is_mean_of_layers(squeeze: PerceptualDistance, images) -> None:
    x, noise = images
    y = (x + 0.2 * noise).clamp(0, 1)
    d, s = squeeze(x, y), squeeze.spatial(x, y)
    assert d.shape == (2,) and s.shape == (2, 1, 32, 32)
    assert (s >= 0).all()
    torch.testing.assert_close(squeeze(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), d)
    # identical to the official lpips forward on [-1,1] inputs (scalar and spatial=True variants)
    lp = squeeze.model
    torch.testing.assert_close(lp(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1), normalize=True).flatten(), d)
    lp.spatial = True
    try:
        torch.testing.assert_close(lp(2 * x.repeat(1, 3, 1, 1) - 1, 2 * y.repeat(1, 3, 1, 1) - 1), s)
    finally:
        lp.spatial = False
    with pytest.raises(ValueError, match="same shape"):
        squeeze(x, y[:1])
    with pytest.raises(ValueError, match=r"\[B,1,H,W\] or \[B,3,H,W\]"):
        squeeze(x.repeat(1, 2, 1, 1), y.repeat(1, 2, 1, 1))


def test_frozen_outside_state_dict_and_always_eval(squeeze: PerceptualDistance, images) -> None:
    x, noise = images
    assert list(squeeze.parameters()) == []
    assert squeeze.state_dict() == {}
    host = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    host.perceptual = squeeze
    assert set(host.state_dict()) == {"0.weight", "0.bias"}
    host.train()
    assert not squeeze.training and not any(m.training for m in squeeze.modules())
    y = (x + 0.2 * noise).clamp(0, 1).requires_grad_(True)
    squeeze(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # usable as a loss: gradients reach the input


def test_lpips_backend_loads_official_file_from_torch_home(tmp_path: Path, monkeypatch, no_downloads, images) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.squeezenet1_1(weights=None)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / BACKBONE_FILES["squeeze"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    for backend in ("lpips", "auto"):
        dist = PerceptualDistance(net="squeeze", backend=backend)
        assert dist.backend_name.startswith("lpips/squeeze (official weights from")
        assert str(checkpoints / BACKBONE_FILES["squeeze"]) in dist.backend_name
        slices = dist.model.net  # lpips keeps torchvision's layer index as the module name inside each slice
        torch.testing.assert_close(getattr(slices.slice2, "4").expand3x3.weight, reference.features[4].expand3x3.weight)
        torch.testing.assert_close(getattr(slices.slice7, "12").squeeze.bias, reference.features[12].squeeze.bias)
    x, noise = images
    assert not torch.equal(dist(x, (x + 0.2 * noise).clamp(0, 1)),
                           PerceptualDistance(net="squeeze", backend="random")(x, (x + 0.2 * noise).clamp(0, 1)))

    # an explicit path wins, and a file of the wrong architecture is refused
    path = str(checkpoints / BACKBONE_FILES["squeeze"])
    explicit = PerceptualDistance(net="squeeze", backend="lpips", weights_path=path)
    assert "official weights" in explicit.backend_name
    with pytest.raises(ValueError, match="do not match|has no place"):
        PerceptualDistance(net="alex", backend="lpips", weights_path=path)


def test_stlpips_fallback_is_offline_and_labelled(tmp_path: Path, monkeypatch, no_downloads, images) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty: no official backbone here
    dist = PerceptualDistance(net="squeeze", backend="auto")
    assert dist.backend_name.startswith("stlpips/alex shift-tolerant")
    assert "'squeeze'" in dist.backend_name and "different metric" in dist.backend_name
    x, noise = images
    assert torch.allclose(dist(x, x), torch.zeros(2), atol=1e-6)
    assert (dist(x, (x + 0.3 * noise).clamp(0, 1)) > dist(x, (x + 0.05 * noise).clamp(0, 1))).all()
    assert dist.spatial(x, x).shape == (2, 1, 32, 32)


def test_a_setting_builds_without_touching_the_global_rng(tmp_path: Path, monkeypatch, no_downloads) -> None:
    # models build their perceptual network in the constructor: their own initial weights must not depend on it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # ST-LPIPS, whose construction draws random numbers
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    built = PerceptualSetting(net="squeeze", backend="auto").build()
    assert built.backend_name.startswith("stlpips/") and torch.equal(torch.rand(3), expected)


def test_bad_arguments_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"net='resnet'.*'alex', 'squeeze', 'vgg'"):
        PerceptualDistance(net="resnet")
    with pytest.raises(ValueError, match=r"backend='torch'"):
        PerceptualDistance(backend="torch")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        PerceptualDistance(net="alex", backend="lpips")
    with pytest.raises(FileNotFoundError, match="no such file"):
        PerceptualDistance(net="alex", backend="auto", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not used by backend 'random'"):
        PerceptualDistance(backend="random", weights_path=str(tmp_path))


def test_spatial_size_computes_the_map_on_resized_images(squeeze: PerceptualDistance, images) -> None:
    x, noise = images  # 32x32
    y = (x + 0.2 * noise).clamp(0, 1)
    resized = PerceptualDistance(net="squeeze", backend="random", spatial_size=128)
    assert resized.backend_name.endswith("spatial map computed at 128x128")
    up = torch.nn.functional.interpolate
    at_128 = squeeze.spatial(up(x, size=(128, 128), mode="bilinear"), up(y, size=(128, 128), mode="bilinear"))
    expected = up(at_128, size=(32, 32), mode="area")  # the map of the same network at 128, averaged back
    out = resized.spatial(x, y)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, squeeze.spatial(x, y), atol=1e-3)  # a different map from the native one
    torch.testing.assert_close(resized(x, y), squeeze(x, y))  # the per-image distance is unchanged
    for size in (16, 64.0, True):
        with pytest.raises(ValueError, match="spatial_size=.* must be null or an integer >= 32"):
            PerceptualDistance(net="squeeze", backend="random", spatial_size=size)
