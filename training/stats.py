"""The statistics of a comparison across seeds: mean and 95% interval over seeds (Student's t),
the paired difference of two arms with a paired t-test, and Fisher's exact test on pooled counts.
Plain math, so the report needs nothing beyond the standard library."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided tail."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]" if self.n > 1 else f"{self.mean:.4g}"


def mean_ci(values: list[float], level: float = 0.95) -> Interval:
    """The mean over seeds with its Student's t interval (no interval from one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, mean, mean, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass
class PairedTest:
    diff: Interval  # mean of a - b over seeds, with its 95% interval
    t: float
    p: float  # two-sided; nan with fewer than two seeds


def paired_test(a: list[float], b: list[float]) -> PairedTest:
    """The paired t-test of a - b over seeds (same seed, same base, same windows)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    ci, n = mean_ci(diffs), len(diffs)
    if n < 2:
        return PairedTest(ci, float("nan"), float("nan"))
    sd = math.sqrt(sum((d - ci.mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        return PairedTest(ci, 0.0 if ci.mean == 0 else math.copysign(math.inf, ci.mean), 1.0 if ci.mean == 0 else 0.0)
    t = ci.mean / (sd / math.sqrt(n))
    return PairedTest(ci, t, t_two_sided_p(t, n - 1))


def fisher_exact(solved_a: int, n_a: int, solved_b: int, n_b: int) -> float:
    """Fisher's exact test, two-sided, on solved/unsolved counts of two arms: the probability under
    the hypergeometric null of every table no more likely than the one observed."""
    solved = solved_a + solved_b
    total = n_a + n_b

    def prob(k: int) -> float:
        return math.comb(n_a, k) * math.comb(n_b, solved - k) / math.comb(total, solved)

    observed = prob(solved_a)
    ks = range(max(0, solved - n_b), min(solved, n_a) + 1)
    return min(1.0, sum(p for p in map(prob, ks) if p <= observed * (1 + 1e-7)))
