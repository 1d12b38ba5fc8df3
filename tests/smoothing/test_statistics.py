import math
from fractions import Fraction

import pytest
import torch
from scipy import optimize, stats

from arq.smoothing import statistics


def _lower_by_root_finding(k, n, alpha):
    # p_L solves P(X >= k | p_L) = alpha: the definition, computed without the Beta identity.
    return optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


def _upper_by_root_finding(k, n, alpha):
    return optimize.brentq(lambda p: stats.binom.cdf(k, n, p) - alpha, 1e-15, 1 - 1e-15, xtol=1e-14)


@pytest.mark.parametrize("k, n", [(1, 10), (50, 100), (99_000, 100_000), (7, 1000), (999, 1000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_its_definition(k, n, alpha):
    assert statistics.clopper_pearson_lower(k, n, alpha) == pytest.approx(_lower_by_root_finding(k, n, alpha), abs=1e-9)
    assert statistics.clopper_pearson_upper(k, n, alpha) == pytest.approx(_upper_by_root_finding(k, n, alpha), abs=1e-9)


def test_edge_counts():
    assert statistics.clopper_pearson_lower(0, 100, 0.001) == 0.0
    assert statistics.clopper_pearson_upper(100, 100, 0.001) == 1.0
    # all n votes: the bound is alpha^(1/n), the largest certifiable p
    assert statistics.clopper_pearson_lower(100_000, 100_000, 0.001) == pytest.approx(0.001 ** (1 / 100_000), rel=1e-12)
    assert statistics.clopper_pearson_upper(0, 100_000, 0.001) == pytest.approx(1 - 0.001 ** (1 / 100_000), rel=1e-9)


def test_largest_radius_is_3_81_sigma_at_the_reference_settings():
    p = statistics.clopper_pearson_lower(100_000, 100_000, 0.001)
    assert statistics.radius(1.0, p) == pytest.approx(3.8115, abs=1e-3)
    assert statistics.radius(0.5, p) == pytest.approx(0.5 * stats.norm.ppf(p))


def test_radius_is_zero_below_one_half():
    assert statistics.radius(0.25, 0.49) == 0.0
    assert statistics.radius(0.25, 0.5) == 0.0
    assert statistics.radius(0.25, 0.8413447460685429) == pytest.approx(0.25, rel=1e-9)


def test_binomial_test_is_two_sided_exact():
    assert statistics.binomial_test_pvalue(5, 10) == pytest.approx(1.0)
    expected = 2 * stats.binom.sf(59, 100, 0.5)
    # rounded up by at most LEVEL_SLACK (relative), so that it is never below the exact p-value
    assert expected <= statistics.binomial_test_pvalue(60, 100) <= expected * (1 + 2 * statistics.LEVEL_SLACK)


@pytest.mark.parametrize("call, message", [
    (lambda: statistics.clopper_pearson_lower(5, 0, 0.1), "n must be"),
    (lambda: statistics.clopper_pearson_lower(11, 10, 0.1), "k must be"),
    (lambda: statistics.clopper_pearson_lower(5, 10, 0.0), "alpha"),
    (lambda: statistics.clopper_pearson_upper(5, 10, 1.0), "alpha"),
    (lambda: statistics.radius(-1.0, 0.9), "sigma"),
    (lambda: statistics.radius(math.inf, 0.9), "sigma"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- rounding direction
# The (1 - alpha) guarantee needs every bound on its safe side of the exact real number: a lower bound
# p_L with P(X >= k | p_L) <= alpha (then p_L <= the exact bound, the tail growing with p), an upper
# bound p_U with P(X <= k | p_U) <= alpha. Checked here with exact rational binomial tails at the
# returned float (and mpmath for large n), independent of scipy.

def _exact_tail(k, n, p, at_least):
    """P(X >= k) (at_least) or P(X <= k) for X ~ Binomial(n, p), p a float taken exactly."""
    p = Fraction(p)
    q = 1 - p
    terms = range(k, n + 1) if at_least else range(0, k + 1)
    return sum(math.comb(n, j) * p**j * q ** (n - j) for j in terms)


SMALL_CASES = [(k, n) for n in (1, 2, 3, 4, 5, 7, 10, 16, 25) for k in range(n + 1)]


@pytest.mark.parametrize("alpha", [0.001, 0.05, 1e-9])
def test_lower_bound_is_never_above_the_exact_one_and_is_tight(alpha):
    for k, n in SMALL_CASES:
        p = statistics.clopper_pearson_lower(k, n, alpha)
        if k == 0:
            assert p == 0.0
            continue
        tail = _exact_tail(k, n, p, at_least=True)
        # scipy's beta.ppf alone gives 0.10000000000000002 for k = n = 3, alpha = 0.001: p^3 > alpha
        assert tail <= Fraction(alpha), (k, n)
        # and not needlessly low: within 1e-6 of alpha, or one float (the resolution near 1) from it
        assert _exact_tail(k, n, math.nextafter(p, 1.0), at_least=True) >= Fraction(alpha) * (1 - Fraction(1, 10**6))


@pytest.mark.parametrize("alpha", [0.001, 0.05, 1e-9])
def test_upper_bound_is_never_below_the_exact_one_and_is_tight(alpha):
    for k, n in SMALL_CASES:
        p = statistics.clopper_pearson_upper(k, n, alpha)
        if k == n:
            assert p == 1.0
            continue
        assert _exact_tail(k, n, p, at_least=False) <= Fraction(alpha), (k, n)
        assert _exact_tail(k, n, math.nextafter(p, 0.0), at_least=False) >= Fraction(alpha) * (1 - Fraction(1, 10**6))


def test_upper_bound_at_a_small_alpha_keeps_its_digits():
    """``beta.ppf(1 - alpha)`` loses alpha's low digits to the rounding of 1 - alpha: at k = 1, n = 448,
    alpha = 2.29e-12 it gave an upper bound 7e-7 (relative) below the exact one."""
    k, n, alpha = 1, 448, 2.2931183817901117e-12
    p = statistics.clopper_pearson_upper(k, n, alpha)
    tail = _exact_tail(k, n, p, at_least=False)
    assert Fraction(alpha) * (1 - Fraction(1, 10**6)) <= tail <= Fraction(alpha)


def _mp_tail(k, n, p, at_least):
    """P(X >= k) or P(X <= k) in mpmath (30 digits), summed from k outwards until the terms vanish."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    p = mp.mpf(p)
    q = 1 - p
    term = mp.exp(mp.loggamma(n + 1) - mp.loggamma(k + 1) - mp.loggamma(n - k + 1) + k * mp.log(p) + (n - k) * mp.log(q))
    total, j = term, k
    while (j < n if at_least else j > 0) and term > total * mp.mpf("1e-32"):
        term *= (mp.mpf(n - j) / (j + 1) * p / q) if at_least else (mp.mpf(j) / (n - j + 1) * q / p)
        j += 1 if at_least else -1
        total += term
    return total


@pytest.mark.parametrize("k, n, alpha", [
    (56256, 825356, 4.328688822980247e-09),   # beta.ppf was 2.6e-13 (relative) above the exact lower bound
    (99_000, 100_000, 0.001), (100_000 - 1, 100_000, 0.001), (1, 10**7, 0.05), (10**7 - 1, 10**7, 0.001),
    (2, 1_226_780_473, 0.0794), (2**32 - 1, 2**32, 0.001), (5, 2**32, 1e-6),
])
def test_bounds_are_on_the_safe_side_at_large_n(k, n, alpha):
    lower = statistics.clopper_pearson_lower(k, n, alpha)
    assert _mp_tail(k, n, lower, at_least=True) <= alpha
    upper = statistics.clopper_pearson_upper(k, n, alpha)
    assert upper == 1.0 or _mp_tail(k, n, upper, at_least=False) <= alpha


def test_a_bad_quantile_is_corrected_by_the_forward_check(monkeypatch):
    """The bound does not trust scipy's inversion: a quantile too far on the unsafe side (or NaN) is
    moved back until the forward tail check passes, to the same place within a few ulps."""
    k, n, alpha = 93, 100, 0.001
    expected_lower = statistics.clopper_pearson_lower(k, n, alpha)
    expected_upper = statistics.clopper_pearson_upper(k, n, alpha)
    real_ppf, real_isf = stats.beta.ppf, stats.beta.isf
    for error in (1e-3, 1e-12, math.nan):
        monkeypatch.setattr(statistics.stats.beta, "ppf", lambda *args: real_ppf(*args) * (1 + error))
        monkeypatch.setattr(statistics.stats.beta, "isf", lambda *args: real_isf(*args) * (1 - error))
        lower = statistics.clopper_pearson_lower(k, n, alpha)
        upper = statistics.clopper_pearson_upper(k, n, alpha)
        assert _exact_tail(k, n, lower, at_least=True) <= Fraction(alpha)
        assert _exact_tail(k, n, upper, at_least=False) <= Fraction(alpha)
        assert lower == pytest.approx(expected_lower, rel=1e-9) and upper == pytest.approx(expected_upper, rel=1e-9)


def test_bounds_are_monotone_in_k_and_alpha():
    for n in (1, 2, 10, 1000, 100_000):
        ks = sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n} & set(range(n + 1)))
        for alpha in (1e-6, 0.001, 0.05):
            lowers = [statistics.clopper_pearson_lower(k, n, alpha) for k in ks]
            uppers = [statistics.clopper_pearson_upper(k, n, alpha) for k in ks]
            assert lowers == sorted(lowers) and uppers == sorted(uppers)
            assert all(low < up for low, up in zip(lowers, uppers))
        # a smaller alpha (more confidence) widens the interval
        assert statistics.clopper_pearson_lower(n, n, 1e-6) < statistics.clopper_pearson_lower(n, n, 1e-3)
        assert statistics.clopper_pearson_upper(0, n, 1e-6) > statistics.clopper_pearson_upper(0, n, 1e-3)


@pytest.mark.parametrize("k, n", [(550, 1000), (600, 1000), (70, 100), (3, 10), (62, 100)]
                         + [(k, 37) for k in range(38)])
def test_binomial_p_value_is_never_below_the_exact_one(k, n):
    # scipy's binomtest gave 0.0017305360849763027 for 550 of 1000, the exact value is ...3176
    smaller = min(k, n - k)
    exact = Fraction(1) if 2 * k == n else min(Fraction(1), Fraction(2 * sum(math.comb(n, j) for j in range(smaller + 1)), 2**n))
    pvalue = statistics.binomial_test_pvalue(k, n)
    assert exact <= Fraction(pvalue) <= exact * (1 + Fraction(2 * statistics.LEVEL_SLACK))


@pytest.mark.parametrize("p", [0.5, 0.5 + 1e-12, 0.6, 0.8413447460685429, 0.9004317789819642, 0.99, 1 - 1e-7,
                               0.001 ** (1 / 100_000), 1 - 2**-40, 1 - 2**-53])
def test_radius_is_never_above_sigma_times_the_exact_normal_quantile(p):
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    sigma = 0.37
    exact = mp.mpf(sigma) * mp.sqrt(2) * mp.erfinv(2 * mp.mpf(p) - 1)  # Phi^-1(p) = sqrt(2) erfinv(2p - 1)
    r = statistics.radius(sigma, p)
    # norm.ppf(0.9004317789819642) is 5.8e-16 (relative) above the exact quantile
    assert r <= exact
    assert r >= exact * (1 - 1e-11)


def test_subtract_rounding_down_is_never_above_the_real_difference():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(500, 3, generator=generator, dtype=torch.float64).tolist()
    for a, b, c in values:
        b, c = b * 1e-3, c * 1e-12
        result = statistics.subtract_rounding_down(a, b, c)
        exact = Fraction(a) - Fraction(b) - Fraction(c)
        assert Fraction(result) <= exact < Fraction(math.nextafter(result, math.inf))
    assert statistics.subtract_rounding_down(0.75, 0.25) == 0.5  # an exact difference is kept
    assert statistics.subtract_rounding_down(0.9) == 0.9


@pytest.mark.parametrize("p_lower", [math.nan, 1.0, 1.5, -0.1])
def test_radius_refuses_a_p_lower_that_is_not_a_probability_bound(p_lower):
    with pytest.raises(ValueError, match="p_lower"):
        statistics.radius(0.5, p_lower)
