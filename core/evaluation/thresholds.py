"""Healthy operating points as data: the :class:`Thresholds` the ``thresholding`` task produces (and the
:class:`MaskCalibration` and :class:`ScoreCalibration` artifacts beside them).

File format (``checkpoints/thresholds.json``; :meth:`Thresholds.save` / :meth:`Thresholds.load` are its only
writer and reader)::

    {"provenance": {"dataset": "val", "n_images": 120, "region": "foreground",
                    "rule": "pixel anomalous iff map > threshold; ...", "created": "2026-11-28T19:40:00+0000"},
     "thresholds": {"0.01": {"threshold": 0.41, "target_fpr": 0.01, "achieved_fpr": 0.0099,
                             "region": "foreground", "n_images": 120, "n_pixels": 812345}, ...}}

The keys of ``thresholds`` are ``f"{fpr:g}"`` (JSON keys are strings); in memory the operating points are
indexed by their float ``target_fpr``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optim.metrics.segmentation import ThresholdResult

if TYPE_CHECKING:
    from model_zoo.base import MaskThresholdModel

RULE = "pixel anomalous iff map > threshold; FPR = mean over images of the pixel FPR"


def _write_json(path: str | Path, content: Mapping[str, Any]) -> str:
    """Write ``content`` as indented JSON (creating the folder); returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))
    return str(path)


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Thresholds at target mean pixel FPRs on a healthy set, with their provenance.

    Attributes:
        dataset: the healthy set they come from (normally 'val').
        region: 'foreground' (brain-mask pixels counted) or 'all'.
        n_images: healthy images used.
        points: one :class:`ThresholdResult` per target FPR (distinct ``target_fpr`` values, in request order).
        rule: how a pixel is called anomalous and how the FPR is averaged.
        created: when they were computed (ISO 8601, local time with offset).
        source: where they were last saved to or loaded from ('computed' before that).
    """

    FILE_NAME: ClassVar[str] = "thresholds.json"

    dataset: str
    region: Literal["foreground", "all"]
    n_images: int
    points: tuple[ThresholdResult, ...]
    rule: str = RULE
    created: str = ""
    source: str = "computed"
    mask_threshold: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("Thresholds: at least one operating point is needed")
        keys = [f"{p.target_fpr:g}" for p in self.points]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Thresholds: target FPRs must be distinct, got {', '.join(keys)}")

    @classmethod
    def from_results(cls, dataset: str, results: tuple[ThresholdResult, ...],
                     mask_threshold: Mapping[str, Any] | None = None) -> Thresholds:
        """Bundle :func:`optim.metrics.segmentation.threshold_at_fpr` results computed on ``dataset`` now.

        ``mask_threshold``: the calibrated internal mask threshold the maps were computed with, if any.
        """
        first = results[0]
        return cls(dataset=dataset, region=first.region, n_images=first.n_images, points=results,
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), mask_threshold=mask_threshold)

    @property
    def values(self) -> dict[float, float]:
        """``{target FPR: threshold}``."""
        return {p.target_fpr: p.threshold for p in self.points}

    @property
    def provenance(self) -> dict[str, str | int]:
        return {"dataset": self.dataset, "n_images": self.n_images, "region": self.region, "rule": self.rule,
                "created": self.created}

    def at(self, fpr: float) -> ThresholdResult:
        """The operating point computed for target FPR ``fpr``.

        Raises:
            ValueError: no point at that FPR, listing the available ones.
        """
        for point in self.points:
            if math.isclose(point.target_fpr, fpr, rel_tol=1e-9, abs_tol=0.0):
                return point
        raise ValueError(f"{self.source}: no threshold at fpr {fpr:g}; available: "
                         f"{', '.join(f'{p.target_fpr:g}' for p in self.points)} "
                         "(add it to the thresholding task's 'fprs')")

    def operating_point(self, fpr: float) -> tuple[float, dict[str, Any]]:
        """The threshold at ``fpr`` and its provenance (source file, healthy set, achieved FPR, ...)."""
        point = self.at(fpr)
        return float(point.threshold), {"source": self.source, **self.provenance, **point.to_dict()}

    def to_json(self) -> dict[str, Any]:
        saved: dict[str, Any] = {"provenance": self.provenance,
                                 "thresholds": {f"{p.target_fpr:g}": p.to_dict() for p in self.points}}
        if self.mask_threshold is not None:
            saved["mask_threshold"] = dict(self.mask_threshold)
        return saved

    def save(self, path: str | Path) -> Thresholds:
        """Write the JSON file (creating its folder); returns the same thresholds with ``source`` = ``path``."""
        return replace(self, source=_write_json(path, self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        """Read a file written by :meth:`save` (files without ``created`` load with an empty one)."""
        path = Path(path)
        saved = json.loads(path.read_text())
        provenance: Mapping[str, Any] = saved["provenance"]
        points = tuple(ThresholdResult(**entry) for entry in saved["thresholds"].values())
        return cls(dataset=provenance["dataset"], region=provenance["region"], n_images=int(provenance["n_images"]),
                   points=points, rule=provenance.get("rule", RULE), created=provenance.get("created", ""),
                   source=str(path), mask_threshold=saved.get("mask_threshold"))


def operating_point(thresholds: Thresholds | None, *, fpr: float, explicit: float | None
                    ) -> tuple[float, dict[str, Any]]:
    """A task's threshold: ``explicit`` (from YAML) if given, else the healthy one at ``fpr``.

    Raises:
        FileNotFoundError: neither an explicit value nor thresholds (no thresholding task ran, and no
            ``thresholds.json`` of an earlier evaluation lies next to the checkpoint).
    """
    if explicit is not None:
        return float(explicit), {"source": "yaml", "threshold": float(explicit)}
    if thresholds is None:
        raise FileNotFoundError(
            f"no healthy thresholds (none computed in this run, no {Thresholds.FILE_NAME} next to the checkpoint); "
            "enable a 'thresholding' task (it runs first) or give 'threshold' in the task's params")
    return thresholds.operating_point(fpr)


@dataclass(frozen=True, kw_only=True)
class MaskCalibration:
    """A model's internal mask threshold (AutoDDPM's tau on c) calibrated on healthy data, with provenance.

    File format (``checkpoints/mask_threshold.json``; :meth:`save` / :meth:`load` are its only writer and reader;
    the same entry is copied into ``thresholds.json`` under ``"mask_threshold"``)::

        {"value": 0.21, "target_fpr": 0.05, "achieved_fpr": 0.0499, "dataset": "val", "n_images": 60,
         "n_pixels": 123456, "region": "foreground", "rule": "...", "model": {"perceptual": "..."}, "created": "..."}

    Attributes:
        value: the threshold: pixels with c > value are masked (then dilated) and re-sampled.
        target_fpr, achieved_fpr: requested and achieved mean pixel FPR of ``c > value`` on the healthy set.
        dataset, n_images, n_pixels, region: the healthy set and the pixels counted.
        model: the model's own provenance of c (perceptual backend, inference label).
        created: when it was computed; source: where it was last saved to or loaded from.
    """

    FILE_NAME: ClassVar[str] = "mask_threshold.json"

    value: float
    target_fpr: float
    achieved_fpr: float
    dataset: str
    n_images: int
    n_pixels: int
    region: Literal["foreground", "all"]
    model: Mapping[str, Any]
    rule: str = RULE.replace("map", "c", 1)
    created: str = ""
    source: str = "computed"

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "target_fpr": self.target_fpr, "achieved_fpr": self.achieved_fpr,
                "dataset": self.dataset, "n_images": self.n_images, "n_pixels": self.n_pixels,
                "region": self.region, "rule": self.rule, "model": dict(self.model), "created": self.created}

    def save(self, path: str | Path) -> MaskCalibration:
        """Write the JSON file (creating its folder); returns the same calibration with ``source`` = ``path``."""
        return replace(self, source=_write_json(path, self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> MaskCalibration:
        saved = json.loads(Path(path).read_text())
        return cls(**{**saved, "source": str(path)})


def describe_mask_threshold(model: MaskThresholdModel, calibration: MaskCalibration | None) -> str:
    """The mask threshold a run uses, for manifests and reports: ``"calibrated: 0.2134 at FPR 0.05 on 'val' (60
    images)"`` (``"calibrated: not set yet"`` without a calibration) or the configured rule
    (``"rule=fixed, value=0.13, source=config"``)."""
    if not model.needs_mask_threshold:
        return ", ".join(f"{k}={v}" for k, v in model.mask_threshold_rule.items())
    if calibration is None:
        return "calibrated: not set yet"
    return (f"calibrated: {calibration.value:.4g} at FPR {calibration.target_fpr} on '{calibration.dataset}' "
            f"({calibration.n_images} images)")


@dataclass(frozen=True, kw_only=True)
class ScoreCalibration:
    """Healthy calibration scores for conformal p-values (:func:`optim.metrics.conformal.conformal_p_values`).

    File format (``checkpoints/calibration.json``, beside ``thresholds.json``; :meth:`save` / :meth:`load` are its
    only writer and reader)::

        {"provenance": {"dataset": "val", "n_images": 60, "n_subjects": 20, "aggregation": "mean",
                        "quantile": 0.9, "score": "...", "model": {...}, "intensity_dataset": "train",
                        "created": "..."},
         "image_scores": [0.011, ...], "subject_scores": [0.012, ...], "pixel_quantiles": [0.0, ...],
         "intensity": {"mean": [0.21, 0.33], "p50": [...], ...}}

    Attributes:
        dataset: the healthy set the scores come from (the healthy validation split, never seen in training).
        image_scores: every slice's anomaly score, sorted increasingly.
        subject_scores: every subject's score (its slices' scores aggregated by ``aggregation``), sorted.
        aggregation: 'mean', 'max' or 'quantile' (with ``quantile``): how a subject's score is made; p-values of
            new subjects must aggregate their slices the same way (:meth:`subject_score`).
        quantile: the quantile of the 'quantile' rule.
        score: what the score is (the model's image anomaly score).
        model: the model's settings the scores depend on (inference label, backends, a calibrated mask threshold).
        pixel_quantiles: 1001 quantiles (0, 0.1 %, ..., 100 %) of the healthy set's anomaly-map values inside its
            brain masks (all pixels without masks), sorted: the reference that maps voxel scores into [0, 1]
            (:func:`optim.metrics.conformal.unit_scores`); empty when not computed.
        intensity: the training data's intensity summary (:func:`optim.metrics.shift.training_summary`) that new
            inputs are checked against; None when not computed.
        intensity_dataset: the set it was computed on (the training split).
        created: when it was computed; source: where it was last saved to or loaded from.
    """

    FILE_NAME: ClassVar[str] = "calibration.json"

    dataset: str
    image_scores: tuple[float, ...]
    subject_scores: tuple[float, ...]
    aggregation: Literal["mean", "max", "quantile"]
    quantile: float = 0.9
    score: str = "the model's image anomaly score (AnomalyOutput.anomaly_score)"
    model: Mapping[str, Any] | None = None
    pixel_quantiles: tuple[float, ...] = ()
    intensity: Mapping[str, list[float]] | None = None
    intensity_dataset: str = ""
    created: str = ""
    source: str = "computed"

    def __post_init__(self) -> None:
        for name in ("image_scores", "subject_scores", "pixel_quantiles"):
            values = getattr(self, name)
            if (not values and name != "pixel_quantiles") or not all(math.isfinite(v) for v in values):
                raise ValueError(f"ScoreCalibration.{name}: needs at least one score, all finite ({self.source})")
            object.__setattr__(self, name, tuple(sorted(float(v) for v in values)))

    @property
    def rule(self) -> str:
        """The subject aggregation as text, e.g. 'mean' or 'quantile 0.9'."""
        return self.aggregation if self.aggregation != "quantile" else f"quantile {self.quantile:g}"

    def subject_score(self, slice_scores: Any) -> float:
        """A new subject's score from its slices' scores, by the calibration's rule."""
        from optim.metrics.subjects import aggregate_scores

        values = list(slice_scores)
        return float(aggregate_scores(values, ["s"] * len(values), self.aggregation, self.quantile)[1][0])

    @property
    def provenance(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "n_images": len(self.image_scores), "n_subjects": len(self.subject_scores),
                "aggregation": self.aggregation, "quantile": self.quantile, "score": self.score,
                "model": dict(self.model or {}), "intensity_dataset": self.intensity_dataset, "created": self.created}

    def to_json(self) -> dict[str, Any]:
        return {"provenance": self.provenance, "image_scores": list(self.image_scores),
                "subject_scores": list(self.subject_scores), "pixel_quantiles": list(self.pixel_quantiles),
                "intensity": None if self.intensity is None else {k: list(v) for k, v in self.intensity.items()}}

    def save(self, path: str | Path) -> ScoreCalibration:
        """Write the JSON file (creating its folder); returns the same calibration with ``source`` = ``path``."""
        return replace(self, source=_write_json(path, self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> ScoreCalibration:
        """Read a file written by :meth:`save`."""
        saved = json.loads(Path(path).read_text())
        p = saved["provenance"]
        return cls(dataset=p["dataset"], image_scores=tuple(saved["image_scores"]),
                   subject_scores=tuple(saved["subject_scores"]), aggregation=p["aggregation"],
                   quantile=float(p["quantile"]), score=p["score"], model=p.get("model"),
                   pixel_quantiles=tuple(saved.get("pixel_quantiles") or ()), intensity=saved.get("intensity"),
                   intensity_dataset=p.get("intensity_dataset", ""), created=p.get("created", ""), source=str(path))
