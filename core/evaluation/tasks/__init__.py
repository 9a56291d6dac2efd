"""The registered evaluation tasks, one module per family (importing this package registers them all).

- :mod:`.calibration`: a model's internal mask threshold at a healthy FPR (AutoDDPM's tau).
- :mod:`.diagnostics`: samples from a model's prior, a diffusion model's reconstructions across noise levels.
- :mod:`.intermediates`: the model's intermediate images (figures; arrays with ``save_intermediates``).
- :mod:`.thresholding`: healthy operating points (:class:`core.evaluation.thresholds.Thresholds`).
- :mod:`.lesions`: detection (image level), segmentation (pixel level), localization (object level).
- :mod:`.normative`: RQI, AHI, CACI (restoration quality, distribution shift, conservation and correction).
- :mod:`.pvalues`: healthy calibration scores (:class:`core.evaluation.thresholds.ScoreCalibration`) and the
  validity and power of the conformal p-values.
- :mod:`.subjects`: per subject: detection, Dice, healthy false-positive rates; MOOD's volume-level APs.
"""

from core.evaluation.tasks import (
    calibration,
    diagnostics,
    intermediates,
    lesions,
    normative,
    pvalues,
    subjects,
    thresholding,
)

__all__ = [
    "calibration", "diagnostics", "intermediates", "lesions", "normative", "pvalues", "subjects", "thresholding",
]
