"""Statistics of the quality benchmarks: a t-interval over training seeds, and a paired bootstrap over seeds and test
problems for the difference between two methods.

The scripts import it as ``import _stats`` (they run as ``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1 … 30 (beyond: the normal 1.96 is within 2%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """t_{0.975, df}: the half-width of a 95% interval in standard errors with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"A t-interval needs at least 2 values (df >= 1), got df={df}.")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a 95% t-interval of a few values (one per training seed)."""

    mean: float
    std: float
    low: float
    high: float
    n: int

    def pct(self) -> str:
        """``"52.3 ± 4.1 [47.2, 57.4]"`` in percent (mean ± std [95% interval])."""
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def summarize(values: Sequence[float]) -> Summary:
    """`Summary` of ``values``: the interval is mean ± t_{0.975, n−1}·std/√n (a single value gets a zero-width one;
    any NaN makes every field NaN)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("Nothing to summarise.")
    if any(math.isnan(v) for v in values):  # e.g. a loss at a t where nothing was measured
        nan = float("nan")
        return Summary(nan, nan, nan, nan, len(values))
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Summary(mean, 0.0, mean, mean, 1)
    std = statistics.stdev(values)
    half = t975(len(values) - 1) * std / math.sqrt(len(values))
    return Summary(mean, std, mean - half, mean + half, len(values))


@dataclass(frozen=True)
class PairedDifference:
    """Mean accuracy of A minus B, with a 95% percentile-bootstrap interval."""

    diff: float
    low: float
    high: float

    def pct(self) -> str:
        """``"+3.2 [-1.0, +7.5]"`` in points."""
        return f"{100 * self.diff:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_bootstrap(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *, resamples: int = 4000, seed: int = 0
) -> PairedDifference:
    """The difference of mean accuracy of two methods, with a two-level paired bootstrap interval.

    Each resample draws training seeds with replacement (seed s of A is paired with seed s of B) and, independently,
    test problems with replacement (the same problems for both methods and every seed), so the interval covers both
    the seed-to-seed spread of training and the finite test set.

    Args:
        a, b: ``[seeds][problems]`` per-problem scores (1.0 correct, 0.0 wrong), the same problems in the same order.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"a and b must both be [seeds][problems] with one shape, got {x.shape} and {y.shape}.")
    diff = x - y  # [S, P]
    rng = np.random.default_rng(seed)
    seeds, problems = diff.shape
    stats = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, seeds, seeds)
        cols = rng.integers(0, problems, problems)
        stats[i] = diff[np.ix_(rows, cols)].mean()
    low, high = np.percentile(stats, [2.5, 97.5])
    return PairedDifference(float(diff.mean()), float(low), float(high))


__all__ = ["PairedDifference", "Summary", "paired_bootstrap", "summarize", "t975"]
