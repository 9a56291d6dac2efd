"""Loading the FID feature network offline: torchvision file, fid-helper fallback, random backend."""

import pytest
import torch

from optim.inception import TORCHVISION_FILE, InceptionFeatures, fid_helper_weights


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
