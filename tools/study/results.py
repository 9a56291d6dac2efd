"""Reading a study's finished runs: their numbers, their per-image tables, and each column's bootstrap replicates.

The study reads the evaluation blocks by their names in ``_base/evaluation.yaml``: ``detection`` (image AUROC per
pathological set and ``all_pathological``), ``segmentation`` (pooled pixel AUROC per annotated set), ``rqi``,
``ahi`` (``all_pathological``), ``caci`` (``all_annotated``), and the inference cost (``eval/cost/all_datasets``).

Point values are the runs' own numbers (``metrics.json``). Replicates recompute each column on resampled images
from the run's ``per_image/`` tables (:mod:`core.evaluation.per_image`): image AUROC from the scores weighted by
how often each image was drawn, pooled pixel AUROC from the summed per-image histograms, RQI and CACI as means of
their per-image terms, AHI as the equal-n AHI of the resampled feature rows (U, P and R(P) resampled with their
images, each resample's distinct images only since FID is biased by repeats, see :func:`_ahi`; the reference set N
is the fixed healthy training distribution and is not resampled). Every resampling
unit is a subject (the split's ``subject`` column; each image is its own subject when there is none), stratified
by dataset: a resample draws each dataset's subjects with replacement and takes all their images. Before any
replicate is used, each column is recomputed on the original images and must equal the run's number (to within the
pixel histograms' stored bound, and 1e-4 relative for AHI from float32 features): a mismatch is an error naming the
run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.evaluation.per_image import PerImage, read_per_image
from optim.metrics.distribution import FeatureRows, GaussianStats
from optim.metrics.normative import ahi_equal_n_rows, ahi_unclipped
from optim.metrics.resampled import auroc_from_counts, score_bins
from optim.stats import bootstrap_indices, multiplicities
from tools.study.plan import Job, Study, finished_run

logger = logging.getLogger(__name__)

ALL_CLASSES = "all_pathological"
IMAGE, PIXEL = " image AUROC", " pixel AUROC"
INDICES = ("RQI", "AHI", "CACI")
# AHI before its clip to [0, 1]: (FID(P,N) - FID(R(P),N)) / (FID(P,N) - FID(U,N)). A negative value says how much
# further the restorations are from the healthy set than the pathological inputs (in units of the P-U gap), which the
# clipped AHI (0 for all of them) cannot rank.
AHI_UNCLIPPED = "AHI (unclipped)"
COST = ("wall s", "train s", "load avg", "network calls / image", "test s / image")


class StudyDataError(ValueError):
    """The runs cannot be compared as they are (different images, per-image numbers that contradict the run)."""


def _num(value: object) -> float:
    return float("nan") if value is None else float(value)  # metrics.json stores non-finite values as null


@dataclass
class RunResult:
    """One finished, evaluated run of a study: its job, folder, numbers (flat ``metrics.json``), cost and tables."""

    job: Job
    run: Path
    metrics: dict[str, float]
    wall_s: float = float("nan")
    load_average: float = float("nan")
    tables: dict[str, PerImage] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.job.method.name

    def points(self) -> dict[str, float]:
        """The run's own numbers by study column: image and pixel AUROC per class, RQI, AHI, CACI, cost."""
        out: dict[str, float] = {}
        for key, value in self.metrics.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval":
                block, dataset, metric = parts[1:]
                if block == "detection" and metric == "auroc":
                    out[dataset + IMAGE] = _num(value)
                elif block == "segmentation" and metric == "auroc_pooled":
                    out[dataset + PIXEL] = _num(value)
        rqi = sorted(k for k in self.metrics if k.startswith("eval/rqi/") and k.endswith("/rqi"))
        out["RQI"] = _num(self.metrics[rqi[0]]) if rqi else float("nan")
        out["AHI"] = _num(self.metrics.get(f"eval/ahi/{ALL_CLASSES}/ahi"))
        fids = [_num(self.metrics.get(f"eval/ahi/{ALL_CLASSES}/{k}")) for k in ("fid_p", "fid_rp", "fid_u")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no AHI in this run, or an undefined one: NaN
            # from the logged FIDs (the same value as the logged ahi_unclipped), so runs from before the key count too
            out[AHI_UNCLIPPED] = ahi_unclipped(*fids)
        out["CACI"] = _num(self.metrics.get("eval/caci/all_annotated/caci"))
        out["wall s"], out["load avg"] = self.wall_s, self.load_average
        out["train s"] = _num(self.metrics.get("train/wall_s"))
        out["network calls / image"] = _num(self.metrics.get("eval/cost/all_datasets/network_calls"))
        out["test s / image"] = _num(self.metrics.get("eval/cost/all_datasets/s_per_image"))
        return out


def evaluated(run_dir: Path) -> bool:
    """Whether a finished run has downstream numbers (a stage-1-only run, e.g. f-AnoGAN's WGAN-GP, has none)."""
    path = run_dir / "metrics.json"
    return path.is_file() and any(k.startswith("eval/") for k in json.loads(path.read_text()))


def collect(study: Study, state: Mapping[str, Mapping[str, object]]) -> list[RunResult]:
    """One result per finished, evaluated job, in job order; a second stage's wall time includes its stage 1's.

    Wall time and load come from ``runs.json`` (``state``) when it recorded this very run folder, else NaN.
    """
    results: list[RunResult] = []
    walls: dict[str, float] = {}
    for job in study.jobs():
        done = finished_run(study, job)
        if done is None:
            logger.warning("%s: no finished run; left out of the comparison", job.key)
            continue
        entry = state.get(job.key, {})
        recorded = entry.get("run") == str(done)
        wall = float(entry["wall_s"]) if recorded else float("nan")  # type: ignore[arg-type]
        if job.method.stage1 is not None:
            wall += walls.get(Job(method=study.method(job.method.stage1.method), seed=job.seed).key, float("nan"))
        walls[job.key] = wall
        if not evaluated(done):
            logger.info("%s: a training-only stage (no evaluation), counted in its second stage's wall time", job.key)
            continue
        load = float(entry["load_average"]) if recorded else float("nan")  # type: ignore[arg-type]
        results.append(RunResult(job=job, run=done, metrics=json.loads((done / "metrics.json").read_text()),
                                 wall_s=wall, load_average=load, tables=read_per_image(done / "per_image")))
    return results


def total_wall(study: Study, state: Mapping[str, Mapping[str, object]]) -> float:
    """Sum of the recorded wall times of every job's finished run (NaN if one is unknown)."""
    total = 0.0
    for job in study.jobs():
        done = finished_run(study, job)
        entry = state.get(job.key, {})
        total += float(entry["wall_s"]) if done is not None and entry.get("run") == str(done) else float("nan")  # type: ignore[arg-type]
    return total


# ------------------------------------------------------------------------------------------------ resampling
@dataclass(frozen=True)
class Units:
    """A dataset's resampling units: its subjects, each with its images (``members[u]``: image indices, in order)."""

    members: tuple[np.ndarray, ...]
    n_images: int

    @classmethod
    def of(cls, table: PerImage) -> Units:
        """Group a table's images by subject, subjects in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, subject in enumerate(table.subject):
            groups.setdefault(subject, []).append(i)
        return cls(members=tuple(np.asarray(g, dtype=np.int64) for g in groups.values()), n_images=len(table.subject))

    def membership(self) -> np.ndarray:
        """[n_units, n_images] 1 where the image belongs to the unit."""
        out = np.zeros((len(self.members), self.n_images))
        for u, images in enumerate(self.members):
            out[u, images] = 1.0
        return out


@dataclass(frozen=True)
class Draws:
    """Per dataset, the units (subjects) each of R resamples draws (``[R, n_units]``) and the units themselves.

    ``drawn`` is None for the identity (R = 1: every image once, in its original order).
    """

    units: dict[str, Units]
    drawn: dict[str, np.ndarray] | None

    @classmethod
    def identity(cls, tables: Mapping[str, PerImage]) -> Draws:
        return cls({name: Units.of(t) for name, t in tables.items()}, None)

    @property
    def count(self) -> int:
        return 1 if self.drawn is None else next(iter(self.drawn.values())).shape[0] if self.drawn else 0

    def weights(self, name: str, n: int) -> np.ndarray:
        """[R, n] how often each image of ``name`` is drawn (all ones for the identity or a set not resampled)."""
        if self.drawn is None or name not in self.drawn:
            return np.ones((max(self.count, 1), n))
        units = self.units[name]
        return multiplicities(self.drawn[name], len(units.members)) @ units.membership()

    def images(self, name: str, n: int, r: int) -> np.ndarray:
        """The image indices of resample ``r`` of ``name`` (repeats allowed; original order for the identity)."""
        if self.drawn is None or name not in self.drawn:
            return np.arange(n)
        members = self.units[name].members
        return np.concatenate([members[u] for u in self.drawn[name][r]])


def _image_auroc(tables: Sequence[PerImage], weights: Sequence[np.ndarray]) -> np.ndarray:
    scores = np.concatenate([t.columns["detection/score"] for t in tables]).astype(np.float64)
    labels = np.concatenate([t.label for t in tables]).astype(np.float64)
    w = np.concatenate(weights, axis=1)
    values, index = score_bins(scores)
    onehot = np.zeros((scores.size, values.size))
    onehot[np.arange(scores.size), index] = 1.0
    return auroc_from_counts(w @ (onehot * labels[:, None]), w @ (onehot * (1.0 - labels)[:, None]))


def _mean(tables: Sequence[PerImage], weights: Sequence[np.ndarray], key: str) -> np.ndarray:
    total, count = 0.0, 0.0
    for table, w in zip(tables, weights, strict=True):
        v = table.columns[key].astype(np.float64)
        finite = np.isfinite(v)
        total, count = total + w @ np.where(finite, v, 0.0), count + w @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)


class FeatureCache:
    """AHI's prepared features, each computed once: the reference statistics per distinct N (runs share N) and the
    :class:`FeatureRows` per distinct (N, rows) (a run's check and its resamples share them)."""

    def __init__(self) -> None:
        self._stats: dict[str, GaussianStats] = {}
        self._rows: dict[tuple[str, str], FeatureRows] = {}

    @staticmethod
    def _key(array: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    def rows(self, reference: np.ndarray, rows: np.ndarray) -> FeatureRows:
        key = (self._key(reference), self._key(rows))
        if key not in self._rows:
            if key[0] not in self._stats:
                self._stats[key[0]] = GaussianStats.from_features(reference.astype(np.float64))
            self._rows[key] = FeatureRows(self._stats[key[0]], rows)
        return self._rows[key]

    def drop_rows(self) -> None:
        """Forget the prepared rows (two m x m Gram matrices per run), keep the reference statistics."""
        self._rows.clear()


def _ahi(tables: Mapping[str, PerImage], draws: Draws, cache: FeatureCache) -> dict[str, np.ndarray] | None:
    """AHI and the unclipped AHI on each resample of ``draws`` (``{'AHI': [R], AHI_UNCLIPPED: [R]}``).

    FID is biased upwards by repeated images (a duplicated row adds no diversity), so a resample with repeats would
    move every FID and the interval would miss the run's own value. Each resample therefore uses the *distinct*
    images it drew (a subsample without replacement of about 63 % of each set, the same images for every method, so
    differences stay paired), and its deviation from the mean over the resamples is scaled to the full sets as in
    half-sampling: value_r = point + sqrt(f / (1 - f)) * (value_r' - mean), with f the mean fraction of distinct
    images (f = 1/2 gives the factor 1). AHI is the clip to [0, 1] of the unclipped value. The identity (R = 1) is
    the run's own number.
    """
    reference = [t for t in tables.values() if "ahi/pathological" in t.constants]
    if len(reference) != 1:
        return None
    ref = reference[0]
    healthy = str(ref.constants["ahi/healthy"])
    pooled = [str(n) for n in ref.constants["ahi/pathological"].tolist()]
    if not pooled or healthy not in tables or any(n not in tables for n in pooled):
        return None
    draws_n, seed = int(ref.constants["ahi/draws"]), int(ref.constants["ahi/seed"])
    parts = [tables[healthy].columns["ahi/input_features"], *(tables[n].columns["ahi/input_features"] for n in pooled),
             *(tables[n].columns["ahi/restored_features"] for n in pooled)]
    rows = cache.rows(ref.columns["ahi/input_features"], np.concatenate(parts))
    sizes = [len(p) for p in parts[: 1 + len(pooled)]]
    offsets = np.cumsum([0, *sizes])
    restored_offset = offsets[-1]
    names = [healthy, *pooled]

    def unclipped(picks: Sequence[np.ndarray]) -> float:
        if min(len(p) for p in picks) < 2:  # FID needs two images of a set: this resample has no AHI
            return float("nan")
        u = offsets[0] + picks[0]
        p = np.concatenate([offsets[1 + k] + picks[1 + k] for k in range(len(pooled))])
        q = np.concatenate([restored_offset + offsets[1 + k] - offsets[1] + picks[1 + k] for k in range(len(pooled))])
        return ahi_equal_n_rows(rows, u, p, q, draws=draws_n, seed=seed)["ahi_unclipped"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an undefined AHI in a resample is NaN, counted by the caller
        point = unclipped([np.arange(s) for s in sizes])
        if draws.drawn is None:
            values = np.array([point])
        else:
            raw, fractions = np.empty(draws.count), np.empty(draws.count)
            for r in range(draws.count):
                picks = [np.unique(draws.images(n, s, r)) for n, s in zip(names, sizes, strict=True)]
                raw[r] = unclipped(picks)
                fractions[r] = sum(len(p) for p in picks) / sum(sizes)
            f = float(np.mean(fractions))
            values = point + math.sqrt(f / (1.0 - f)) * (raw - np.nanmean(raw)) if f < 1.0 else np.full(raw.size, point)
    clipped = np.where(np.isnan(values), np.nan, np.clip(values, 0.0, 1.0))
    return {"AHI": clipped, AHI_UNCLIPPED: values}


def column_values(tables: Mapping[str, PerImage], draws: Draws, cache: FeatureCache) -> dict[str, np.ndarray]:
    """Every column the tables allow, on each resample of ``draws``: column -> [R].

    Image AUROC per pathological set (against the set it was compared with, ``detection/healthy``) and pooled
    over them (``all_pathological``), pixel AUROC per annotated set, RQI, CACI (pooled over the annotated sets)
    and AHI (pooled, when the ``ahi`` block stored its features).
    """
    def w(name: str) -> np.ndarray:
        return draws.weights(name, len(tables[name].path))

    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one-class resamples give NaN, counted by the caller
        detected = [n for n, t in tables.items() if "detection/healthy" in t.constants]
        for name in detected:
            healthy = str(tables[name].constants["detection/healthy"])
            out[name + IMAGE] = _image_auroc([tables[healthy], tables[name]], [w(healthy), w(name)])
        if detected:
            healthy = str(tables[detected[0]].constants["detection/healthy"])
            sets = [healthy, *detected]
            out[ALL_CLASSES + IMAGE] = _image_auroc([tables[n] for n in sets], [w(n) for n in sets])
        for name, table in tables.items():
            if "segmentation/hist_anomaly" in table.columns:
                out[name + PIXEL] = auroc_from_counts(w(name) @ table.columns["segmentation/hist_anomaly"],
                                                      w(name) @ table.columns["segmentation/hist_healthy"])
        rqi = [n for n, t in tables.items() if "rqi/rqi" in t.columns]
        if len(rqi) == 1:
            out["RQI"] = _mean([tables[rqi[0]]], [w(rqi[0])], "rqi/rqi")
        caci = [n for n, t in tables.items() if "caci/caci" in t.columns]
        if caci:
            out["CACI"] = _mean([tables[n] for n in caci], [w(n) for n in caci], "caci/caci")
    ahi = _ahi(tables, draws, cache)
    if ahi is not None:
        out.update(ahi)
    return out


def _tolerance(column: str, tables: Mapping[str, PerImage]) -> tuple[float, float]:
    """(absolute, relative) tolerance of a recomputed column against the run's number."""
    if column.endswith(PIXEL):
        return float(tables[column.removesuffix(PIXEL)].constants["segmentation/hist_bound"]) + 1e-9, 0.0
    if column in ("AHI", AHI_UNCLIPPED):
        return 1e-6, 1e-4  # features stored as float32
    return 1e-9, 0.0


def check_against_run(result: RunResult, cache: FeatureCache) -> None:
    """Recompute every column from the run's tables on the original images; each must equal the run's number.

    Raises:
        StudyDataError: naming the run, the column and both values.
    """
    if not result.tables:
        return
    points = result.points()
    for column, values in column_values(result.tables, Draws.identity(result.tables), cache).items():
        mine, theirs = float(values[0]), points.get(column, float("nan"))
        absolute, relative = _tolerance(column, result.tables)
        same = (math.isnan(mine) and math.isnan(theirs)) or abs(mine - theirs) <= absolute + relative * abs(theirs)
        if not same:
            raise StudyDataError(f"{result.run}: {column} recomputed from per_image/ is {mine!r}, but the run "
                                 f"reports {theirs!r}: the per-image tables do not belong to these metrics")


def resampled_sets(results: Sequence[RunResult]) -> dict[str, Units]:
    """The datasets a study resamples and their units (subjects), after checking that every run saw the same images.

    Every dataset any run stored per-image numbers for, except AHI's reference set (N is not resampled).

    Raises:
        StudyDataError: two runs list different images (or orders, or subjects) for a dataset, naming both and the
            first differing image.
    """
    first: dict[str, tuple[RunResult, PerImage]] = {}
    for result in results:
        for name, table in result.tables.items():
            if name not in first:
                first[name] = (result, table)
                continue
            other, seen = first[name]
            if table.path != seen.path or table.subject != seen.subject:
                pairs = list(zip(seen.path, table.path, seen.subject, table.subject, strict=False))
                k = next((i for i, (a, b, c, d) in enumerate(pairs) if a != b or c != d), len(pairs))
                theirs = f"{table.path[k]!r} (subject {table.subject[k]!r})" if k < len(table.path) else "(end)"
                ours = f"{seen.path[k]!r} (subject {seen.subject[k]!r})" if k < len(seen.path) else "(end)"
                raise StudyDataError(
                    f"dataset {name!r}: {result.job.key} ({result.run}) was evaluated on other images than "
                    f"{other.job.key} ({other.run}): image {k} is {theirs} in the first and {ours} in the second "
                    f"({len(table.path)} vs {len(seen.path)} images); a paired comparison needs the same images for "
                    "every method")
    reference = {n for r in results for n, t in r.tables.items() if "ahi/pathological" in t.constants}
    return {name: Units.of(table) for name, (_, table) in first.items() if name not in reference}


def replicates(results: Sequence[RunResult], *, count: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Every run's columns on the same ``count`` resamples: job key -> column -> [count].

    A resample draws, in every dataset independently, as many subjects as the dataset has, with replacement
    (:func:`optim.stats.bootstrap_indices` on the subject counts), and takes all the images of each drawn subject;
    with one image per subject (the default) that is the image bootstrap.

    Raises:
        StudyDataError: different images across runs, or per-image numbers that contradict a run.
    """
    units = resampled_sets(results)
    drawn = bootstrap_indices({n: len(u.members) for n, u in units.items()}, replicates=count, seed=seed) \
        if units else {}
    draws = Draws(units, drawn)
    cache = FeatureCache()
    out: dict[str, dict[str, np.ndarray]] = {}
    for result in results:
        if not result.tables:
            logger.warning("%s: %s has no per_image/ tables (an evaluation from before they existed); its columns "
                           "get no interval", result.job.key, result.run)
            out[result.job.key] = {}
            continue
        check_against_run(result, cache)
        out[result.job.key] = column_values(result.tables, draws, cache)
        cache.drop_rows()
    return out
