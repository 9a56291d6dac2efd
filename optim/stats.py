"""Resampling statistics for comparing methods: bootstrap draws, percentile intervals, paired differences, rank
correlations with a bootstrap interval and a permutation p-value, min-max normalisation.

Pure functions: numpy arrays (or sequences) in, numpy arrays, floats or frozen dataclasses out; no I/O, no
logging, inputs never mutated. Undefined values (a constant column, fewer than two usable units) are NaN with a
``RuntimeWarning``, never an exception.

Conventions:

* **Bootstrap** (:func:`bootstrap_indices`): stratified. Each stratum (e.g. one dataset's images) is resampled with
  replacement to its own size, independently of the others, by one ``numpy.random.Generator`` (PCG64) seeded with
  ``seed``; the strata are drawn in sorted name order, so the same sizes and seed give the same draws whatever the
  order of the mapping. Using the same draws for every method makes differences *paired*.
* **Percentile interval** (:func:`percentile_interval`): the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
  (numpy's linear interpolation) of the finite replicates.
* **Paired p-value** (:func:`paired_difference`): two-sided, from the replicates d_b of a difference:
  p = min(1, 2 min(1 + #{d_b <= 0}, 1 + #{d_b >= 0}) / (B + 1)); the +1 keeps p > 0 with B replicates (the
  smallest reachable value is 2 / (B + 1)); identical methods (every d_b = 0) give p = 1.
* **Rank correlations**: Spearman's rho is the Pearson correlation of average ranks (ties share the mean rank);
  Kendall's tau is tau-b (ties corrected), as ``scipy.stats.kendalltau``. Intervals resample the units (pairs)
  with replacement; a replicate whose resample is constant in x or y has no correlation and is left out (their
  number is returned). The permutation p-value is two-sided (|r_perm| >= |r|): exact over all n! orderings of y
  when n! <= ``permutations``, else (1 + #) / (P + 1) over P random permutations.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

RankMethod = Literal["spearman", "kendall"]
_TOLERANCE = 1e-12  # |r_perm| >= |r| - tolerance: equal correlations computed in another order still count


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def bootstrap_indices(sizes: Mapping[str, int], *, replicates: int, seed: int) -> dict[str, np.ndarray]:
    """Stratified bootstrap draws.

    Args:
        sizes: stratum name -> number of units (>= 1).
        replicates: B >= 1.
        seed: seed of the generator.

    Returns:
        Stratum name -> int64 ``[B, n]`` indices into ``range(n)``, drawn uniformly with replacement.
    """
    if replicates < 1:
        raise ValueError(f"bootstrap_indices: replicates must be >= 1, got {replicates}")
    rng = np.random.Generator(np.random.PCG64(seed))
    draws: dict[str, np.ndarray] = {}
    for name in sorted(sizes):
        n = int(sizes[name])
        if n < 1:
            raise ValueError(f"bootstrap_indices: stratum {name!r} has {n} units; need >= 1")
        draws[name] = rng.integers(0, n, size=(replicates, n), dtype=np.int64)
    return {name: draws[name] for name in sizes}


def multiplicities(indices: Any, n: int) -> np.ndarray:
    """How often each unit was drawn: ``[B, k]`` indices into ``range(n)`` -> float64 ``[B, n]`` counts (rows sum
    to k)."""
    draws = np.asarray(indices, dtype=np.int64)
    if draws.ndim != 2:
        raise ValueError(f"multiplicities: expected [B, k] indices, got shape {draws.shape}")
    if draws.size and (draws.min() < 0 or draws.max() >= n):
        raise ValueError(f"multiplicities: indices outside range({n})")
    b = draws.shape[0]
    flat = (np.arange(b)[:, None] * n + draws).reshape(-1)
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def percentile_interval(replicates: Any, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates.

    Args:
        replicates: [B] values; NaN replicates (undefined in that resample) are left out, with a warning.
        level: coverage in (0, 1).

    Returns:
        (low, high); (NaN, NaN) with a warning when no replicate is finite.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"percentile_interval: level must be in (0, 1), got {level!r}")
    values = np.asarray(replicates, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        _warn(f"percentile_interval: none of {values.size} replicates is finite; interval undefined (NaN)")
        return float("nan"), float("nan")
    if finite.size < values.size:
        _warn(f"percentile_interval: {values.size - finite.size} of {values.size} replicates are NaN and left out")
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


@dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """A paired bootstrap comparison of a and b: the point difference a - b, its percentile interval and the
    two-sided p-value of "no difference" (see the module docstring), over ``n_replicates`` finite replicates."""

    difference: float
    low: float
    high: float
    p_value: float
    n_replicates: int


def paired_difference(a: float, b: float, a_replicates: Any, b_replicates: Any, *, level: float = 0.95
                      ) -> PairedDifference:
    """Compare a with b on the same bootstrap resamples.

    Args:
        a, b: the point values.
        a_replicates, b_replicates: [B] their values on the same resamples (replicate b of both from draw b).
        level: coverage of the interval of the difference.

    Returns:
        :class:`PairedDifference`; NaN fields (with a warning) when no replicate pair is finite.
    """
    ra = np.asarray(a_replicates, dtype=np.float64).reshape(-1)
    rb = np.asarray(b_replicates, dtype=np.float64).reshape(-1)
    if ra.shape != rb.shape:
        raise ValueError(f"paired_difference: {ra.size} and {rb.size} replicates; they must come from the same draws")
    d = ra - rb
    d = d[np.isfinite(d)]
    if d.size == 0:
        _warn("paired_difference: no finite replicate pair; comparison undefined (NaN)")
        return PairedDifference(difference=float(a) - float(b), low=float("nan"), high=float("nan"),
                                p_value=float("nan"), n_replicates=0)
    low, high = np.quantile(d, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2.0 * (1 + min(below, above)) / (d.size + 1))
    return PairedDifference(difference=float(a) - float(b), low=float(low), high=float(high), p_value=p,
                            n_replicates=int(d.size))


def minmax_normalise(values: Any, axis: int = -1) -> np.ndarray:
    """Min-max normalisation to [0, 1] along ``axis`` over the finite values (NaN stays NaN).

    A slice with fewer than two distinct finite values has no scale: it is all NaN (no warning: callers that
    show a single table say so).
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: handled below
        low = np.nanmin(np.where(finite, v, np.nan), axis=axis, keepdims=True)
        high = np.nanmax(np.where(finite, v, np.nan), axis=axis, keepdims=True)
    span = high - low
    ok = np.isfinite(span) & (span > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok & finite, (v - low) / np.where(ok, span, 1.0), np.nan)


