"""Calibrate a model's mask threshold on healthy data (AutoDDPM's tau on c) before anything is evaluated.

The reference study sets AutoDDPM's mask threshold by hand (0.13) and warns it must be set per data set. Here it
is a healthy operating point like the map thresholds: tau is the smallest value whose mean pixel FPR of
``c > tau`` on the healthy set (inside the brain mask) is at most ``fpr``. c is computed per image exactly as at
test time (:meth:`mask_statistic`, same per-dataset generator seeding as the evaluation's inference), never with
statistics pooled over a batch. The runner runs this task before every other and hands its product to the
evaluation context, which passes the value to every ``get_anomaly`` call (``mask_threshold=``; the model never
stores it), so every map of the evaluation uses the calibrated value.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from core.evaluation.context import EvalContext
from core.evaluation.registry import DatasetName, Fpr, TaskResult, register_task
from core.evaluation.thresholds import MaskCalibration
from model_zoo.base import MaskThresholdModel
from optim.metrics import segmentation


def _statistics(ctx: EvalContext, model: MaskThresholdModel, dataset: str) -> tuple[Tensor, Tensor | None]:
    """c and the brain masks of every image of ``dataset`` ([N,1,H,W] each, on the CPU)."""
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)  # as the evaluation's inference
    stats, masks = [], []
    for batch in ctx.data.eval_dataloader(dataset):
        stats.append(model.mask_statistic(batch.image.to(ctx.device), generator=generator).float().cpu())
        masks.append(None if batch.brain_mask is None else batch.brain_mask.cpu())
    if not stats:
        raise ValueError(f"mask_calibration: dataset {dataset!r} is empty")
    brain = None if any(m is None for m in masks) else torch.cat(masks)  # type: ignore[arg-type]
    return torch.cat(stats), brain


def _histogram(c: Tensor, keep: Tensor | None, value: float, fpr: float) -> Figure:
    values = (c[keep > 0.5] if keep is not None else c.flatten()).numpy()
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(values, bins=80, color="0.5")
    ax.axvline(value, color="tab:red", label=f"tau = {value:.4g} ({fpr:.0%} healthy FPR)")
    ax.set_yscale("log")
    ax.set_xlabel("c on healthy brain pixels")
    ax.legend()
    fig.tight_layout()
    return fig


@register_task("mask_calibration", provides=(MaskCalibration,))
def mask_calibration(ctx: EvalContext, *, dataset: DatasetName = "val", fpr: Fpr = 0.05,
                     use_brain_mask: bool = True) -> TaskResult:
    """The model's mask threshold at a healthy pixel FPR of its mask statistic c (saved as ``mask_threshold.json``).

    Args:
        dataset: the healthy set (the healthy validation split, 'val').
        fpr: target mean pixel FPR of the mask on healthy images (default 5 % of brain pixels).
        use_brain_mask: count only brain pixels when the set has brain masks.

    Raises:
        ValueError: the model has no calibratable mask threshold, or its threshold is fixed in the config.
    """
    model = ctx.model
    if not isinstance(model, MaskThresholdModel):
        raise ValueError(f"mask_calibration: {type(model).__name__} has no internal mask threshold to calibrate; "
                         "disable this block (enabled: false)")
    if not model.needs_mask_threshold:
        raise ValueError(f"mask_calibration: the model's mask threshold is set in the config "
                         f"({model.mask_threshold_rule['rule']}); set model.params.tau: calibrated, or disable this "
                         "block")
    model.eval()
    c, brain = _statistics(ctx, model, dataset)
    keep = brain if use_brain_mask else None
    point = segmentation.threshold_at_fpr(c, fpr, keep)
    model_info = {k: str(v) for k, v in model.provenance().items()}
    calibration = MaskCalibration(value=float(point.threshold), target_fpr=point.target_fpr,
                                  achieved_fpr=point.achieved_fpr, dataset=dataset, n_images=point.n_images,
                                  n_pixels=point.n_pixels, region=point.region, model=model_info,
                                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    metrics = {"mask_threshold": calibration.value, "achieved_fpr": calibration.achieved_fpr,
               "n_images": float(calibration.n_images), "c_median": float(np.median(c.numpy()))}
    note = (f"Mask threshold tau = {calibration.value:.4g} on c, calibrated on healthy set '{dataset}' "
            f"({calibration.n_images} images, {calibration.region} pixels) at {fpr:g} target FPR "
            f"(achieved {calibration.achieved_fpr:.4f}).")
    return TaskResult(metrics={dataset: metrics}, figures={"c_histogram": _histogram(c, keep, calibration.value, fpr)},
                      manifest={"mask_threshold": calibration.to_json()}, notes=[note], artifacts=(calibration,))
