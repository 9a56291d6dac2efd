"""Calibrated p-values: healthy calibration scores (:class:`ScoreCalibration`) and the check that they hold.

``score_calibration`` keeps the healthy validation set's image scores and subject scores. ``calibration_check``
turns the scores of the test sets into conformal p-values against them (:mod:`optim.metrics.conformal`) and
reports, at each nominal level alpha:

- on the healthy test set, the empirical false-positive rate (the fraction of healthy images / subjects with
  p <= alpha) with its Clopper-Pearson interval (``_low``, ``_high``: how well the test set pins the rate down),
  the interval in which a valid calibration puts it (``_accept_low``, ``_accept_high``: beta-binomial, the
  calibration set's own randomness included, :func:`optim.metrics.conformal.fpr_acceptance_interval`) and
  ``valid``: 1 when the empirical FPR lies inside the latter, else 0 (the check can fail: a healthy test set
  that scores higher than the calibration set, e.g. from another scanner, gives an FPR above it);
- on each pathological set, the power (the fraction with p <= alpha) with its interval.

Exchangeability: subject p-values are exactly valid when the test subjects are drawn like the calibration subjects;
slice p-values against slices of several subjects are valid marginally (each test slice is drawn like a
calibration slice) but the calibration slices are correlated within a subject, so their empirical FPR scatters
more than a binomial interval says. Both are reported; the subject level is the one to rely on.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import numpy as np

from core.evaluation.context import EvalContext
from core.evaluation.registry import (
    Between,
    DatasetName,
    DatasetNames,
    Fprs,
    OptionalDatasetName,
    TaskResult,
    register_task,
)
from core.evaluation.tasks.subjects import Quantile
from core.evaluation.thresholds import ScoreCalibration
from dl_utils import visualization as vis
from optim.metrics import conformal, shift
from optim.metrics import subjects as per_subject

Level = Annotated[float, Between(0.0, 1.0)]
PIXEL_QUANTILES = 1001  # 0, 0.1 %, ..., 100 % of the healthy maps' brain-pixel values


def alpha_tag(alpha: float) -> str:
    """0.05 -> 'alpha5pct' (metric-key friendly)."""
    return f"alpha{alpha * 100:g}pct"


@register_task("score_calibration", provides=(ScoreCalibration,))
def score_calibration(ctx: EvalContext, *, dataset: DatasetName = "val", reference: OptionalDatasetName = "train",
                      aggregation: Literal["mean", "max", "quantile"] = "mean", quantile: Quantile = 0.9
                      ) -> TaskResult:
    """Keep the healthy calibration scores; the runner saves them to ``checkpoints/calibration.json``.

    Besides the image and subject scores it keeps 1001 quantiles of the healthy maps' values inside the brain (the
    reference of voxel scores in [0, 1]) and the intensity summary of ``reference`` (what ``predict`` checks new
    inputs against, :mod:`optim.metrics.shift`).

    Args:
        dataset: the healthy set never seen in training (the healthy validation split, 'val').
        reference: the training split, loaded without augmentation (its preprocessed intensities); None: no
            intensity summary (``predict`` then cannot check its inputs).
        aggregation, quantile: how a subject's score is made from its slices' scores (mean, max or a quantile).
    """
    inf = ctx.inference(dataset)
    _, subject_scores = per_subject.aggregate_scores(inf.anomaly_score, inf.subject, aggregation, quantile)
    values = inf.anomaly_map if inf.brain_mask is None else inf.anomaly_map[inf.brain_mask > 0.5]
    pixels = np.quantile(values.flatten().double().numpy(), np.linspace(0.0, 1.0, PIXEL_QUANTILES))
    intensity = None
    if reference is not None:
        intensity = shift.training_summary(shift.slice_statistics(ctx.images(reference).image))
    calibration = ScoreCalibration(dataset=dataset, image_scores=tuple(inf.anomaly_score.tolist()),
                                   subject_scores=tuple(subject_scores.tolist()), aggregation=aggregation,
                                   quantile=quantile, model=ctx.model_settings(), pixel_quantiles=tuple(pixels),
                                   intensity=intensity, intensity_dataset=reference or "",
                                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    n_images, n_subjects = len(calibration.image_scores), len(calibration.subject_scores)
    metrics = {"n_images": float(n_images), "n_subjects": float(n_subjects),
               "min_p_image": 1.0 / (n_images + 1), "min_p_subject": 1.0 / (n_subjects + 1)}
    note = (f"Calibration scores from '{dataset}': {n_images} images, {n_subjects} subjects (subject score: "
            f"{calibration.rule}); the smallest possible p-value is 1/(n+1): {metrics['min_p_image']:.3g} per image, "
            f"{metrics['min_p_subject']:.3g} per subject.")
    return TaskResult(metrics={dataset: metrics}, manifest={"calibration": calibration.provenance}, notes=[note],
                      artifacts=(calibration,))


def _rates(p: np.ndarray, alphas: tuple[float, ...], confidence: float, what: str) -> dict[str, float]:
    """``<what>_<alpha tag>`` (the rejection rate), ``_low``, ``_high`` per alpha, and ``<what>_n``."""
    out = {}
    for alpha in alphas:
        rate = conformal.rejection_rate(p, alpha, confidence)
        key = f"{what}_{alpha_tag(alpha)}"
        out.update({key: rate.estimate, f"{key}_low": rate.low, f"{key}_high": rate.high})
    return {**out, f"{what}_n": float(p.size)}


@register_task("calibration_check")
def calibration_check(ctx: EvalContext, *, healthy: DatasetName = "healthy_test", datasets: DatasetNames = None,
                      alphas: Fprs = (0.01, 0.05, 0.1), confidence: Level = 0.95,
                      calibration: ScoreCalibration | None = None) -> TaskResult:
    """Empirical FPR of the calibrated p-values on the healthy test set (a validity check) and power per pathology.

    Args:
        healthy: the unseen healthy test set.
        datasets: pathological sets (default: every pathological test set).
        alphas: nominal levels, each in (0, 1).
        confidence: level of the Clopper-Pearson intervals.
        calibration: the healthy calibration scores (handed over by the runner).
    """
    if calibration is None:
        raise FileNotFoundError(f"calibration_check: no calibration scores (none computed in this run, no "
                                f"{ScoreCalibration.FILE_NAME} next to the checkpoint); enable a 'score_calibration' "
                                "task (it runs first)")
    alphas = tuple(dict.fromkeys(float(a) for a in alphas))
    result = TaskResult(manifest={"calibration": {"source": calibration.source, **calibration.provenance}})
    healthy_p: dict[str, np.ndarray] = {}
    for name in [healthy, *(n for n in ctx.resolve(datasets) if n != healthy and ctx.info(n).pathological)]:
        inf = ctx.inference(name)
        _, subject_scores = per_subject.aggregate_scores(inf.anomaly_score, inf.subject, calibration.aggregation,
                                                         calibration.quantile)
        p_image = conformal.conformal_p_values(calibration.image_scores, inf.anomaly_score)
        p_subject = conformal.conformal_p_values(calibration.subject_scores, subject_scores)
        kind = "fpr" if name == healthy else "power"
        metrics = {**_rates(p_image, alphas, confidence, f"image_{kind}"),
                   **_rates(p_subject, alphas, confidence, f"subject_{kind}")}
        if name == healthy:
            for level, p, n in (("image", p_image, len(calibration.image_scores)),
                                ("subject", p_subject, len(calibration.subject_scores))):
                for alpha in alphas:
                    key = f"{level}_fpr_{alpha_tag(alpha)}"
                    low, high = conformal.fpr_acceptance_interval(n, p.size, alpha, confidence)
                    metrics.update({f"{key}_accept_low": low, f"{key}_accept_high": high,
                                    f"{level}_valid_{alpha_tag(alpha)}": float(low <= metrics[key] <= high)})
            healthy_p = {"image": p_image, "subject": p_subject}
        result.metrics[name] = metrics
    result.figures["healthy_p_values"] = vis.p_value_figure(healthy_p, alphas, title=f"p-values on '{healthy}'")
    fails = [f"{level} alpha {a:g}" for level in ("image", "subject") for a in alphas
             if not result.metrics[healthy][f"{level}_valid_{alpha_tag(a)}"]]
    result.notes.append(
        f"Conformal p-values against '{calibration.dataset}' ({len(calibration.image_scores)} images, "
        f"{len(calibration.subject_scores)} subjects, subject score {calibration.rule}; {calibration.source}). "
        f"On '{healthy}': the empirical FPR at each alpha with its {confidence:.0%} Clopper-Pearson interval and the "
        f"{confidence:.0%} range a valid calibration gives it (beta-binomial); "
        + (f"outside that range (the calibration does not hold): {', '.join(fails)}." if fails else
           "inside that range at every alpha."))
    return result
