"""Inference on one scan: training preprocessing, batched ``get_anomaly``, maps back on the native grid."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.prediction.scans import BadInput, Scan
from data.preprocess import Intensity, preprocess_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """What the training run did to every slice (from the checkpoint's ``data.params``).

    Attributes:
        target_size: (H, W) the model sees.
        intensity: the [0,1] scaling rule (:mod:`data.preprocess`).
    """

    target_size: tuple[int, int]
    intensity: Intensity


@dataclass(frozen=True)
class SliceMaps:
    """A scan's results.

    Attributes:
        maps: [n,H,W] float32 anomaly maps on the native in-plane grid, >= 0, 0 outside the brain mask.
        scores: [n] float64, the model's image-level score of each slice.
        inputs: [n,h,w] float32 in [0,1], the preprocessed slices the model saw.
    """

    maps: np.ndarray
    scores: np.ndarray
    inputs: np.ndarray


def to_native(maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Undo pad-to-square + resize: [n,1,h,w] model-grid maps -> [n,H,W] on the native (H, W) grid.

    Bilinear (``align_corners=False``) to the padded square ``S = max(H, W)``, then the centred padding of
    :func:`data.preprocess.pad_to_square` is cropped away.
    """
    height, width = int(shape[0]), int(shape[1])
    size = max(height, width)
    square = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    top, left = (size - height) // 2, (size - width) // 2
    return square[:, top:top + height, left:left + width].clamp_min(0.0)


@torch.no_grad()
def predict_scan(model: torch.nn.Module, scan: Scan, prep: Preprocessing, *, device: torch.device, batch_size: int,
                 seed: int, mask_threshold: float | None = None) -> SliceMaps:
    """Anomaly maps and scores of every slice of ``scan``.

    Each scan gets its own generator seeded with ``seed`` on ``device``, so results do not depend on the order
    of the inputs. ``mask_threshold`` (the calibrated threshold of a model with ``tau: calibrated``) is passed to
    every ``get_anomaly`` call when given.

    Raises:
        BadInput: a slice does not fit the intensity rule (e.g. values outside [0,1] with ``'unit'``).
    """
    try:
        inputs = np.stack([preprocess_image(s, target_size=prep.target_size, intensity=prep.intensity)
                           for s in scan.slices])
    except ValueError as err:
        raise BadInput(f"{scan.path}: {err} (set predict.intensity to scale raw scans)") from err
    generator = torch.Generator(device=device).manual_seed(int(seed))
    per_call = {} if mask_threshold is None else {"mask_threshold": mask_threshold}
    maps, scores = [], []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[start:start + batch_size])[:, None].to(device)
        out = model.get_anomaly(x, generator=generator, **per_call)
        maps.append(to_native(out.anomaly_map.detach(), scan.slices.shape[1:]).cpu())
        scores.append(out.anomaly_score.detach().double().cpu())
    native = torch.cat(maps).numpy()
    if scan.brain is not None:
        native = native * scan.brain
    return SliceMaps(maps=native.astype(np.float32), scores=torch.cat(scores).numpy(), inputs=inputs)
