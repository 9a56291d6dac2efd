"""The reference study's own analysis on a study's numbers, and the study's agreement with the reference indices.

* :func:`correlations`: across methods, Spearman's rho between each index (RQI, AHI, CACI, combined) and each
  per-pathology number (image AUROC and pooled pixel AUROC per class), with a bootstrap interval over methods and a
  permutation p-value (:func:`optim.stats.correlation_test`). The reference study's claim is that methods with high
  indices localise the widest range of unseen pathologies; this is that test on the study's own numbers (the
  reference used Pearson's r in its figure scripts; ranks are used here because the methods' numbers are on
  different scales and a few methods would dominate a linear fit).
* :func:`agreement`: Kendall's tau-b between the study's values of each index (and the combined score) and the
  reference study's published ones (``docs/reference_results.csv``), over the methods both have, with a bootstrap
  interval over those methods and a permutation p-value. The reference was computed on other data at another
  scale (see ``docs/reference_results.md``): :data:`CAVEAT`.

Each method enters with its mean over seeds.
"""

from __future__ import annotations

import csv
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from core.Configurator import ConfigError
from optim.metrics.normative import combined_score
from optim.stats import CorrelationTest, correlation_test
from tools.study.evidence import CORRELATED_INDICES, INDEX_COLUMNS, Evidence
from tools.study.results import IMAGE, PIXEL

logger = logging.getLogger(__name__)

CAVEAT = ("The reference values were computed by the reference study on fastMRI+ at 128 x 128 with its full training "
          "schedules; this study ran on other data, at another scale and with other training. Agreement is a sanity "
          "check of the direction of the rankings, not a pass mark.")
REFERENCE_COLUMNS = ("method", "configs", "rqi", "ahi", "caci", "source")


@dataclass(frozen=True, kw_only=True)
class CorrelationRow:
    """One (index, per-pathology number) pair across the methods that have both."""

    index: str
    target: str
    test: CorrelationTest


def _quiet_test(x: list[float], y: list[float], *, method: str, what: str, **kwargs: object) -> CorrelationTest:
    """correlation_test, its warnings (constant columns, too few methods) turned into one log line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        test = correlation_test(x, y, method=method, **kwargs)  # type: ignore[arg-type]
    if caught:
        logger.warning("%s: %s", what, caught[0].message)
    return test


def correlations(evidence: Evidence) -> list[CorrelationRow]:
    """Spearman's rho of every index against every per-pathology column, across the study's methods."""
    s = evidence.statistics
    targets = [c for c in evidence.quality if c.endswith((IMAGE, PIXEL))]
    rows = []
    for index in CORRELATED_INDICES:
        x = [evidence.cells[m][index].value for m in evidence.methods]
        for target in targets:
            y = [evidence.cells[m][target].value for m in evidence.methods]
            test = _quiet_test(x, y, method="spearman", what=f"correlation {index} vs {target}",
                               replicates=s.replicates, permutations=s.permutations, seed=s.seed, level=s.level)
            rows.append(CorrelationRow(index=index, target=target, test=test))
    return rows


@dataclass(frozen=True, kw_only=True)
class Reference:
    """The reference study's indices per method (``values[method][column]``, columns as the study's: RQI, AHI,
    CACI, combined) and which config names implement each method (``configs[config] = method``)."""

    values: dict[str, dict[str, float]]
    configs: dict[str, str]
    source: Path


def read_reference(path: Path) -> Reference:
    """Read ``docs/reference_results.csv`` (or a file of the same columns).

    Raises:
        ConfigError: naming the file and line of a missing column, a bad number or a config listed twice.
    """
    values: dict[str, dict[str, float]] = {}
    configs: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REFERENCE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing columns {missing}; expected {', '.join(REFERENCE_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                rqi, ahi, caci = (float(row[c]) for c in ("rqi", "ahi", "caci"))
            except ValueError as err:
                raise ConfigError(f"{path}:{line}: {err}") from err
            method = row["method"]
            values[method] = {"RQI": rqi, "AHI": ahi, "CACI": caci, "combined": combined_score(rqi, ahi, caci)}
            for config in filter(None, (c.strip() for c in row["configs"].split(";"))):
                if config in configs:
                    raise ConfigError(f"{path}:{line}: config {config!r} is listed for {configs[config]!r} too")
                configs[config] = method
    return Reference(values=values, configs=configs, source=path)


@dataclass(frozen=True, kw_only=True)
class Agreement:
    """Kendall's tau-b per index between the study and the reference, over ``matched`` (study -> reference name)."""

    rows: tuple[tuple[str, CorrelationTest], ...]
    matched: dict[str, str]
    unmatched: tuple[str, ...]


def agreement(evidence: Evidence, reference: Reference) -> Agreement:
    """The study's rankings against the reference's, by index and combined score.

    A study method matches a reference row when its run name is one of the row's ``configs``; methods that match
    no row (e.g. DAE, the VQ-VAE stage of LTM) are listed as unmatched.
    """
    s = evidence.statistics
    matched = {m: reference.configs[m] for m in evidence.methods if m in reference.configs}
    unmatched = tuple(m for m in evidence.methods if m not in reference.configs)
    rows = []
    for index in INDEX_COLUMNS:
        study = [evidence.cells[m][index].value for m in matched]
        theirs = [reference.values[r][index] for r in matched.values()]
        test = _quiet_test(study, theirs, method="kendall", what=f"agreement on {index}", replicates=s.replicates,
                           permutations=s.permutations, seed=s.seed, level=s.level)
        rows.append((index, test))
    return Agreement(rows=tuple(rows), matched=matched, unmatched=unmatched)
