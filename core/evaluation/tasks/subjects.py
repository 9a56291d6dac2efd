"""Per-subject evaluation: subject-level detection, per-subject Dice, per-subject healthy false-positive rates, and
the MOOD challenge's volume-level average precisions.

A subject is a group of slices with one ``subject`` id (the split CSV's column, :mod:`data.dataset`); a set whose
CSVs name no subjects has one subject per image (its path), which every task says in its notes. Box-annotated
sets (one row per box, the same image repeated) have no per-subject Dice or voxel AP: boxes are no segmentation.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np

from core.evaluation.context import EvalContext, Inference
from core.evaluation.registry import Between, DatasetName, DatasetNames, Fpr, TaskResult, register_task
from core.evaluation.tasks.thresholding import fpr_tag
from core.evaluation.thresholds import Thresholds, operating_point
from dl_utils import visualization as vis
from optim.metrics import classification
from optim.metrics import subjects as per_subject

Quantile = Annotated[float, Between(0.0, 1.0)]


def _subjects_note(ctx: EvalContext, names: list[str]) -> str:
    """Which sets name their subjects and which count each image as a subject."""
    named = [n for n in names if ctx.info(n).has_subjects]
    unnamed = [n for n in names if n not in named]
    parts = [f"subjects from the 'subject' column: {', '.join(named)}"] if named else []
    parts += [f"no subject column, each image is its own subject: {', '.join(unnamed)}"] if unnamed else []
    return "Subjects: " + "; ".join(parts) + "."


def _n_subjects(inf: Inference) -> float:
    return float(len(set(inf.subject)))


@register_task("subject_detection")
def subject_detection(ctx: EvalContext, *, datasets: DatasetNames = None, healthy: DatasetName = "healthy_test",
                      aggregation: Literal["mean", "max", "quantile"] = "mean", quantile: Quantile = 0.9
                      ) -> TaskResult:
    """Subject-level AUROC/AUPRC: each subject's score aggregates its slices' anomaly scores.

    ``all_pathological`` pools every pathological set against the healthy subjects: its ``auprc`` is MOOD's
    sample-level metric (average precision over the case scores), reported as ``mood_sample_ap``.

    Args:
        datasets: pathological sets (default: every pathological test set).
        healthy: the unseen healthy test set (label 0).
        aggregation: 'mean', 'max' or 'quantile' of a subject's slice scores (recorded in the manifest).
        quantile: the quantile used by 'quantile', in (0, 1).
    """
    rule = aggregation if aggregation != "quantile" else f"quantile {quantile:g}"
    ref = ctx.inference(healthy)
    _, healthy_scores = per_subject.aggregate_scores(ref.anomaly_score, ref.subject, aggregation, quantile)
    result = TaskResult(manifest={"subject_score": f"{rule} of the subject's slice anomaly scores"})
    scores: dict[str, np.ndarray] = {healthy: healthy_scores}
    used = [healthy]
    for name in ctx.resolve(datasets):
        if name == healthy or not ctx.info(name).pathological:
            continue
        inf = ctx.inference(name)
        _, scores[name] = per_subject.aggregate_scores(inf.anomaly_score, inf.subject, aggregation, quantile)
        y = np.r_[np.zeros(healthy_scores.size), np.ones(scores[name].size)]
        result.metrics[name] = classification.image_level_metrics(np.r_[healthy_scores, scores[name]], y)
        used.append(name)
    if len(scores) > 1:
        pathological = np.concatenate([s for n, s in scores.items() if n != healthy])
        y = np.r_[np.zeros(healthy_scores.size), np.ones(pathological.size)]
        pooled = classification.image_level_metrics(np.r_[healthy_scores, pathological], y)
        result.metrics["all_pathological"] = {**pooled, "mood_sample_ap": pooled["auprc"]}
    result.metrics[healthy] = {"n_subjects": float(healthy_scores.size), "n_slices": float(len(ref))}
    result.figures["subject_scores"] = vis.box_figure(scores, ylabel=f"subject score ({rule})",
                                                      title="subject anomaly scores")
    result.notes.append(f"Subject score: {rule} of its slices' anomaly scores. {_subjects_note(ctx, used)}")
    return result


@register_task("subject_segmentation")
def subject_segmentation(ctx: EvalContext, *, datasets: DatasetNames = None, healthy: DatasetName = "healthy_test",
                         threshold: float | None = None, fpr: Fpr = 0.05, region: Literal["brain", "all"] = "brain",
                         thresholds: Thresholds | None = None) -> TaskResult:
    """Per-subject Dice at the healthy threshold (pooled over a subject's slices) as a distribution, and MOOD's
    voxel-level average precision.

    ``mood_voxel_ap``: the average precision of the anomaly map over every pixel of every case, the set's subjects
    and the healthy test subjects pooled (all pixels, no brain mask: as MOOD scores volumes); ``all_annotated``
    pools every set's subjects.

    Args:
        datasets: sets to evaluate (default: every test set with pixel-level anomaly masks).
        healthy: the healthy test set whose cases enter the voxel AP as negatives.
        threshold: explicit operating point (overrides the healthy thresholds); fpr: which healthy threshold.
        region: 'brain' counts the Dice inside brain mask OR anomaly mask, 'all' every pixel.
        thresholds: the healthy thresholds (handed over by the runner).
    """
    th, provenance = operating_point(thresholds, fpr=fpr, explicit=threshold)
    result = TaskResult(manifest={"subject_segmentation_threshold": provenance})
    ref = ctx.inference(healthy)
    negatives = ref.anomaly_map.flatten().numpy()
    dice: dict[str, np.ndarray] = {}
    maps, labels = [], []
    for name in ctx.resolve(datasets):
        info = ctx.info(name)
        if not info.has_anomaly_mask:
            continue
        if info.annotation == "box":
            result.notes.append(f"{name}: box annotations, no per-subject Dice or voxel AP.")
            continue
        inf = ctx.inference(name)
        _, dice[name] = per_subject.dice_per_subject(inf.anomaly_map, inf.anomaly_mask, inf.subject, th,
                                                     inf.evaluation_region(region))
        maps.append(inf.anomaly_map.flatten().numpy())
        labels.append(inf.anomaly_mask.flatten().numpy())
        voxel_ap = classification.average_precision(np.r_[negatives, maps[-1]],
                                                    np.r_[np.zeros(negatives.size), labels[-1]])
        result.metrics[name] = {"threshold": th, **per_subject.distribution(dice[name], "dice_subject_"),
                                "mood_voxel_ap": voxel_ap}
    if dice:
        all_dice = np.concatenate(list(dice.values()))
        voxel_ap = classification.average_precision(np.r_[negatives, *maps],
                                                    np.r_[np.zeros(negatives.size), *labels])
        result.metrics["all_annotated"] = {"threshold": th, **per_subject.distribution(all_dice, "dice_subject_"),
                                           "mood_voxel_ap": voxel_ap}
        result.figures["dice_per_subject"] = vis.box_figure(dice, ylabel="Dice per subject at healthy threshold",
                                                            title=f"per-subject Dice (threshold {th:.4g})")
    result.notes.append(f"Dice per subject pooled over its slices at threshold {th:.6g} ({provenance.get('source')}), "
                        f"region '{region}'; MOOD voxel AP over all pixels with '{healthy}' as negative cases. "
                        f"{_subjects_note(ctx, [healthy, *dice])}")
    return result


@register_task("healthy_fpr")
def healthy_fpr(ctx: EvalContext, *, dataset: DatasetName = "healthy_test", thresholds: Thresholds | None = None
                ) -> TaskResult:
    """The false-positive rate of each healthy test subject at every healthy threshold, as a distribution.

    A subject's FPR is its false-positive pixels over its counted pixels, pooled over its slices (brain pixels
    when the thresholds counted brain pixels, else all). Per threshold (``fpr<x>pct`` = its target FPR on the
    healthy validation set): median, quartiles, IQR, mean, max of the subjects' FPRs, ``any_fp``: the fraction of
    healthy subjects with at least one false-positive pixel, and ``pooled``: all false positives over all counted
    pixels.

    Args:
        dataset: the unseen healthy test set.
        thresholds: the healthy thresholds (handed over by the runner).
    """
    if thresholds is None:
        raise FileNotFoundError(f"healthy_fpr: no healthy thresholds (none computed in this run, no "
                                f"{Thresholds.FILE_NAME} next to the checkpoint); enable a 'thresholding' task")
    inf = ctx.inference(dataset)
    foreground = inf.brain_mask if thresholds.region == "foreground" else None
    counted = float(inf.anomaly_map.numel() if foreground is None else (foreground > 0.5).sum())
    metrics: dict[str, float] = {"n_subjects": _n_subjects(inf), "n_slices": float(len(inf))}
    fprs, targets = {}, {}
    for point in thresholds.points:
        tag = fpr_tag(point.target_fpr)
        _, rates, false_pos = per_subject.fpr_per_subject(inf.anomaly_map, inf.subject, point.threshold, foreground)
        metrics.update(per_subject.distribution(rates, f"{tag}_"))
        metrics[f"{tag}_any_fp"] = float((false_pos > 0).mean())
        metrics[f"{tag}_pooled"] = float(false_pos.sum() / counted)
        fprs[tag], targets[tag] = rates, point.target_fpr
    figure = vis.subject_fpr_figure(fprs, targets, title=f"per-subject healthy FPR ({dataset})")
    counted_region = "all" if foreground is None else "brain"
    mismatch = " (the thresholds counted brain pixels, but this set has no brain masks)" if (
        thresholds.region == "foreground" and foreground is None) else ""
    return TaskResult(metrics={dataset: metrics}, figures={"fpr_per_subject": figure},
                      notes=[f"Per-subject FPR on '{dataset}' ({counted_region} pixels{mismatch}) at the thresholds "
                             f"from '{thresholds.dataset}'. {_subjects_note(ctx, [dataset])}"])
