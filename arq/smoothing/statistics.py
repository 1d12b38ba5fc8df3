"""The statistics of randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019).

* ``clopper_pearson_lower(k, n, alpha)``: the one-sided ``1 - alpha`` lower
  confidence bound on a binomial proportion p from k successes in n trials: the
  p_L solving ``P(X >= k | p_L) = I_{p_L}(k, n - k + 1) = alpha`` (the
  alpha-quantile of Beta(k, n - k + 1)), 0 when k = 0. locuslab/smoothing calls
  the two-sided interval at level ``2 alpha``: the same number.
* ``clopper_pearson_upper(k, n, alpha)``: the p_U solving ``P(X <= k | p_U) = alpha``
  (the (1 - alpha)-quantile of Beta(k + 1, n - k)), 1 when k = n.
* ``radius(sigma, p_lower)``: ``R = sigma * Phi^-1(p_lower)``, the L2 radius
  within which the smoothed classifier is constant when
  ``P(f(x + e) = c_A) >= p_lower >= 1/2``.
* ``binomial_test_pvalue(k, n)``: two-sided exact binomial test of
  ``k`` successes out of ``n`` against p = 1/2 (PREDICT).
* ``subtract_rounding_down(a, b, ...)``: ``a - b - ...`` rounded towards -inf
  (a lower bound minus deviation bounds stays a lower bound).

Rounding. Every number here is rounded in the direction that keeps the ``1 - alpha``
guarantee: a lower bound is at most the exact real one, an upper bound or a p-value at least
the exact one, a radius at most ``sigma * Phi^-1(p_lower)``. scipy's Beta quantiles alone do
not do this: measured against exact binomial tails (mpmath, 30 digits) they lie on either side
of the exact bound, ``beta.ppf`` up to 1.7e-12 above the exact lower bound at n = 2.7e7 and the
upper bound ``beta.ppf(1 - alpha, ...)`` up to 7e-7 (relative) below the exact one at small
alpha, where ``1 - alpha`` rounds. So each bound is *verified*: the quantile is taken at level
``alpha (1 - LEVEL_SLACK)``, then the binomial tail at the result, evaluated forward
(``scipy.special.betainc``/``betaincc``, whose relative error measured at most 2e-11 up to
n = 2e8), must be at most ``alpha (1 - LEVEL_SLACK / 2)``; where it is not, the bound moves
(doubling steps, then bisection) until it is. With a forward relative error ``eps <=
LEVEL_SLACK / 2``, the exact tail at the returned p is ``<= alpha (1 - LEVEL_SLACK / 2)(1 + eps)
< alpha``, which (the tail being monotone in p) puts p on the safe side of the exact bound.
The slack moves the bound by about ``LEVEL_SLACK * alpha / density`` (the tail's derivative), of the
order of 1e-8 of the bound's standard deviation, or one ulp: no radius changes visibly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

from scipy import special, stats

#: Relative slack on the confidence level that covers the forward evaluation error of the binomial
#: tails (module docstring); 500 times the largest relative error measured.
LEVEL_SLACK = 1e-8
#: Relative amount a radius is rounded down by: covers Phi^-1's error (measured at most 6e-16 relative
#: on [1/2, 1)) and the rounding of ``sigma * z``.
RADIUS_SLACK = 1e-12
#: Bisection steps that reach any float in [0, 1] from any start (2 * 1074 would be the worst case).
_MAX_STEPS = 4000


def _check_counts(k: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _move_until_safe(start: float, unsafe: Callable[[float], bool], safe_end: float) -> float:
    """The nearest float to ``start`` on the way to ``safe_end`` for which ``unsafe`` is False: ``start``
    itself when it is safe, else found by doubling steps towards ``safe_end`` and then bisection.
    ``unsafe(safe_end)`` must be False and ``unsafe`` monotone on the way (a binomial tail is)."""
    if not math.isfinite(start) or not 0.0 <= start <= 1.0:  # a failed quantile: search all of [0, 1]
        start = 1.0 - safe_end
    if not unsafe(start):
        return start
    direction = math.copysign(1.0, safe_end - start)
    bad, good = start, safe_end
    step = max(abs(start) * 2.0**-52, 2.0**-1074)
    for _ in range(_MAX_STEPS):
        candidate = start + direction * step
        if direction * (candidate - safe_end) >= 0:
            break
        if not unsafe(candidate):
            good = candidate
            break
        bad, step = candidate, step * 2.0
    for _ in range(_MAX_STEPS):
        middle = bad + (good - bad) / 2.0
        if middle in (bad, good):
            break
        if unsafe(middle):
            bad = middle
        else:
            good = middle
    return good


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k of n, never above the exact one.

    Returns p with ``P(X >= k | p) < alpha`` for X ~ Binomial(n, p), verified by a forward evaluation
    (module docstring), within about ``LEVEL_SLACK * alpha / density`` (or an ulp) below the exact bound.
    """
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == 0:
        return 0.0
    check_level = alpha * (1.0 - LEVEL_SLACK / 2)

    def above_the_exact_bound(p: float) -> bool:
        return special.betainc(k, n - k + 1, p) > check_level  # P(X >= k | p), increasing in p

    quantile = float(stats.beta.ppf(alpha * (1.0 - LEVEL_SLACK), k, n - k + 1))
    return _move_until_safe(quantile, above_the_exact_bound, 0.0)


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on p from k of n, never below the exact one.

    Returns p with ``P(X <= k | p) < alpha``, verified as the lower bound is. The quantile comes from
    ``beta.isf(alpha, ...)``, not ``beta.ppf(1 - alpha, ...)``: ``1 - alpha`` rounds away the low
    digits of a small alpha.
    """
    _check_counts(k, n)
    _check_alpha(alpha)
    if k == n:
        return 1.0
    check_level = alpha * (1.0 - LEVEL_SLACK / 2)

    def below_the_exact_bound(p: float) -> bool:
        return special.betaincc(k + 1, n - k, p) > check_level  # P(X <= k | p), decreasing in p

    quantile = float(stats.beta.isf(alpha * (1.0 - LEVEL_SLACK), k + 1, n - k))
    return _move_until_safe(quantile, below_the_exact_bound, 1.0)


def subtract_rounding_down(minuend: float, *subtrahends: float) -> float:
    """``minuend - sum(subtrahends)`` computed exactly and rounded towards -inf: the float returned is
    never above the real difference (a lower bound minus deviation bounds stays a lower bound;
    round-to-nearest could add half an ulp)."""
    exact = Fraction(minuend) - sum((Fraction(value) for value in subtrahends), Fraction(0))
    nearest = float(exact)
    return math.nextafter(nearest, -math.inf) if Fraction(nearest) > exact else nearest


def radius(sigma: float, p_lower: float) -> float:
    """Certified L2 radius ``sigma * Phi^-1(p_lower)`` rounded down; 0 below 1/2 (no certificate).

    ``p_lower`` is a lower confidence bound on a probability: a number in [0, 1); 1 would claim an
    infinite radius, which no finite sample supports.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if not 0.0 <= p_lower < 1.0:  # NaN fails too
        raise ValueError(f"p_lower must be a probability bound in [0, 1), got {p_lower}")
    if p_lower < 0.5:
        return 0.0
    return float(sigma * stats.norm.ppf(p_lower)) * (1.0 - RADIUS_SLACK)


def binomial_test_pvalue(k: int, n: int) -> float:
    """Two-sided exact binomial test p-value of k successes in n trials at p = 1/2, rounded up.

    Under p = 1/2 the pmf is symmetric, so the outcomes at most as likely as k are ``X <= m`` and
    ``X >= n - m`` with ``m = min(k, n - k)``: the p-value is ``min(1, 2 P(X <= m))`` (1 when
    ``2k = n``), scipy's ``binomtest`` value. It is returned times ``1 + LEVEL_SLACK``, an upper bound
    on the exact p-value whatever the cdf's rounding (``binomtest`` itself was measured up to 3e-14
    below it), so that ``pvalue <= level`` still rejects with probability at most ``level``.
    """
    _check_counts(k, n)
    if 2 * k == n:
        return 1.0
    smaller = min(k, n - k)
    return min(1.0, 2.0 * float(stats.binom.cdf(smaller, n, 0.5)) * (1.0 + LEVEL_SLACK))
