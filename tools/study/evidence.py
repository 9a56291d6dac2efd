"""The comparison as evidence: per method and column the mean over seeds, the spread across seeds, a bootstrap
interval, and the paired comparison with the column's best method.

Two kinds of uncertainty stand beside each number:

* the **spread across seeds** (sample standard deviation of the per-seed values): how much the number moves when
  the method is trained (and evaluated) again with another seed: initialisation, data order, sampling noise;
* the **bootstrap interval** (percentile, over images resampled with replacement per dataset, the same resamples
  for every method and seed): how much the number would move on another draw of evaluation images of the same
  kind. With several seeds each resample's value is the mean over the seeds, so the interval is that of the mean.

For each quality column the method with the highest mean is the best; every other method gets the paired bootstrap
difference to it (best minus method on the same resamples), its interval and its two-sided p-value
(:func:`optim.stats.paired_difference`); p >= alpha marks it "not distinguishable from the best".

The combined score of a run is ((harmonic mean of RQI and CACI) + AHI) / 2 on its raw indices
(:func:`optim.metrics.normative.combined_score`, as the reference study and ``tools.report`` without
``--normalize`` compute it), on every resample from that resample's indices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optim.metrics.normative import combined_score
from optim.stats import mean_and_spread, paired_difference, percentile_interval
from tools.study.plan import Statistics
from tools.study.results import AHI_UNCLIPPED, ALL_CLASSES, COST, IMAGE, INDICES, PIXEL, RunResult

COMBINED = "combined"
INDEX_COLUMNS = (*INDICES, COMBINED)
# the indices correlated with per-pathology performance: the reference's, and AHI before its clip (which still ranks
# methods when every AHI is 0); the agreement with the reference uses INDEX_COLUMNS only (it has no unclipped AHI)
CORRELATED_INDICES = (*INDEX_COLUMNS, AHI_UNCLIPPED)


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One method's number in one column.

    Attributes:
        value: the mean over the method's seeds of the runs' own numbers (NaN when none has one).
        spread: the sample standard deviation across seeds (NaN for one seed).
        low, high: the bootstrap percentile interval (NaN for cost columns or without per-image numbers).
        seeds: how many seeds have a value.
        mark: 'best' (highest value of the column), 'tied' (not distinguishable from the best) or ''.
        p_value: the paired bootstrap p-value against the best (NaN for the best itself and for cost).
    """

    value: float
    spread: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    seeds: int = 0
    mark: Literal["best", "tied", ""] = ""
    p_value: float = float("nan")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A method against the best of a column: best - method, its interval, the p-value, and the verdict
    (``distinguishable``: p < alpha; None when the p-value is undefined, e.g. without per-image numbers)."""

    column: str
    best: str
    method: str
    difference: float
    low: float
    high: float
    p_value: float
    distinguishable: bool | None


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """The study's numbers: ``cells[method][column]``, the paired comparisons, the columns in table order."""

    methods: tuple[str, ...]
    quality: tuple[str, ...]
    cost: tuple[str, ...]
    cells: dict[str, dict[str, Cell]]
    comparisons: tuple[Comparison, ...]
    seeds: tuple[int | None, ...]
    statistics: Statistics

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.quality, *self.cost)


def quality_columns(points: Sequence[Mapping[str, float]]) -> tuple[str, ...]:
    """Image AUROC per class (``all_pathological`` first), pixel AUROC per class, RQI, AHI, CACI, combined, and the
    unclipped AHI."""
    seen = list(dict.fromkeys(c for p in points for c in p))
    image = sorted((c for c in seen if c.endswith(IMAGE)), key=lambda c: c != ALL_CLASSES + IMAGE)
    pixel = sorted((c for c in seen if c.endswith(PIXEL)), key=lambda c: c != ALL_CLASSES + PIXEL)
    return (*image, *pixel, *INDEX_COLUMNS, AHI_UNCLIPPED)


