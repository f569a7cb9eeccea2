"""Intervals over seeds: Student's t, from first principles (no table, no scipy).

Why t over seeds, and not Wilson on pooled prompts x seeds: the seeds of a reproduction
share one world, one base model and one list of evaluation prompts, so the generations of
3 seeds are not 3x as many independent trials; pooling them and drawing a Wilson interval
treats them as if they were, and the spread between seeds was larger than those intervals
(issue 12: +prefix held-out completion ASR 0.95 / 0.70 / 0.50 per seed against a pooled
interval of [0.59, 0.81]). The unit replicated independently is the tuning SEED, so the
interval is drawn from the per-seed values:

    mean ± t(0.975, s - 1) * sd / sqrt(s)        (s seeds, sd the sample standard deviation)

clipped to [lower, upper] (a rate's [0, 1]; the clipping is reported). With 3 seeds t is
4.30, so the intervals are wide: that is what 3 seeds can say. With 1 seed there is no
interval (None): a seed's spread cannot be measured from one seed, and a Wilson interval on
its prompts would look precise while saying nothing about the next seed.

Why not a bootstrap that resamples seeds and prompts together: with 3 to 5 seeds a
bootstrap over seeds has only 10 to 126 distinct resamples, and its variance is smaller
than the sample variance by the factor (s - 1) / s (the plug-in estimate), so its
percentile intervals are too narrow exactly where the seeds are few; the t interval is
exact for normally distributed per-seed values and widens correctly as seeds get fewer.

What the interval covers and what it does not: the variation a new TUNING seed brings (its
safety mixture, data order and RTO draws) on THIS world, base model and prompt list. Another
draw of evaluation prompts, another world or another base model would add variation it does
not see. An interval of zero width means every seed gave the same value on these prompts.

The t distribution (integer degrees of freedom nu) has a closed-form CDF; with
theta = atan(t / sqrt(nu)), A(t) = P(|T| <= t):
    nu = 1:        A = 2 theta / pi
    nu odd >= 3:   A = (2 / pi) (theta + sin theta cos theta
                       (1 + (2/3) c + (2*4)/(3*5) c^2 + ... ((nu-3)/2 terms after the 1)))
    nu even:       A = sin theta (1 + (1/2) c + (1*3)/(2*4) c^2 + ... ((nu-2)/2 terms))
where c = cos^2 theta (Abramowitz & Stegun 26.7.3-4). The quantile is found by bisection.
tests/test_eval_intervals.py checks both against scipy.stats.t and a numeric integration of
the density.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

CONFIDENCE = 0.95
INTERVAL_METHOD = "t over seeds"  # what report.json's cells name their interval
NO_INTERVAL = "none: 1 seed"


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"t distribution: df={df!r} must be an integer >= 1")
    if t < 0:
        raise ValueError(f"t distribution: t={t} must be >= 0")
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, 1.0
        for j in range(1, (df - 1) // 2 + 1):  # 1, (2/3) c, (2*4)/(3*5) c^2, ...
            total += term
            term *= c * (2 * j) / (2 * j + 1)
        return min(1.0, 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total))
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):  # 1, (1/2) c, (1*3)/(2*4) c^2, ...
        total += term
        term *= c * (2 * j - 1) / (2 * j)
    return min(1.0, math.sin(theta) * total)


def t_quantile(probability: float, df: int) -> float:
    """The t with P(T <= t) = `probability` (in [0.5, 1)), by bisection on the CDF."""
    if not 0.5 <= probability < 1.0:
        raise ValueError(f"t quantile: probability={probability} must be in [0.5, 1)")
    two_sided = 2.0 * probability - 1.0
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < two_sided:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_two_sided_probability(middle, df) < two_sided:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def seed_interval(values: Sequence[float], *, confidence: float = CONFIDENCE,
                  lower: float | None = 0.0, upper: float | None = 1.0) -> dict:
    """Mean, sample std and the t interval of per-seed `values` (module docstring).

    -> {"mean", "std", "min", "max", "seeds", "ci95_low", "ci95_high", "interval",
    "clipped"}; with one value the bounds are None, std 0 and interval NO_INTERVAL. The
    bounds are clipped to [lower, upper] (None: not clipped); `clipped` says whether they
    were. `ci95` names the default confidence; another `confidence` is written under the
    same keys.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed interval: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"seed interval: confidence={confidence} must be in (0, 1)")
    mean = statistics.fmean(values)
    out = {"mean": mean, "min": min(values), "max": max(values), "seeds": len(values)}
    if len(values) == 1:
        return {**out, "std": 0.0, "ci95_low": None, "ci95_high": None,
                "interval": NO_INTERVAL, "clipped": False}
    std = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, len(values) - 1) * std / math.sqrt(len(values))
    low, high = mean - half, mean + half
    clipped_low = max(low, lower) if lower is not None else low
    clipped_high = min(high, upper) if upper is not None else high
    # floating point: the bounds enclose the mean exactly (e.g. std 0)
    return {**out, "std": std, "ci95_low": min(clipped_low, mean),
            "ci95_high": max(clipped_high, mean), "interval": INTERVAL_METHOD,
            "clipped": clipped_low != low or clipped_high != high}
