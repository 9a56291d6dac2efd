"""Which thresholds a prediction run applies: the training run's healthy thresholds, chosen FPRs, or values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.Configurator import ConfigError
from core.evaluation.thresholds import Thresholds
from core.prediction.settings import PredictSettings

logger = logging.getLogger(__name__)

THRESHOLDS_FILE = Thresholds.FILE_NAME


@dataclass(frozen=True)
class Threshold:
    """One operating point: pixels with ``map > value`` are anomalous.

    Attributes:
        name: file-name and column friendly tag, ``'fpr0.05'`` (from the training run) or ``'value0.3'``.
        value: the threshold on the anomaly map.
        source: where it came from (the thresholds file, or ``'yaml'``).
    """

    name: str
    value: float
    source: str


def read_thresholds_file(path: Path) -> dict[str, float]:
    """The healthy thresholds a training run wrote: ``{fpr key ('0.05'): threshold}``.

    The file is read by :meth:`core.evaluation.thresholds.Thresholds.load`, the one reader of that format.

    Raises:
        ConfigError: the file is missing or not in that layout (naming the file).
    """
    if not path.is_file():
        raise ConfigError(f"predict.thresholds_file: {path} not found; run the 'thresholding' evaluation for these "
                          "weights, point predict.thresholds_file at the training run's file, or give "
                          "predict.threshold_values")
    try:
        saved = Thresholds.load(path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"predict.thresholds_file: {path} is not a thresholds file ({type(err).__name__}: {err})") \
            from err
    return {f"{fpr:g}": float(value) for fpr, value in saved.values.items()}


def select_thresholds(settings: PredictSettings, weights: Path, root: Path) -> list[Threshold]:
    """The thresholds to apply, in order: the chosen (or all) FPRs of the training file, then explicit values.

    Args:
        settings: the validated ``predict:`` block.
        weights: the checkpoint; its folder holds the default ``thresholds.json``.
        root: folder that a relative ``thresholds_file`` is resolved against.
    """
    out: list[Threshold] = []
    use_file = settings.fprs is not None or settings.threshold_values is None
    if use_file:
        if settings.thresholds_file is None:
            path = weights.parent / THRESHOLDS_FILE
        else:
            path = Path(settings.thresholds_file)
            path = path if path.is_absolute() else root / path
        saved = read_thresholds_file(path)
        keys = list(saved) if settings.fprs is None else [f"{f:g}" for f in settings.fprs]
        for key in keys:
            if key not in saved:
                raise ConfigError(f"predict.fprs: {path} has no threshold at fpr {key}; available: "
                                  f"{', '.join(saved) or '(none)'}")
            out.append(Threshold(name=f"fpr{key}", value=saved[key], source=str(path)))
    for value in settings.threshold_values or ():
        out.append(Threshold(name=f"value{value:g}", value=float(value), source="yaml"))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"predict: thresholds repeat ({', '.join(names)})")
    logger.info("predict: thresholds %s", ", ".join(f"{t.name}={t.value:.6g}" for t in out))
    return out
