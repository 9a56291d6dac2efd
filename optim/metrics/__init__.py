"""Pure metric functions: arrays/tensors in, floats or maps out; no I/O, no logging, inputs never mutated."""

from optim.metrics.classification import (
    auroc,
    average_precision,
    image_level_metrics,
    pr_curve,
    roc_curve,
    tpr_at_fpr,
)
from optim.metrics.conformal import (
    BinomialInterval,
    benjamini_hochberg,
    clopper_pearson,
    conformal_p_values,
    fpr_acceptance_interval,
    rejection_rate,
    uniformity_test,
    unit_scores,
)
from optim.metrics.distribution import GaussianStats, frechet_distance, kernel_inception_distance
from optim.metrics.localization import localization_per_image, localization_summary
from optim.metrics.normative import (
    ahi,
    ahi_equal_n,
    ahi_unclipped,
    caci,
    combined_score,
    harmonic_mean,
    masked_mean,
    rqi,
    ssim_maps,
    ssim_per_image,
)
from optim.metrics.regions import aupro, pro_curve, tpr_at_threshold
from optim.metrics.segmentation import (
    REFERENCE_SIZE_BINS,
    ThresholdResult,
    best_dice,
    dice_at_threshold,
    dice_per_image,
    fpr_at_threshold,
    lesion_size_bin,
    pixel_auroc_auprc,
    threshold_at_fpr,
)

__all__ = [
    "REFERENCE_SIZE_BINS", "BinomialInterval", "GaussianStats", "ThresholdResult", "ahi", "ahi_equal_n",
    "ahi_unclipped", "aupro",
    "auroc", "average_precision", "benjamini_hochberg", "best_dice", "caci", "clopper_pearson", "combined_score",
    "conformal_p_values", "dice_at_threshold", "dice_per_image", "fpr_acceptance_interval", "fpr_at_threshold",
    "frechet_distance",
    "harmonic_mean", "image_level_metrics", "kernel_inception_distance", "lesion_size_bin", "localization_per_image",
    "localization_summary", "masked_mean", "pixel_auroc_auprc", "pr_curve", "pro_curve", "rejection_rate",
    "roc_curve", "rqi", "ssim_maps", "ssim_per_image", "threshold_at_fpr", "tpr_at_fpr", "tpr_at_threshold",
    "uniformity_test", "unit_scores",
]