def average_ranks(values: Any, axis: int = -1) -> np.ndarray:
    """Ranks 1..n along ``axis``; tied values share the mean of their ranks."""
    return rankdata(np.asarray(values, dtype=np.float64), method="average", axis=axis)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of [R, n] arrays; NaN for a row constant in x or y."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (rx * ry).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(rho, -1.0, 1.0)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair of [R, n] arrays; NaN for a row constant in x or y."""
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    concordance = (sx * sy).sum((-1, -2)) / 2.0  # concordant - discordant pairs (each pair appears twice)
    untied = np.sqrt((sx != 0).sum((-1, -2)) / 2.0 * (sy != 0).sum((-1, -2)) / 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.where(untied > 0, concordance / np.where(untied > 0, untied, 1.0), np.nan)
    return np.clip(tau, -1.0, 1.0)


_ROWS = {"spearman": _spearman_rows, "kendall": _kendall_rows}


def _pairs(x: Any, y: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{name}: x ({a.size}) and y ({b.size}) differ in length")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def rank_correlation(x: Any, y: Any, method: RankMethod = "spearman") -> float:
    """Spearman's rho or Kendall's tau-b of paired values (pairs with a NaN are left out).

    Returns:
        The correlation in [-1, 1]; NaN with a warning when fewer than two pairs remain or x or y is constant.
    """
    if method not in _ROWS:
        raise ValueError(f"rank_correlation: method {method!r} is not one of {', '.join(_ROWS)}")
    a, b = _pairs(x, y, "rank_correlation")
    if a.size < 2:
        _warn(f"rank_correlation: {a.size} usable pair(s); {method} undefined (NaN)")
        return float("nan")
    value = float(_ROWS[method](a[None], b[None])[0])
    if math.isnan(value):
        _warn(f"rank_correlation: x or y is constant over {a.size} pairs; {method} undefined (NaN)")
    return value


@dataclass(frozen=True, kw_only=True)
class CorrelationTest:
    """A rank correlation with its bootstrap percentile interval (over ``n_replicates`` defined replicates of the
    ``n`` pairs) and its two-sided permutation p-value (``exact``: over all n! orderings)."""

    method: RankMethod
    estimate: float
    low: float
    high: float
    p_value: float
    n: int
    n_replicates: int
    exact: bool


def _permutations(n: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if math.factorial(n) <= count:
        return np.array(list(itertools.permutations(range(n))), dtype=np.int64), True
    return np.argsort(rng.random((count, n)), axis=1), False


def correlation_test(x: Any, y: Any, *, method: RankMethod = "spearman", replicates: int = 1000,
                     permutations: int = 10000, seed: int = 0, level: float = 0.95) -> CorrelationTest:
    """Rank correlation of paired values with a bootstrap interval and a permutation p-value.

    Args:
        x, y: [n] paired values (e.g. one index and one detection number per method); pairs with a NaN are left out.
        method: 'spearman' or 'kendall' (tau-b).
        replicates: bootstrap resamples of the pairs (with replacement).
        permutations: the largest number of orderings of y enumerated exactly; above it, this many random ones.
        seed: seed of the generator (bootstrap draws first, then the random permutations).
        level: coverage of the interval.

    Returns:
        :class:`CorrelationTest`; every field NaN (with a warning) when the correlation is undefined.
    """
    a, b = _pairs(x, y, "correlation_test")
    estimate = rank_correlation(a, b, method) if a.size >= 2 else float("nan")
    if a.size < 2:
        _warn(f"correlation_test: {a.size} usable pair(s); {method} undefined (NaN)")
    if math.isnan(estimate):
        return CorrelationTest(method=method, estimate=float("nan"), low=float("nan"), high=float("nan"),
                               p_value=float("nan"), n=int(a.size), n_replicates=0, exact=False)
    rng = np.random.Generator(np.random.PCG64(seed))
    rows = _ROWS[method]
    draws = rng.integers(0, a.size, size=(replicates, a.size))
    boot = rows(a[draws], b[draws])
    defined = boot[np.isfinite(boot)]
    if defined.size:
        low, high = (float(v) for v in np.quantile(defined, [(1.0 - level) / 2.0, (1.0 + level) / 2.0]))
    else:
        _warn(f"correlation_test: no bootstrap resample of {a.size} pairs varies in both x and y; interval NaN")
        low = high = float("nan")
    order, exact = _permutations(a.size, permutations, rng)
    permuted = rows(np.broadcast_to(a, order.shape), b[order])
    hits = int((np.abs(permuted) >= abs(estimate) - _TOLERANCE).sum())
    p = hits / len(order) if exact else (1 + hits) / (len(order) + 1)
    return CorrelationTest(method=method, estimate=estimate, low=low, high=high, p_value=float(min(p, 1.0)),
                           n=int(a.size), n_replicates=int(defined.size), exact=exact)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values; the spread is NaN for fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")
