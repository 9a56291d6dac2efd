"""Calibrated statements from healthy data: conformal p-values, Benjamini-Hochberg q-values, binomial intervals.

Pure functions on 1-D score arrays (numpy or torch); larger scores mean "more anomalous".

* **Conformal p-value** of a score s against n healthy calibration scores c_1..c_n:
  ``p = (1 + #{j: c_j >= s}) / (n + 1)``. Ties count against the test score (conservative). If the test case
  is healthy and its score is exchangeable with the calibration scores (e.g. whole subjects drawn from the
  same population, scored by a model that never saw them), ``P(p <= alpha) <= alpha`` for every alpha, whatever
  the model. The smallest possible p-value is ``1 / (n + 1)``: with 19 calibration scores nothing can be
  significant below 0.05.
* **Benjamini-Hochberg** q-values: ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the m p-values sorted
  increasingly; rejecting every case with ``q <= f`` is the BH step-up procedure at false discovery rate f
  (FDR control holds for independent or positively dependent p-values; conformal p-values against one shared
  calibration set are positively dependent, Bates et al., Ann. Statist. 2023).
* **Clopper-Pearson** interval of a binomial proportion k / n: the exact ("conservative") interval from the
  beta quantiles; it contains the true proportion with probability >= the confidence level.
* **Where a valid calibration puts the empirical FPR**: with n calibration and m test scores, all healthy and
  exchangeable (continuous scores), the number K of test cases with p <= alpha is beta-binomial,
  ``K ~ BetaBinomial(m, k, n + 1 - k)`` with ``k = floor(alpha (n + 1))``: given the calibration set, the
  false-positive rate is ``Beta(k, n + 1 - k)``-distributed (mean k / (n + 1) <= alpha), and the test cases are
  binomial around it (Vovk 2012, "Conditional validity of inductive conformal predictors"; Angelopoulos and
  Bates, "A gentle introduction to conformal prediction"). Its central interval is the validity check of a
  calibration: the Clopper-Pearson interval of K / m alone ignores the calibration set's randomness and rejects a
  valid calibration more often than its level says when n is small against m (about half the time for n = 19,
  m = 200 at alpha 0.05).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from optim.metrics.classification import as_numpy


def _finite(values: Any, name: str) -> np.ndarray:
    array = as_numpy(values)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def conformal_p_values(calibration: Any, scores: Any) -> np.ndarray:
    """Conformal p-values of ``scores`` against healthy ``calibration`` scores (see the module docstring).

    Args:
        calibration: [n] scores of healthy calibration cases (never seen in training).
        scores: [m] scores to test.

    Returns:
        [m] float64 p-values in [1 / (n + 1), 1]. With n = 0 every p-value is 1 (valid, without any power), with
        a warning.
    """
    c = np.sort(_finite(calibration, "calibration scores"))
    s = _finite(scores, "scores")
    if c.size == 0:
        warnings.warn("conformal_p_values: no calibration score; every p-value is 1", RuntimeWarning, stacklevel=2)
    at_least = c.size - np.searchsorted(c, s, side="left")  # #{c_j >= s}
    return (1.0 + at_least) / (c.size + 1.0)


def benjamini_hochberg(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg q-values (adjusted p-values), in the input order.

    Args:
        p_values: [m] p-values in [0, 1].

    Returns:
        [m] q-values in [0, 1], each >= its p-value; empty for empty input.
    """
    p = _finite(p_values, "p-values")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got range [{p.min():g}, {p.max():g}]")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


@dataclass(frozen=True)
class BinomialInterval:
    """k successes out of n with a Clopper-Pearson interval.

    Attributes:
        k, n: successes and trials.
        estimate: k / n (NaN when n = 0).
        low, high: the interval's bounds in [0, 1] (0 and 1 when n = 0).
        confidence: its level, e.g. 0.95.
    """

    k: int
    n: int
    estimate: float
    low: float
    high: float
    confidence: float

    def contains(self, value: float) -> bool:
        """True when ``low <= value <= high``."""
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return {key: float(v) for key, v in asdict(self).items()}


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> BinomialInterval:
    """The exact binomial interval of k / n at ``confidence`` (see the module docstring).

    Raises:
        ValueError: k, n are not integers with 0 <= k <= n, or confidence is not in (0, 1).
    """
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson: need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"clopper_pearson: confidence must be in (0, 1), got {confidence!r}")
    k, n = int(k), int(n)
    if n == 0:
        warnings.warn("clopper_pearson: n = 0; the interval is [0, 1]", RuntimeWarning, stacklevel=2)
        return BinomialInterval(k=0, n=0, estimate=float("nan"), low=0.0, high=1.0, confidence=confidence)
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1.0 - tail, k + 1, n - k))
    return BinomialInterval(k=k, n=n, estimate=k / n, low=low, high=high, confidence=confidence)


