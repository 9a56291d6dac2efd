"""dl_utils.resample: an operation at a working size, its map back at the input's size; the size check."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dl_utils.resample import at_size, working_size


def _ramp(size: int) -> Tensor:
    """[2,1,size,size]: two smooth images (a diagonal ramp and its mirror), in [0,1]."""
    axis = torch.linspace(0, 1, size)
    ramp = (axis.view(-1, 1) + axis.view(1, -1)) / 2
    return torch.stack([ramp, ramp.flip(0)]).unsqueeze(1)


def test_the_operation_sees_every_image_at_the_working_size_and_its_map_comes_back() -> None:
    seen = []

    def difference(x: Tensor, y: Tensor) -> Tensor:
        seen.append((tuple(x.shape), tuple(y.shape)))
        return (x - y).abs()

    x, y = _ramp(32), _ramp(32).flip(-1)
    out = at_size(difference, 128, x, y)
    assert seen == [((2, 1, 128, 128), (2, 1, 128, 128))]
    assert out.shape == x.shape
    # a smooth map survives the round trip: bilinear up, area down of |x - y| is close to |x - y| itself
    torch.testing.assert_close(out, (x - y).abs(), atol=0.02, rtol=0)


def test_no_working_size_or_the_images_own_size_calls_the_operation_on_them_as_given() -> None:
    x = _ramp(64)
    received: list[Tensor] = []

    def keep(image: Tensor) -> Tensor:
        received.append(image)
        return image

    for size in (None, 64):
        at_size(keep, size, x)
    assert received[0] is x and received[1] is x


def test_a_map_made_at_the_working_size_is_area_averaged_back() -> None:
    # one hot pixel per 2x2 block at 128 must come back as a quarter at 64 (area), not as 0 or 1 (nearest/bilinear)
    def checkerboard(image: Tensor) -> Tensor:
        out = torch.zeros_like(image)
        out[..., ::2, ::2] = 1.0
        return out

    out = at_size(checkerboard, 128, _ramp(64))
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


@pytest.mark.parametrize("value", [True, 7.5, "128", 4, 100])
def test_a_bad_working_size_names_the_option_and_the_rule(value: object) -> None:
    with pytest.raises(ValueError, match=r"clahe_size=.* must be null or an integer >= 8 divisible by 8"):
        working_size(value, name="clahe_size", minimum=8, multiple=8)


def test_a_good_working_size_is_returned() -> None:
    assert working_size(None, name="spatial_size", minimum=32) is None
    assert working_size(128, name="clahe_size", minimum=8, multiple=8) == 128
    assert working_size(33, name="spatial_size", minimum=32) == 33
