"""Finding anomalies: detection (image level), segmentation (pixel level) and localization (object level)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from core.evaluation.context import EvalContext
from core.evaluation.per_image import PerImage
from core.evaluation.registry import DatasetName, DatasetNames, Fpr, TaskResult, register_task
from core.evaluation.tasks._examples import pick_examples
from core.evaluation.tasks.thresholding import fpr_tag
from core.evaluation.thresholds import Thresholds, operating_point
from dl_utils import visualization as vis
from optim.metrics import classification, localization, regions, resampled, segmentation


@register_task("detection")
def detection(ctx: EvalContext, *, datasets: DatasetNames = None, healthy: DatasetName = "healthy_test") -> TaskResult:
    """Image-level AUROC/AUPRC of the anomaly score: healthy set vs each pathological set and all pooled.

    Per image: ``score`` on the healthy set and every pathological set (with the constant ``healthy``: the set it
    was compared with).

    Args:
        datasets: pathological sets (default: every pathological test set).
        healthy: the unseen healthy test set (label 0).
    """
    ref = ctx.inference(healthy)
    result = TaskResult(per_image={healthy: PerImage.of_images(ref, {"score": ref.anomaly_score})})
    curves, scores = {}, {healthy: ref.anomaly_score.numpy()}
    pooled_s, pooled_y = [ref.anomaly_score], [ref.label]
    for name in ctx.resolve(datasets):
        if name == healthy or not ctx.info(name).pathological:
            continue
        inf = ctx.inference(name)
        s = torch.cat([ref.anomaly_score, inf.anomaly_score])
        y = torch.cat([ref.label, inf.label])
        result.metrics[name] = {**classification.image_level_metrics(s, y),
                                "score_mean": float(inf.anomaly_score.mean())}
        curves[name], scores[name] = (s.numpy(), y.numpy()), inf.anomaly_score.numpy()
        result.per_image[name] = PerImage.of_images(inf, {"score": inf.anomaly_score}, {"healthy": healthy})
        pooled_s.append(inf.anomaly_score)
        pooled_y.append(inf.label)
    if len(pooled_s) > 1:
        s, y = torch.cat(pooled_s), torch.cat(pooled_y)
        result.metrics["all_pathological"] = classification.image_level_metrics(s, y)
        curves["all_pathological"] = (s.numpy(), y.numpy())
    result.metrics[healthy] = {"score_mean": float(ref.anomaly_score.mean()), "n": float(len(ref))}
    result.figures["roc_pr"] = vis.roc_pr_figure(curves, title=f"image level vs {healthy}")
    result.figures["scores"] = vis.box_figure(scores, ylabel="anomaly score", title="image anomaly scores")
    return result


@register_task("segmentation")
def segmentation_task(ctx: EvalContext, *, datasets: DatasetNames = None, threshold: float | None = None,
                      fpr: Fpr = 0.05, region: Literal["brain", "all"] = "brain",
                      size_bins: Sequence[Sequence[float]] = segmentation.REFERENCE_SIZE_BINS,
                      n_examples: int = 4, aupro_fpr_limit: Fpr = 0.3, thresholds: Thresholds | None = None
                      ) -> TaskResult:
    """Pixel-level AUROC/AUPRC, AUPRO, Dice and TPR at the healthy thresholds, oracle best Dice, per lesion-size bin.

    ``tpr_pooled`` / ``tpr_per_image_mean``: the pixel sensitivity at the task's threshold; ``tpr_pooled_fpr<x>pct``
    at every healthy threshold. ``aupro``: the per-region overlap integrated up to ``aupro_fpr_limit``
    (:mod:`optim.metrics.regions`; ~limit/2 for a random map).

    Per image: the map's histograms on anomaly and healthy region pixels (``hist_anomaly``, ``hist_healthy`` on
    the dataset's ``hist_edges``; pooled, they give ``auroc_pooled`` to within ``hist_bound``, and a resample's
    pooled AUROC without the maps) and ``dice``.

    Args:
        datasets: sets to evaluate (default: every test set with anomaly masks).
        threshold: explicit operating point (overrides the healthy thresholds).
        fpr: which healthy threshold to use.
        region: 'brain' evaluates pixels in the brain mask or the anomaly mask (all pixels when the set has
            no brain mask); 'all' evaluates every pixel.
        size_bins: [low, high) lesion areas in pixels at 128x128, scaled with the image area.
        n_examples: example strips per dataset.
        aupro_fpr_limit: the pooled pixel FPR up to which AUPRO integrates (0.3, as MVTec AD and anomalib).
        thresholds: the healthy thresholds (handed over by the runner).
    """
    if region not in ("brain", "all"):
        raise ValueError(f"region {region!r} is not one of 'brain', 'all'")
    th, provenance = operating_point(thresholds, fpr=fpr, explicit=threshold)
    result = TaskResult(manifest={"segmentation_threshold": provenance})
    per_image_dice: dict[str, np.ndarray] = {}
    for name in ctx.resolve(datasets):
        if not ctx.info(name).has_anomaly_mask:
            continue
        inf = ctx.inference(name)
        roi = inf.evaluation_region(region)
        m = {"threshold": th, **segmentation.pixel_auroc_auprc(inf.anomaly_map, inf.anomaly_mask, roi),
             **segmentation.dice_at_threshold(inf.anomaly_map, inf.anomaly_mask, th, roi),
             **segmentation.best_dice(inf.anomaly_map, inf.anomaly_mask, roi),
             **regions.aupro(inf.anomaly_map, inf.anomaly_mask, roi, fpr_limit=aupro_fpr_limit),
             **regions.tpr_at_threshold(inf.anomaly_map, inf.anomaly_mask, th, roi)}
        for point in thresholds.points if thresholds is not None else ():
            tpr = regions.tpr_at_threshold(inf.anomaly_map, inf.anomaly_mask, point.threshold, roi)["tpr_pooled"]
            m[f"tpr_pooled_{fpr_tag(point.target_fpr)}"] = tpr
        dice = segmentation.dice_per_image(inf.anomaly_map, inf.anomaly_mask, th, roi)
        bins, scaled = segmentation.lesion_size_bin(inf.anomaly_mask, size_bins)
        for k, (lo, hi) in enumerate(scaled):
            tag = f"size_{lo:g}-{hi:g}px"
            inside = bins == k
            m[f"{tag}_n"] = float(inside.sum())
            m[f"{tag}_dice_mean"] = float(np.nanmean(dice[inside])) if inside.any() else float("nan")
            if inside.any():
                sub = torch.from_numpy(inside)
                binned = segmentation.pixel_auroc_auprc(inf.anomaly_map[sub], inf.anomaly_mask[sub],
                                                        None if roi is None else roi[sub])
                m[f"{tag}_auroc_pooled"], m[f"{tag}_auprc_pooled"] = binned["auroc_pooled"], binned["auprc_pooled"]
        result.metrics[name] = m
        hist = resampled.pixel_histograms(inf.anomaly_map, inf.anomaly_mask, roi)
        result.per_image[name] = PerImage.of_images(
            inf, {"hist_anomaly": hist.anomaly.astype(np.int32),
                                  "hist_healthy": hist.healthy.astype(np.int32), "dice": dice},
            {"hist_edges": hist.edges, "hist_bound": hist.bound})
        has_lesion = inf.anomaly_mask.flatten(1).sum(1).numpy() > 0
        per_image_dice[name] = dice[has_lesion & ~np.isnan(dice)]
        pick = pick_examples(len(inf), has_lesion, n_examples)
        result.figures[f"{name}/examples"] = vis.example_strip(inf, pick, threshold=th, title=name)
    if per_image_dice:
        result.figures["dice_per_image"] = vis.box_figure(per_image_dice, ylabel="Dice at healthy threshold",
                                                          title=f"per-image Dice (threshold {th:.4g})")
    result.notes.append(f"Threshold {th:.6g} ({provenance.get('source')}); 'oracle_*' = best over thresholds on the "
                        f"labelled test data: an upper bound, not a result; region '{region}'.")
    return result


@register_task("localization")
def localization_task(ctx: EvalContext, *, datasets: DatasetNames = None, threshold: float | None = None,
                      fpr: Fpr = 0.05, min_fraction: float = 0.1, thresholds: Thresholds | None = None
                      ) -> TaskResult:
    """The reference object-level metric (docs/methods.md#object-level-localisation) per class (= dataset) and pooled.

    'box' sets are scored exactly as the reference (one box per row, healthy mass over the healthy-tissue
    mask); 'pixel' sets use the lesion mask as the region (labelled 'pixel' in the table).

    Args:
        datasets: sets to evaluate (default: every test set with anomaly masks).
        threshold: explicit operating point; fpr: which healthy threshold to use otherwise.
        min_fraction: supra-threshold fraction of the region needed for a TP (0.1).
        thresholds: the healthy thresholds (handed over by the runner).
    """
    th, provenance = operating_point(thresholds, fpr=fpr, explicit=threshold)
    result = TaskResult(manifest={"localization_threshold": provenance})
    pooled: list[dict[str, np.ndarray]] = []
    rows = []
    for name in ctx.resolve(datasets):
        info = ctx.info(name)
        if not info.has_anomaly_mask:
            continue
        inf = ctx.inference(name)
        per = localization.localization_per_image(inf.anomaly_map, inf.anomaly_mask, inf.healthy_tissue, th,
                                                  min_fraction)
        summary = localization.localization_summary(per)
        result.metrics[name] = {"threshold": th, **summary}
        rows.append({"class": name, "annotation": info.annotation or "pixel", **summary})
        pooled.append(per)
    if pooled:
        merged = {k: np.concatenate([p[k] for p in pooled]) for k in pooled[0]}
        summary = localization.localization_summary(merged)
        result.metrics["all_classes"] = {"threshold": th, **summary}
        rows.append({"class": "all_classes", "annotation": "mixed", **summary})
        result.tables["per_class"] = rows
        result.figures["per_class"] = vis.per_class_bars(
            {r["class"]: {"F1": r["f1_mean"], "detected": r["n_detected"] / max(r["n_total"], 1.0)} for r in rows},
            title=f"localisation per class (threshold {th:.4g})")
    result.notes.append(f"Localisation: TP if > {min_fraction:g} of the region is supra-threshold; "
                        f"FP = floor(healthy mass / max(anomaly mass, 1)); threshold {th:.6g}.")
    return result