def rejection_rate(p_values: Any, alpha: float, confidence: float = 0.95) -> BinomialInterval:
    """The fraction of p-values <= ``alpha`` with its Clopper-Pearson interval.

    On healthy cases this is the empirical false-positive rate at nominal level alpha (valid calibration: about
    alpha, or below it); on pathological cases it is the power at alpha.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"rejection_rate: alpha must be in (0, 1), got {alpha!r}")
    p = _finite(p_values, "p-values")
    return clopper_pearson(int((p <= alpha).sum()), p.size, confidence)


def fpr_acceptance_interval(n_calibration: int, n_test: int, alpha: float,
                            confidence: float = 0.95) -> tuple[float, float]:
    """Central ``confidence`` interval of the empirical FPR K / m when the calibration is valid (see the module
    docstring): m = ``n_test`` exchangeable healthy test cases against n = ``n_calibration`` calibration cases.

    Returns:
        (low, high) in [0, 1]; (0, 0) when alpha < 1 / (n + 1) (no p-value can be that small); NaN for m = 0.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"fpr_acceptance_interval: alpha and confidence must be in (0, 1), got {alpha!r}, "
                         f"{confidence!r}")
    if n_calibration < 0 or n_test < 0:
        raise ValueError(f"fpr_acceptance_interval: counts must be >= 0, got {n_calibration}, {n_test}")
    if n_test == 0:
        return float("nan"), float("nan")
    k = int(np.floor(alpha * (n_calibration + 1) + 1e-9))
    if k == 0:
        return 0.0, 0.0
    count = stats.betabinom(n_test, k, n_calibration + 1 - k)
    tail = (1.0 - confidence) / 2.0
    return float(count.ppf(tail)) / n_test, float(count.ppf(1.0 - tail)) / n_test


def unit_scores(calibration: Any, values: Any) -> np.ndarray:
    """A strictly increasing map of scores into (0, 1) through healthy calibration scores ("1 - p", made continuous).

    With the n calibration scores sorted, c_(1) <= ... <= c_(n), the value at c_(j) is j / (n + 1) (for tied
    calibration scores, the largest such j), linear in between: 1 - p (p the conformal p-value) is j / (n + 1) just
    above c_(j), so the map lies at most 1 / (n + 1) above it (k / (n + 1) next to a calibration score shared by k
    cases). Beyond the calibration range the tails are hyperbolic, ``L_1 / (1 + (c_(1) - v) / w)`` below and
    ``1 - (1 - L_n) / (1 + (v - c_(n)) / w)`` above (L_1, L_n the levels at the ends, w = c_(n) - c_(1), 1 when all
    are equal): continuous and strictly increasing everywhere, so it keeps every ranking (an average precision of
    the mapped values equals that of the raw values), and slow enough that float64 values stay below 1 for any
    score a model gives.

    Args:
        calibration: [n] healthy calibration scores, n >= 1.
        values: scores or map values of any shape.

    Returns:
        float64 array of the shape of ``values``, in (0, 1).
    """
    c = np.sort(_finite(calibration, "calibration scores"))
    if c.size == 0:
        raise ValueError("unit_scores: needs at least one calibration score")
    v = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("unit_scores: values contain NaN or infinite values")
    n = c.size
    knots = np.unique(c)
    levels = np.searchsorted(c, knots, side="right") / (n + 1.0)  # the largest j with c_(j) = knot
    width = c[-1] - c[0] if c[-1] > c[0] else 1.0
    out = np.interp(v, knots, levels)
    low, high = v < knots[0], v > knots[-1]
    out[low] = levels[0] / (1.0 + (knots[0] - v[low]) / width)
    out[high] = 1.0 - (1.0 - levels[-1]) / (1.0 + (v[high] - knots[-1]) / width)
    return out


def uniformity_test(p_values: Any) -> float:
    """One-sided Kolmogorov-Smirnov p-value of "these p-values are no smaller than uniform".

    Healthy cases scored like the calibration cases give (about) uniform conformal p-values; a small result says
    they are shifted towards 0, i.e. the healthy inputs score higher than the calibration data (a domain shift).
    Conformal p-values are discrete (steps of 1 / (n + 1)), which makes the test slightly conservative.

    Returns:
        The test's p-value in [0, 1]; NaN (with a warning) for no p-values.
    """
    p = _finite(p_values, "p-values")
    if p.size == 0:
        warnings.warn("uniformity_test: no p-values; returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(stats.kstest(p, "uniform", alternative="greater").pvalue)
