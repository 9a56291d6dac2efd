"""The registered evaluation tasks, one module per family (importing this package registers them all).

- :mod:`.thresholding`: healthy operating points (:class:`core.evaluation.thresholds.Thresholds`).
- :mod:`.lesions`: detection (image level), segmentation (pixel level), localization (object level).
- :mod:`.normative`: RQI, AHI, CACI (restoration quality, distribution shift, conservation and correction).
"""

from core.evaluation.tasks import lesions, normative, thresholding

__all__ = ["lesions", "normative", "thresholding"]