def _with_combined(values: Mapping[str, float | np.ndarray]) -> dict[str, float | np.ndarray]:
    out = dict(values)
    if all(i in out for i in INDICES):
        out[COMBINED] = combined_score(out["RQI"], out["AHI"], out["CACI"])
    return out


def build(results: Sequence[RunResult], replicates: Mapping[str, Mapping[str, np.ndarray]], *,
          order: Sequence[str], seeds: Sequence[int | None], statistics: Statistics) -> Evidence:
    """Cells and paired comparisons from the runs' numbers and their replicates (``replicates[job key][column]``).

    Args:
        results: the finished, evaluated runs (any methods and seeds).
        replicates: from :func:`tools.study.results.replicates`.
        order: the study's method order (rows follow it).
        seeds: the study's seeds.
        statistics: interval level and alpha.
    """
    points = {r.job.key: _with_combined(r.points()) for r in results}
    boot = {r.job.key: _with_combined(replicates.get(r.job.key, {})) for r in results}
    methods = tuple(m for m in order if any(r.method == m for r in results))
    quality = quality_columns(list(points.values()))
    count = statistics.replicates
    cells: dict[str, dict[str, Cell]] = {}
    seed_means: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        keys = [r.job.key for r in results if r.method == method]
        cells[method], seed_means[method] = {}, {}
        for column in (*quality, *COST):
            values = [float(points[k].get(column, float("nan"))) for k in keys]
            mean, spread = mean_and_spread(values)
            n = sum(math.isfinite(v) for v in values)
            if column in COST:
                cells[method][column] = Cell(value=mean, spread=spread, seeds=n)
                continue
            stacked = np.stack([np.asarray(boot[k].get(column, np.full(count, np.nan)), dtype=np.float64)
                                for k in keys])
            seed_means[method][column] = stacked.mean(axis=0)
            low = high = float("nan")
            if n and np.isfinite(seed_means[method][column]).any():
                low, high = percentile_interval(seed_means[method][column], statistics.level)
            cells[method][column] = Cell(value=mean, spread=spread, low=low, high=high, seeds=n)
    comparisons = _compare(methods, quality, cells, seed_means, statistics)
    return Evidence(methods=methods, quality=quality, cost=COST, cells=cells, comparisons=tuple(comparisons),
                    seeds=tuple(seeds), statistics=statistics)


def _compare(methods: Sequence[str], quality: Sequence[str], cells: dict[str, dict[str, Cell]],
             seed_means: Mapping[str, Mapping[str, np.ndarray]], statistics: Statistics) -> list[Comparison]:
    """Mark each column's best and the methods not distinguishable from it (cells are replaced in place)."""
    out: list[Comparison] = []
    for column in quality:
        finite = [m for m in methods if math.isfinite(cells[m][column].value)]
        if not finite:
            continue
        best = max(finite, key=lambda m: cells[m][column].value)  # ties: the first in study order
        cells[best][column] = _marked(cells[best][column], "best", float("nan"))
        for method in finite:
            if method == best:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # no finite replicate: p NaN, shown as "–"
                diff = paired_difference(cells[best][column].value, cells[method][column].value,
                                         seed_means[best][column], seed_means[method][column], level=statistics.level)
            distinguishable = None if math.isnan(diff.p_value) else diff.p_value < statistics.alpha
            mark = "tied" if distinguishable is False else ""
            cells[method][column] = _marked(cells[method][column], mark, diff.p_value)
            out.append(Comparison(column=column, best=best, method=method, difference=diff.difference,
                                  low=diff.low, high=diff.high, p_value=diff.p_value,
                                  distinguishable=distinguishable))
    return out


def _marked(cell: Cell, mark: Literal["best", "tied", ""], p_value: float) -> Cell:
    return Cell(value=cell.value, spread=cell.spread, low=cell.low, high=cell.high, seeds=cell.seeds, mark=mark,
                p_value=p_value)
