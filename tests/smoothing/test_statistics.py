import math

import pytest
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
    assert statistics.binomial_test_pvalue(60, 100) == pytest.approx(expected, rel=1e-9)


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
