"""Student's t from first principles (derta_jax/eval/intervals.py) against scipy.stats.t and
against a numeric integration of the density; the seed interval against a direct
computation, and its coverage on simulated seeds."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from derta_jax.eval.intervals import (INTERVAL_METHOD, NO_INTERVAL, seed_interval,
                                      t_quantile, t_two_sided_probability)
from derta_jax.eval.scoring import wilson_interval

DFS = list(range(1, 31)) + [40, 60, 100, 250]


def _density(x: float, df: int) -> float:
    log_c = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
             - 0.5 * math.log(df * math.pi))
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _integral(t: float, df: int, steps: int = 20_000) -> float:
    """P(|T| <= t) = 2 * integral of the density over [0, t], by Simpson's rule."""
    h = t / steps
    total = _density(0.0, df) + _density(t, df)
    total += sum((4 if i % 2 else 2) * _density(i * h, df) for i in range(1, steps))
    return 2 * total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 30])
def test_cdf_equals_the_integrated_density(df):
    for t in (0.0, 0.3, 1.0, 2.0, 4.3, 12.7):
        assert t_two_sided_probability(t, df) == pytest.approx(_integral(t, df), abs=1e-9), t


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 20])
def test_quantile_holds_its_probability_by_integration(df):
    for p in (0.75, 0.9, 0.975, 0.995):
        q = t_quantile(p, df)
        assert 0.5 + _integral(q, df) / 2 == pytest.approx(p, abs=1e-9), p


def test_cdf_and_quantile_match_scipy():
    from scipy import stats
    for df in DFS:
        for t in (0.0, 0.05, 0.7, 1.96, 3.0, 8.0, 60.0):
            expected = stats.t.cdf(t, df) - stats.t.cdf(-t, df)
            assert t_two_sided_probability(t, df) == pytest.approx(expected, abs=1e-12)
        for p in (0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="df=0 must be an integer >= 1"):
        t_two_sided_probability(1.0, 0)
    with pytest.raises(ValueError, match="df=2.5 must be an integer"):
        t_two_sided_probability(1.0, 2.5)
    with pytest.raises(ValueError, match="probability=0.4 must be in"):
        t_quantile(0.4, 3)
    with pytest.raises(ValueError, match="no values"):
        seed_interval([])
    assert t_two_sided_probability(math.inf, 3) == 1.0


def test_seed_interval_is_mean_plus_minus_t_sd_over_root_s():
    values = [0.30, 0.45, 0.40, 0.35]
    cell = seed_interval(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(0.975, 3) * sd / 2
    assert (cell["mean"], cell["std"], cell["seeds"]) == (mean, sd, 4)
    assert (cell["min"], cell["max"]) == (0.30, 0.45)
    assert cell["ci95_low"] == pytest.approx(mean - half)
    assert cell["ci95_high"] == pytest.approx(mean + half)
    assert cell["interval"] == INTERVAL_METHOD and cell["clipped"] is False
    ninety = seed_interval(values, confidence=0.9)
    assert ninety["ci95_high"] - ninety["ci95_low"] < cell["ci95_high"] - cell["ci95_low"]


def test_the_issue_example_is_clipped_and_wider_than_pooled_wilson():
    """+prefix held-out completion ASR per seed (issue 12): 0.95, 0.70, 0.50 of 20 prompts
    each. The pooled Wilson interval [0.59, 0.81] excluded two of the three seeds; the t
    interval over seeds holds all three, and is clipped at 1."""
    cell = seed_interval([0.95, 0.70, 0.50])
    low, high = wilson_interval(43, 60)
    assert (round(low, 2), round(high, 2)) == (0.59, 0.81)
    assert cell["clipped"] is True and cell["ci95_high"] == 1.0
    assert cell["ci95_low"] < 0.5 and cell["ci95_low"] == pytest.approx(
        0.716667 - 4.302653 * 0.225462 / math.sqrt(3), abs=1e-5)
    assert all(cell["ci95_low"] <= v <= cell["ci95_high"] for v in (0.95, 0.70, 0.50))


def test_one_seed_has_no_interval_and_equal_seeds_a_zero_width_one():
    one = seed_interval([0.4])
    assert (one["ci95_low"], one["ci95_high"], one["interval"], one["std"]) == (
        None, None, NO_INTERVAL, 0.0)
    same = seed_interval([0.0, 0.0, 0.0])
    assert (same["ci95_low"], same["ci95_high"], same["std"]) == (0.0, 0.0, 0.0)


def test_t_interval_over_three_seeds_covers_the_mean_95_percent_of_the_time():
    """Simulated seeds, normal around a known mean: the interval holds it in ~95% of draws
    (a z interval with the sample sd would hold it in ~80% at 3 seeds)."""
    rng = random.Random(12)
    draws, covered, covered_z = 4000, 0, 0
    for _ in range(draws):
        values = [rng.gauss(0.3, 0.1) for _ in range(3)]
        cell = seed_interval(values, lower=None, upper=None)
        covered += cell["ci95_low"] <= 0.3 <= cell["ci95_high"]
        half_z = 1.959964 * cell["std"] / math.sqrt(3)
        covered_z += abs(cell["mean"] - 0.3) <= half_z
    assert 0.935 <= covered / draws <= 0.965
    assert covered_z / draws < 0.85
