"""Simplex noise against the ``opensimplex`` 0.4.5.1 reference (the AnoDDPM reference's noise), and Gaussian noise."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest
import torch

from model_zoo.diffusion.noise import DiffusionNoise, opensimplex3, random_permutations, simplex_noise


@pytest.fixture()
def opensimplex() -> ModuleType:
    """The reference package; only the tests that compare against it skip without it."""
    return pytest.importorskip("opensimplex", reason="reference package: pip install opensimplex==0.4.5.1")


def _init(opensimplex: ModuleType, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's seeded permutation tables (``opensimplex.internals._init``)."""
    return importlib.import_module(f"{opensimplex.__name__}.internals")._init(seed)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def reference_field(opensimplex: ModuleType, seed: int, size: int, t: float, octaves: int = 6,
                    persistence: float = 0.8, frequency: float = 64.0) -> np.ndarray:
    """AnoDDPM's ``rand_3d_fixed_T_octaves`` on opensimplex: [size,size] float64."""
    gen = opensimplex.OpenSimplex(seed)
    coords = np.arange(size, dtype=np.float64)
    noise = np.zeros((size, size))
    amplitude = 1.0
    for _ in range(octaves):
        noise += amplitude * gen.noise3array(coords / frequency, coords / frequency, np.array([t]) / frequency)[0]
        frequency /= 2
        amplitude *= persistence
    return noise


def test_opensimplex3_matches_reference_pointwise(opensimplex: ModuleType) -> None:
    # Same permutation, random points: the vectorised kernel sum equals opensimplex's value. The reference's
    # branch tree skips a few lattice points whose kernel weight is tiny; so values agree exactly (1e-12) at
    # most points and within 2e-4 everywhere (values reach ~0.9).
    perm, _ = _init(opensimplex, 1234)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-40.0, 40.0, size=(3, 1500))
    gen = opensimplex.OpenSimplex(1234)
    ref = np.array([gen.noise3(*p) for p in pts.T])
    ours = opensimplex3(*(torch.from_numpy(c).reshape(1, -1) for c in pts),
                        torch.from_numpy(perm).reshape(1, -1))[0].numpy()
    err = np.abs(ours - ref)
    assert np.abs(ref).max() > 0.3
    assert err.max() < 2e-4, err.max()
    assert (err < 1e-12).mean() > 0.9


def test_fractal_field_matches_reference_with_same_permutation(opensimplex: ModuleType) -> None:
    size, t, seed = 32, 137.0, 7
    perm, _ = _init(opensimplex, seed)
    ours = simplex_noise((1, 1, size, size), timesteps=torch.tensor([t]), dtype=torch.float64,
                         permutations=torch.from_numpy(perm).reshape(1, -1))[0, 0].numpy()
    ref = reference_field(opensimplex, seed, size, t)
    assert ref.std() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def _field_stats(fields: np.ndarray, max_lag: int = 4) -> dict[str, np.ndarray]:
    """Per-field mean, variance and lag-k correlations (horizontal and vertical), each [n_fields]."""
    out = {"mean": fields.mean(axis=(1, 2)), "var": fields.var(axis=(1, 2))}
    for k in range(1, max_lag + 1):
        for axis, (a, b) in {"x": (fields[:, :, :-k], fields[:, :, k:]), "y": (fields[:, :-k], fields[:, k:])}.items():
            a = a - a.mean(axis=(1, 2), keepdims=True)
            b = b - b.mean(axis=(1, 2), keepdims=True)
            out[f"corr_{axis}{k}"] = (a * b).mean(axis=(1, 2)) / np.sqrt((a * a).mean(axis=(1, 2))
                                                                           * (b * b).mean(axis=(1, 2)))
    return out


def test_statistics_match_reference(opensimplex: ModuleType) -> None:
    # 48 reference fields (random opensimplex seeds and timesteps) vs 400 of ours (fresh torch permutations):
    # the mean over fields of each per-field statistic agrees within 4 standard errors of the difference.
    size = 32
    rng = np.random.default_rng(3)
    seeds = rng.integers(0, 2**62, 48)
    ts = rng.integers(0, 1000, 48).astype(np.float64)
    ref = np.stack([reference_field(opensimplex, int(s), size, float(t)) for s, t in zip(seeds, ts, strict=True)])
    ours = simplex_noise((400, 1, size, size), timesteps=torch.randint(0, 1000, (400,)), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))[:, 0].numpy()
    s_ref, s_ours = _field_stats(ref), _field_stats(ours)
    for name in s_ref:
        se = np.sqrt(s_ref[name].var() / len(ref) + s_ours[name].var() / len(ours))
        diff = s_ref[name].mean() - s_ours[name].mean()
        assert abs(diff) < 4 * se, f"{name}: reference {s_ref[name].mean():.4f} vs ours {s_ours[name].mean():.4f}"
    # not renormalised: the per-pixel standard deviation stays well below 1 (about 0.5 for 6 octaves)
    assert 0.3 < ours.std() < 0.7 and 0.3 < ref.std() < 0.7
    assert s_ours["corr_x1"].mean() > 0.85  # smooth at the pixel scale


def test_fresh_permutation_per_call_per_image_and_determinism() -> None:
    shape = (3, 1, 16, 16)
    t = torch.tensor([10, 10, 10])
    g = torch.Generator().manual_seed(0)
    first, second = simplex_noise(shape, timesteps=t, generator=g), simplex_noise(shape, timesteps=t, generator=g)
    assert not torch.allclose(first, second)  # fresh permutation per call
    assert not torch.allclose(first[0], first[1])  # one field per image
    again = simplex_noise(shape, timesteps=t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    shared = simplex_noise(shape, timesteps=t, generator=g, per_image=False)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])


def test_timestep_is_the_third_coordinate() -> None:
    perm = random_permutations(1, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    near = [simplex_noise((1, 1, 16, 16), timesteps=torch.tensor([t]), permutations=perm) for t in (100, 101, 400)]
    assert (near[0] - near[1]).abs().max() < (near[0] - near[2]).abs().max()
    assert not torch.equal(near[0], near[1])


def test_diffusion_noise_types_and_validation() -> None:
    like = torch.zeros(2, 1, 8, 8)
    gauss = DiffusionNoise(noise_type="gaussian").sample(like, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.randn(like.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gauss, expected)
    simplex = DiffusionNoise(noise_type="simplex").sample(like, torch.tensor([3, 900]),
                                                          generator=torch.Generator().manual_seed(0))
    assert simplex.shape == like.shape and simplex.dtype == like.dtype and simplex.std() > 0
    with pytest.raises(ValueError, match="perlin.*gaussian, simplex"):
        DiffusionNoise(noise_type="perlin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="persistence"):
        DiffusionNoise(noise_type="simplex", persistence=1.5)
