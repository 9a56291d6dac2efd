"""Healthy operating points: the task that produces :class:`Thresholds`."""

from __future__ import annotations

from core.evaluation.context import EvalContext
from core.evaluation.registry import DatasetName, Fprs, TaskResult, register_task
from core.evaluation.thresholds import MaskCalibration, Thresholds
from optim.metrics import segmentation


def fpr_tag(fpr: float) -> str:
    """0.05 -> 'fpr5pct' (metric-key friendly)."""
    return f"fpr{fpr * 100:g}pct"


@register_task("thresholding", provides=(Thresholds,))
def thresholding(ctx: EvalContext, *, dataset: DatasetName = "val", fprs: Fprs = (0.01, 0.02, 0.05),
                 use_brain_mask: bool = True, calibration: MaskCalibration | None = None) -> TaskResult:
    """Healthy thresholds at target pixel FPRs; the runner saves them to ``checkpoints/thresholds.json``.

    Args:
        dataset: the healthy set the operating points come from (the healthy validation split, 'val').
        fprs: target mean pixel FPRs (each in (0,1); repeated values are computed once).
        use_brain_mask: count only brain pixels when the set has brain masks (the output says which).
        calibration: the model's calibrated mask threshold, when a ``mask_calibration`` block ran first; it is
            recorded with the thresholds (the maps depend on it).
    """
    inf = ctx.inference(dataset)
    foreground = inf.brain_mask if use_brain_mask else None
    points = tuple(segmentation.threshold_at_fpr(inf.anomaly_map, f, foreground) for f in dict.fromkeys(fprs))
    thresholds = Thresholds.from_results(dataset, points,
                                         None if calibration is None else calibration.to_json())
    metrics = {}
    for r in points:
        metrics[f"threshold_{fpr_tag(r.target_fpr)}"] = r.threshold
        metrics[f"achieved_fpr_{fpr_tag(r.target_fpr)}"] = r.achieved_fpr
    metrics["n_images"] = float(thresholds.n_images)
    note = f"Thresholds from healthy set '{dataset}' ({thresholds.n_images} images, {thresholds.region} pixels)."
    return TaskResult(metrics={dataset: metrics}, manifest={"thresholds": thresholds.provenance}, notes=[note],
                      artifacts=(thresholds,))
