"""model_zoo.filters: each border rule against scipy.ndimage.gaussian_filter (an independent implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from model_zoo.filters import gaussian_blur, radius_for

SCIPY_MODE = {"mirror": "mirror", "symmetric": "reflect", "zeros": "constant"}


def _scipy(x: torch.Tensor, sigma: float, radius: int, mode: str) -> torch.Tensor:
    # truncate * sigma + 0.5 rounds down to `radius`: the same kernel support
    out = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, truncate=radius / sigma, cval=0.0)
    return torch.from_numpy(out)


@pytest.mark.parametrize("border", ["mirror", "symmetric", "zeros"])
@pytest.mark.parametrize(("sigma", "rule"), [(1.0, "ceil"), (2.0, "scipy"), (1.2, "ceil"), (0.7, "scipy")])
def test_each_border_is_scipys_filter(border: str, sigma: float, rule: str) -> None:
    x = torch.rand(2, 3, 21, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radius = radius_for(sigma, rule)
    torch.testing.assert_close(gaussian_blur(x, sigma, border=border, radius=radius),
                               _scipy(x, sigma, radius, SCIPY_MODE[border]), atol=1e-12, rtol=0)


def test_radius_rules() -> None:
    assert [radius_for(s, "ceil") for s in (0.1, 1.0, 1.2, 2.0)] == [1, 4, 5, 8]
    assert [radius_for(s, "scipy") for s in (0.1, 1.0, 1.2, 2.0)] == [0, 4, 5, 8]
    with pytest.raises(ValueError, match="radius rule 'round' invalid"):
        radius_for(1.0, "round")  # type: ignore[arg-type]


def test_mirror_on_an_image_smaller_than_the_kernel_keeps_constants() -> None:
    flat = torch.full((1, 1, 5, 3), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat, 4.0, border="mirror", radius=16), flat)


def test_symmetric_keeps_the_mass_of_an_impulse_at_the_border() -> None:
    impulse = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    impulse[0, 0, 0, 1] = 1.0  # symmetric padding folds what leaves the image back in (mirror does not)
    assert gaussian_blur(impulse, 1.0, border="symmetric", radius=4).sum().item() == pytest.approx(1.0, abs=1e-12)
    assert gaussian_blur(impulse, 1.0, border="mirror", radius=4).sum().item() != pytest.approx(1.0, abs=1e-6)


def test_zeros_leaks_mass_at_the_border_and_symmetric_refuses_a_radius_beyond_the_image() -> None:
    ones = torch.ones(1, 1, 8, 8)
    blurred = gaussian_blur(ones, 2.0, border="zeros", radius=8)
    assert blurred[0, 0, 0, 0] < 0.5 and blurred[0, 0, 4, 4] < 1.0
    with pytest.raises(ValueError, match="radius 9 exceeds the image size 8"):
        gaussian_blur(ones, 2.0, border="symmetric", radius=9)


def test_dtype_identity_and_bad_options() -> None:
    x = torch.rand(1, 2, 16, 16)
    assert gaussian_blur(x, 1.0, border="mirror", radius=4).dtype == torch.float32
    assert gaussian_blur(x, 0.0, border="zeros", radius=4) is x
    with pytest.raises(ValueError, match="border 'wrap' invalid"):
        gaussian_blur(x, 1.0, border="wrap", radius=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius must be >= 1"):
        gaussian_blur(x, 1.0, border="mirror", radius=0)
    assert np.isfinite(gaussian_blur(x, 3.0, border="mirror", radius=12).numpy()).all()
