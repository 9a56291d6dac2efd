"""How unusual is each predicted scan? Conformal p-values, Benjamini-Hochberg q-values and input checks.

The training run's ``score_calibration`` task wrote ``checkpoints/calibration.json``
(:class:`core.evaluation.thresholds.ScoreCalibration`): the anomaly scores of healthy validation slices and
subjects the model never saw, the healthy anomaly-map quantiles and the training data's intensity summary. With
it, a prediction says for every row of ``scores.csv``:

- ``p_value``: the conformal p-value of the row's score against the healthy calibration scores
  (:func:`optim.metrics.conformal.conformal_p_values`). Image and slice rows are compared with the calibration
  slices; a volume row's ``subject_score`` (its slices' scores aggregated by the calibration's rule, e.g. their
  mean) with the calibration subjects. For a healthy scan drawn like the calibration data, ``P(p <= alpha) <=
  alpha`` whatever the model; a volume's p-value assumes its slices were chosen as the calibration subjects'
  were (the same axial range), and the training run's preprocessing (no ``predict.intensity`` override).
- ``q_value``: Benjamini-Hochberg over the rows of one family, the *scans* (volume rows and 2-D image rows) or the
  *slices* of the volumes; ``flagged_fdr<f>`` = 1 when ``q <= predict.fdr``: flagging those keeps the expected
  fraction of healthy scans among the flagged ones at most f.
- ``intensity_check``: the preprocessed slices' intensity statistics against the training data's
  (:func:`optim.metrics.shift.out_of_range`); a scan outside them is named in a warning (another contrast, 8-bit
  values against [0, 1] training data, a wrong scaling rule).

With ``predict.healthy: true`` (the inputs are known healthy scans) the scans' p-values are tested for uniformity
(:func:`optim.metrics.conformal.uniformity_test`): p-values smaller than uniform mean the calibration does not
hold for these inputs (a domain shift), and a warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.Configurator import ConfigError
from core.evaluation.thresholds import ScoreCalibration
from core.prediction.settings import PredictSettings
from optim.metrics import conformal, shift

logger = logging.getLogger(__name__)

SCAN_KINDS = ("image", "volume")  # one row per input: the family of scan-level q-values
SHIFT_ALPHA = 0.01  # a uniformity-test p-value below this is reported as a domain shift


def load_calibration(settings: PredictSettings, weights: Path, root: Path) -> ScoreCalibration | None:
    """The training run's healthy calibration: ``predict.calibration_file``, else ``calibration.json`` beside the
    weights when it exists (None without one: no p-values are written).

    Raises:
        ConfigError: naming ``predict.calibration_file`` (missing or not a calibration file), or
            ``predict.format`` / ``predict.healthy`` when they need a calibration and there is none.
    """
    if settings.calibration_file is None:
        path = weights.parent / ScoreCalibration.FILE_NAME
        if not path.is_file():
            needs = "format" if settings.format == "mood" else "healthy" if settings.healthy else None
            if needs is not None:
                raise ConfigError(f"predict.{needs}: needs the training run's healthy calibration, and {path} does "
                                  "not exist; evaluate the weights with the score_calibration task first, or set "
                                  "predict.calibration_file")
            logger.info("predict: no %s beside the weights, so scores.csv has no p-values (run the "
                        "score_calibration evaluation task to get them)", path.name)
            return None
    else:
        path = Path(settings.calibration_file)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ConfigError(f"predict.calibration_file: {path} not found")
    try:
        calibration = ScoreCalibration.load(path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"predict.calibration_file: {path} is not a calibration file ({type(err).__name__}: "
                          f"{err})") from err
    if settings.format == "mood" and not calibration.pixel_quantiles:
        raise ConfigError(f"predict.format: 'mood' maps voxel scores into [0, 1] through the healthy map quantiles, "
                          f"and {path} has none; re-run the score_calibration task with this version")
    if settings.intensity is not None:
        logger.warning("predict: predict.intensity overrides the training run's scaling, so the p-values (from "
                       "healthy data scaled the training run's way) may not hold")
    logger.info("predict: p-values against %d healthy slices and %d subjects (rule %s) of '%s', from %s",
                len(calibration.image_scores), len(calibration.subject_scores), calibration.rule,
                calibration.dataset, path)
    return calibration


def intensity_flags(calibration: ScoreCalibration | None, inputs: np.ndarray) -> str:
    """``'mean 0.81 not in [0.12, 0.43]; ...'`` for statistics outside the training range, ``''`` when in range or
    the calibration has no intensity summary."""
    if calibration is None or not calibration.intensity:
        return ""
    flagged = shift.out_of_range(calibration.intensity, shift.slice_statistics(inputs))
    return "; ".join(f"{name} {value:.3g} not in [{low:.3g}, {high:.3g}]" for name, (value, low, high)
                     in flagged.items())


@dataclass(frozen=True)
class Flags:
    """What the p-values say about a prediction (for the summary line and the manifest).

    Attributes:
        fdr: the false discovery rate scans are flagged at.
        n_scans, n_flagged: scans (volume and 2-D image rows) and how many have ``q <= fdr``.
        flagged: their input files.
        uniformity_p: the uniformity test of the scans' p-values (``predict.healthy``), else None.
    """

    fdr: float
    n_scans: int
    n_flagged: int
    flagged: tuple[str, ...]
    uniformity_p: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"fdr": self.fdr, "n_scans": self.n_scans, "n_flagged": self.n_flagged, "flagged": list(self.flagged),
                "uniformity_p": self.uniformity_p}


def add_p_values(rows: list[dict[str, Any]], calibration: ScoreCalibration, *, fdr: float,
                 healthy: bool) -> Flags:
    """Fill ``p_value``, ``q_value`` and ``flagged_fdr<f>`` into every row of ``scores.csv`` (in place).

    Args:
        rows: :func:`core.prediction.outputs.score_rows` of every input; volume rows carry ``subject_score``.
        calibration: the healthy calibration.
        fdr: ``predict.fdr``.
        healthy: ``predict.healthy``: test the scans' p-values for uniformity and warn of a domain shift.
    """
    column = f"flagged_fdr{fdr:g}"
    flags = Flags(fdr=fdr, n_scans=0, n_flagged=0, flagged=())
    for family in ("scans", "slices"):
        members = [r for r in rows if (r["kind"] in SCAN_KINDS) == (family == "scans")]
        if not members:
            continue
        volume = np.array([r["kind"] == "volume" for r in members])
        p = np.empty(len(members))
        p[volume] = conformal.conformal_p_values(calibration.subject_scores,
                                                 [r["subject_score"] for r in members if r["kind"] == "volume"])
        p[~volume] = conformal.conformal_p_values(calibration.image_scores,
                                                  [r["score"] for r in members if r["kind"] != "volume"])
        q = conformal.benjamini_hochberg(p)
        for row, p_i, q_i in zip(members, p, q, strict=True):
            row["p_value"], row["q_value"], row[column] = float(p_i), float(q_i), int(q_i <= fdr)
        if family == "scans":
            flagged = tuple(r["input"] for r in members if r[column])
            uniformity = conformal.uniformity_test(p) if healthy else None
            flags = Flags(fdr=fdr, n_scans=len(members), n_flagged=len(flagged), flagged=flagged,
                          uniformity_p=uniformity)
    logger.info("predict: %d of %d scans flagged at FDR %g (Benjamini-Hochberg over conformal p-values)",
                flags.n_flagged, flags.n_scans, fdr)
    if flags.uniformity_p is not None:
        n = flags.n_scans
        if flags.uniformity_p < SHIFT_ALPHA:
            logger.warning("predict: domain shift: the %d healthy inputs' p-values are smaller than uniform "
                           "(one-sided KS test p = %.3g < %g): they score higher than the healthy calibration data, "
                           "so the p-values and thresholds do not hold for them (another scanner, contrast or "
                           "preprocessing?)", n, flags.uniformity_p, SHIFT_ALPHA)
        else:
            logger.info("predict: the %d healthy inputs' p-values are consistent with uniform (one-sided KS test "
                        "p = %.3g)%s", n, flags.uniformity_p, " (few scans: the test has little power)" if n < 20
                        else "")
    return flags


def unit_volume(calibration: ScoreCalibration, maps: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    """Voxel scores in [0, 1) for MOOD: the maps through the healthy map quantiles
    (:func:`optim.metrics.conformal.unit_scores`, strictly increasing, so every ranking and average precision is
    kept); 0 outside the brain mask."""
    unit = conformal.unit_scores(calibration.pixel_quantiles, maps)
    if brain is not None:
        unit = unit * brain
    return unit.astype(np.float32)


def unit_sample(calibration: ScoreCalibration, row: dict[str, Any]) -> float:
    """A scan's sample score in (0, 1) for MOOD, through the calibration scores of its kind (subjects for
    volumes, slices for 2-D inputs)."""
    if row["kind"] == "volume":
        return float(conformal.unit_scores(calibration.subject_scores, [row["subject_score"]])[0])
    return float(conformal.unit_scores(calibration.image_scores, [row["score"]])[0])


def check_mood_inputs(settings: PredictSettings, paths: list[Path]) -> None:
    """``predict.format: mood`` writes NIfTI; refuse other inputs before anything runs.

    Raises:
        ConfigError: naming ``predict.format`` and the first inputs that are not NIfTI.
    """
    if settings.format != "mood":
        return
    from data.readers import NIFTI_SUFFIXES

    other = [str(p) for p in paths if not str(p).lower().endswith(NIFTI_SUFFIXES)]
    if other:
        raise ConfigError(f"predict.format: 'mood' writes NIfTI volumes and needs NIfTI inputs; {len(other)} are "
                          f"not: {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}")
