"""The ``predict:`` block of a config (``experiment.task: predict``), validated like ``ExperimentSettings``.

YAML::

    experiment: {task: predict, weights: runs/.../checkpoints/best.pt}
    predict:
      inputs: [scans/, more/*.nii.gz, my_list.csv]   # folders, globs or split-style CSVs (column 'filename')
      masks: [brains/]                               # optional brain masks, expanded the same way, row-aligned
      axial_range: [40, 80]                          # optional, inclusive, canonical inferior->superior index
      fprs: [0.05]                                   # optional: which entries of the training thresholds.json
      threshold_values: null                         # or explicit thresholds (then the file is not needed)
      on_error: skip                                 # or stop
      output_dir: null                               # or a new/empty folder (overwrite: true to reuse one)
      fdr: 0.05                                      # flag scans at this false discovery rate (needs calibration)
      healthy: false                                 # true: the inputs are healthy; test for a domain shift
      format: standard                               # or mood: also MOOD challenge files (voxel/sample in [0,1])

Relative paths (inputs, masks, CSV rows, ``thresholds_file``, ``output_dir``) are resolved against the
repository root, as the data module does; ``output_dir`` defaults to ``predictions/`` in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from core.Configurator import ConfigError, check_keys, check_params
from data.preprocess import INTENSITY_RULES, Intensity

OnError = Literal["skip", "stop"]
OutputFormat = Literal["standard", "mood"]
FORMATS = ("standard", "mood")


@dataclass(frozen=True, kw_only=True)
class PredictSettings:
    """The ``predict:`` section.

    Attributes:
        inputs: folders (their supported files, not recursive), glob patterns or CSVs (header ``filename``).
            2-D PNG/JPEG/NPY/DICOM slices and 2-D or 3-D NIfTI volumes.
        masks: brain masks, expanded like ``inputs`` and paired with them in order (same count, same shape
            as their input); pixels outside the brain get map 0 and are never in a binary mask.
        axial_range: ``[first, last]`` axial slices of each 3-D volume (inclusive; index along the
            inferior-to-superior axis of the closest canonical orientation, as ``data.prepare`` counts);
            clipped to each volume; null = every slice.
        fprs: which healthy thresholds of ``thresholds_file`` to apply (e.g. ``[0.05]``); null = all of them
            (unless ``threshold_values`` is given).
        threshold_values: explicit thresholds (pixels with map > value are anomalous).
        thresholds_file: the training run's thresholds; null = ``thresholds.json`` next to the weights.
        output_dir: where maps, masks and ``scores.csv`` go; null = ``predictions/`` in the run folder. A folder
            that already holds anything is refused unless ``overwrite`` is true.
        overwrite: write into an ``output_dir`` that holds files: the outputs an earlier prediction recorded
            there (``predict_outputs.txt``) are removed first, other files stay (same-name outputs replace them).
        on_error: a bad input (whatever made it unreadable, 4-D, mask of another shape, no brain) is skipped
            (``'skip'``: one warning line, listed in ``skipped.csv`` and the summary) or ends the run with exit
            code 1 (``'stop'``). A run that predicts no input at all exits 1 either way.
        intensity: override of the training run's intensity rule (e.g. ``'percentile'`` for raw scans with a
            model trained on ``'unit'`` data); null = the checkpoint's rule.
        batch_size: slices per forward pass.
        n_overlays: overlays of the highest-scoring slices written per volume.
        calibration_file: the training run's healthy calibration (:mod:`core.prediction.calibrated`); null =
            ``calibration.json`` next to the weights when it exists. With one, ``scores.csv`` gains p-values,
            Benjamini-Hochberg q-values, the FDR flags and the intensity check.
        fdr: the false discovery rate at which scans are flagged (``flagged_fdr<f>``: q-value <= fdr).
        healthy: the inputs are known healthy scans: test their p-values for uniformity and warn of a domain
            shift when they are smaller (needs the calibration).
        format: ``'standard'`` (maps, masks, overlays, ``scores.csv``) or ``'mood'``: also the MOOD challenge's
            files, ``mood/pixel/<case>.nii.gz`` (voxel scores in [0, 1], the input's shape and affine) and
            ``mood/sample/<case>.nii.gz.txt`` (one sample score in [0, 1]), both mapped through the healthy
            calibration; NIfTI inputs only.
    """

    inputs: list[str]
    masks: list[str] | None = None
    axial_range: list[int] | None = None
    fprs: list[float] | None = None
    threshold_values: list[float] | None = None
    thresholds_file: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    on_error: OnError = "skip"
    intensity: Intensity | None = None
    batch_size: int = 16
    n_overlays: int = 3
    calibration_file: str | None = None
    fdr: float = 0.05
    healthy: bool = False
    format: OutputFormat = "standard"


def parse_predict(section: Any) -> PredictSettings:
    """Validate the ``predict:`` mapping strictly.

    Raises:
        ConfigError: naming the YAML path (``predict.<key>``) for an unknown key, a wrong type or a bad value.
    """
    names = [f.name for f in fields(PredictSettings)]
    section = check_keys(section, names, "predict", required=("inputs",))
    if isinstance(section.get("inputs"), str):  # `--set predict.inputs=scans/` means a one-item list
        section = {**section, "inputs": [section["inputs"]]}
    check_params(PredictSettings, section, "predict")
    settings = PredictSettings(**section)
    if not settings.inputs or not all(settings.inputs):
        raise ConfigError(f"predict.inputs: expected a non-empty list of folders, globs or CSVs, got {settings.inputs}")
    if settings.masks is not None and (not settings.masks or not all(settings.masks)):
        raise ConfigError(f"predict.masks: expected a non-empty list of folders, globs or CSVs, got {settings.masks}")
    if settings.axial_range is not None:
        rng = settings.axial_range
        if len(rng) != 2 or rng[0] < 0 or rng[1] < rng[0]:
            raise ConfigError(f"predict.axial_range: expected [first, last] with 0 <= first <= last, got {rng}")
    for fpr in settings.fprs or ():
        if not 0.0 < fpr < 1.0:
            raise ConfigError(f"predict.fprs: each FPR must be in (0, 1), got {fpr}")
    if settings.fprs is not None and not settings.fprs:
        raise ConfigError("predict.fprs: give at least one FPR, or null for all thresholds of the file")
    if settings.threshold_values is not None and not settings.threshold_values:
        raise ConfigError("predict.threshold_values: give at least one value, or null")
    if settings.intensity is not None and settings.intensity not in INTENSITY_RULES:
        raise ConfigError(f"predict.intensity: {settings.intensity!r} is not one of {', '.join(INTENSITY_RULES)}")
    if not 0.0 < settings.fdr < 1.0:
        raise ConfigError(f"predict.fdr: the false discovery rate must be in (0, 1), got {settings.fdr}")
    if settings.format not in FORMATS:
        raise ConfigError(f"predict.format: {settings.format!r} is not one of {', '.join(FORMATS)}")
    for key in ("batch_size", "n_overlays"):
        if getattr(settings, key) < (1 if key == "batch_size" else 0):
            raise ConfigError(f"predict.{key}: must be positive, got {getattr(settings, key)}")
    return settings
