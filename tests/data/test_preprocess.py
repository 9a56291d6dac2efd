"""Intensity rules, padding, image resizing and the mask rule (nearest, then binarised)."""

from __future__ import annotations

import numpy as np
import pytest

from data.preprocess import (
    pad_to_square,
    preprocess_image,
    preprocess_mask,
    resize_image,
    resize_mask,
    scale_intensity,
)


def test_minmax_and_constant_image() -> None:
    out = scale_intensity(np.array([[2.0, 4.0], [6.0, 10.0]]), "minmax")
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(scale_intensity(np.full((3, 3), 7.0), "minmax"), np.zeros((3, 3)))


def test_percentile_clips_a_hot_pixel() -> None:
    image = np.tile(np.linspace(0, 1, 100), (100, 1))
    image[0, 0] = 1000.0
    out = scale_intensity(image, "percentile")
    assert out.min() == 0.0 and out.max() == 1.0
    # Without clipping the hot pixel would squash the ramp to [0, 0.001].
    assert out[50, 50] == pytest.approx(0.5, abs=0.02)


def test_unit_rule_keeps_values_and_rejects_out_of_range() -> None:
    image = np.array([[0.2, 0.7]], np.float32)
    np.testing.assert_array_equal(scale_intensity(image, "unit"), image)
    with pytest.raises(ValueError, match=r"'unit' needs values in \[0,1\]"):
        scale_intensity(np.array([[0.0, 255.0]]), "unit")
    with pytest.raises(ValueError, match="'bogus' is not one of minmax, percentile, unit"):
        scale_intensity(image, "bogus")  # type: ignore[arg-type]


def test_pad_to_square_centres() -> None:
    out = pad_to_square(np.ones((2, 5)))
    assert out.shape == (5, 5)
    np.testing.assert_array_equal(out.sum(axis=1), [0, 5, 5, 0, 0])


def test_resize_image_area_and_bilinear() -> None:
    image = np.kron(np.array([[0.0, 1.0], [1.0, 0.0]]), np.ones((4, 4))).astype(np.float32)
    down = resize_image(image, (2, 2))
    np.testing.assert_allclose(down, [[0.0, 1.0], [1.0, 0.0]])  # area mode averages whole blocks
    up = resize_image(np.array([[0.0, 1.0]], np.float32), (2, 4))
    assert up.shape == (2, 4) and 0.0 <= up.min() and up.max() <= 1.0
    assert np.all(np.diff(up[0]) >= 0)  # bilinear: monotone ramp


def test_masks_nearest_then_binarised() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    mask[6, 6] = 3
    out = resize_mask(mask, (4, 4))
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out[:2, :2], 1.0)
    up = resize_mask(np.array([[0.0, 0.3], [0.0, 0.0]]), (4, 4))  # any nonzero is inside
    np.testing.assert_array_equal(up, np.kron([[0, 1], [0, 0]], np.ones((2, 2))))


def test_full_pipeline_shapes_and_ranges() -> None:
    rng = np.random.default_rng(0)
    raw = rng.random((30, 20)) * 500
    image = preprocess_image(raw, target_size=(16, 16), intensity="minmax")
    mask = preprocess_mask((raw > 250).astype(np.uint8) * 7, target_size=(16, 16))
    assert image.shape == mask.shape == (16, 16)
    assert image.dtype == mask.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # Padding columns (left/right of the 30x20 image) are background in both.
    assert image[:, 0].max() == 0.0 and mask[:, 0].max() == 0.0
    with pytest.raises(ValueError, match="target_size"):
        resize_image(image, (16,))
