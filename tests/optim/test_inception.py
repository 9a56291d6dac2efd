"""The FID feature network: offline loading (torchvision file, fid-helper fallback, random), input range, layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optim.inception import FID_HELPER_RANGE, TORCHVISION_FILE, InceptionFeatures, fid_helper_weights


def test_random_backend_is_deterministic_and_labelled():
    x = torch.rand(3, 1, 32, 32)
    a, b = InceptionFeatures(backend="random"), InceptionFeatures(backend="random")
    fa = a.features(x, batch_size=2)
    assert fa.shape == (3, a.dim) and fa.dtype == torch.float64
    assert torch.allclose(fa, b.features(x), atol=1e-6)  # same seed, any batching
    assert a.provenance["fid_backend"] == "random" and "meaningless" in a.provenance["fid_note"]


def test_bad_backend_and_missing_torchvision_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="not one of"):
        InceptionFeatures(backend="inception")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=TORCHVISION_FILE):
        InceptionFeatures(backend="torchvision")


def test_auto_falls_back_to_fid_helper_torchscript(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no official weights there
    path = fid_helper_weights()
    assert path is not None and path.name == "default_1.pt"
    net = InceptionFeatures(backend="auto")
    assert net.backend_name == "fid_helper" and net.provenance["fid_weights"] == str(path)
    assert "licence not stated" in net.provenance["fid_note"]
    feats = net(torch.rand(2, 1, 64, 64))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_auto_prefers_torchvision_file_in_torch_home(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), ckpt / TORCHVISION_FILE)
    net = InceptionFeatures(backend="auto")
    assert net.backend_name == "torchvision" and net.provenance["fid_weights"] == str(ckpt / TORCHVISION_FILE)
    assert net(torch.rand(1, 1, 40, 40)).shape == (1, 2048)


class _Recorder(nn.Module):
    """Wraps a network and records the layout and range of what it is called with."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.is_contiguous(memory_format=torch.channels_last), float(x.min()), float(x.max())))
        return self.net(x)


def _manual_input(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """[B,1,H,W] in [0,1] -> [B,3,299,299] in [lo,hi], contiguous (NCHW): the reference call's input."""
    up = F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
    return (up * (hi - lo) + lo).contiguous()


def test_fid_helper_maps_unit_images_to_its_input_range_in_channels_last(tmp_path, monkeypatch, one_thread):
    # The TF-Inception TorchScript net expects [-1, 0.9921875]: the wrapper's features of [0,1] images equal a
    # manual NCHW call on correctly scaled inputs, and differ from a call on unscaled [0,1] inputs.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    inc = InceptionFeatures(backend="fid_helper")
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    x[0, 0, :8] = 0.0
    x[1, 0, :8] = 1.0  # both ends of the range
    ref = inc.net(_manual_input(x, *FID_HELPER_RANGE))
    wrong = inc.net(_manual_input(x, 0.0, 1.0))
    inc.net = _Recorder(inc.net)
    ours = inc(x)
    (channels_last, lo, hi), = inc.net.calls
    assert channels_last and lo == pytest.approx(FID_HELPER_RANGE[0]) and hi == pytest.approx(FID_HELPER_RANGE[1])
    tol = 1e-4 * float(ref.abs().max())
    assert float((ours - ref).abs().max()) < tol  # channels-last keeps the features to round-off
    assert float((wrong - ref).abs().max()) > 100 * tol


def test_torchvision_backend_maps_unit_images_to_minus_one_one(tmp_path, monkeypatch, one_thread):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)
    inc = InceptionFeatures(backend="torchvision", weights_path=str(path))
    x = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    ref, wrong = inc.net(_manual_input(x, -1.0, 1.0)), inc.net(_manual_input(x, 0.0, 1.0))
    ours = inc(x)
    tol = 1e-4 * float(ref.abs().max())
    assert float((ours - ref).abs().max()) < tol
    assert float((wrong - ref).abs().max()) > 100 * tol
