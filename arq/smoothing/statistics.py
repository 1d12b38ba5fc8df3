"""The statistics of randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

* ``clopper_pearson_lower(k, n, alpha)``: the one-sided ``1 - alpha`` lower
  confidence bound on a binomial proportion p from k successes in n trials,
  ``B(alpha; k, n - k + 1)`` (the alpha-quantile of a Beta distribution), 0 when
  k = 0. locuslab/smoothing calls the two-sided interval at level ``2 alpha``:
  the same number.
* ``clopper_pearson_upper(k, n, alpha)``: ``B(1 - alpha; k + 1, n - k)``, 1 when k = n.
* ``radius(sigma, p_lower)``: ``R = sigma * Phi^-1(p_lower)``, the L2 radius
  within which the smoothed classifier is constant when
  ``P(f(x + e) = c_A) >= p_lower >= 1/2``.
* ``binomial_test_pvalue(k, n)``: two-sided exact binomial test of
  ``k`` successes out of ``n`` against p = 1/2 (PREDICT).
"""
from __future__ import annotations

import math

from scipy import stats


def _check_counts(k: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k of n."""
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from k of n."""
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == n:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def radius(sigma: float, p_lower: float) -> float:
    """Certified L2 radius ``sigma * Phi^-1(p_lower)``; 0 below 1/2 (no certificate)."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if p_lower < 0.5:
        return 0.0
    return float(sigma * stats.norm.ppf(p_lower))


def binomial_test_pvalue(k: int, n: int) -> float:
    """Two-sided exact binomial test p-value of k successes in n trials at p = 1/2."""
    _check_counts(k, n)
    return float(stats.binomtest(k, n, 0.5).pvalue)
