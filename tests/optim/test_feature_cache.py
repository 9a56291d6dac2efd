"""The on-disk feature cache: a hit returns the stored features without calling the extractor; any change misses."""

from pathlib import Path

import numpy as np
import pytest
import torch

from optim.feature_cache import cached_features, content_hash

PARTS = {"backend": "fid_helper", "weights": "/x/default_1.pt", "resolution": 299}


class CountingExtractor:
    """Deterministic [N, 5] float64 features from the images, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.weight = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1).double()[:, :16] @ self.weight


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_hit_returns_identical_features_without_calling_the_extractor(images: torch.Tensor, tmp_path: Path) -> None:
    extractor = CountingExtractor()
    first = cached_features(images, extractor=extractor, key_parts=PARTS, cache_dir=tmp_path / "c")
    assert extractor.calls == 1 and torch.equal(first, extractor(images))
    extractor.calls = 0
    again = cached_features(images.clone(), extractor=extractor, key_parts=dict(PARTS), cache_dir=tmp_path / "c")
    assert extractor.calls == 0 and again.dtype == torch.float64 and torch.equal(again, first)
    files = sorted(p.suffix for p in (tmp_path / "c").iterdir())
    assert files == [".json", ".npy"]  # no temporary file left behind
    stored = np.load(next((tmp_path / "c").glob("*.npy")), allow_pickle=False)  # plain npy, no pickle
    assert np.array_equal(stored, first.numpy())


@pytest.mark.parametrize("change", ["content", "backend", "resolution", "shape"])
def test_changed_content_backend_or_resolution_misses(images: torch.Tensor, tmp_path: Path, change: str) -> None:
    extractor = CountingExtractor()
    cached_features(images, extractor=extractor, key_parts=PARTS, cache_dir=tmp_path)
    other, parts = images, dict(PARTS)
    if change == "content":
        other = images.clone()
        other[3, 0, 5, 5] += 1e-6  # one pixel, a tiny change
    elif change == "backend":
        parts["backend"] = "torchvision"
    elif change == "resolution":
        parts["resolution"] = 224
    else:
        other = images.reshape(6, 1, 4, 16)  # same bytes, other shape
    out = cached_features(other, extractor=extractor, key_parts=parts, cache_dir=tmp_path)
    assert extractor.calls == 2 and torch.equal(out, extractor(other))
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_content_hash_is_of_the_float32_values() -> None:
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    assert content_hash(x) == content_hash(x.double()) == content_hash(x.transpose(2, 3).contiguous().transpose(2, 3))
    assert content_hash(x) != content_hash(x.flip(0))


def test_wrong_extractor_output_and_bad_key_parts_fail(images: torch.Tensor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected \\[N, d\\]"):
        cached_features(images, extractor=lambda x: torch.zeros(2, 3), key_parts=PARTS, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="key_parts"):
        cached_features(images, extractor=CountingExtractor(), key_parts={"net": object()}, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.npy"))
