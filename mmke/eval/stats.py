"""Uncertainty of the reported numbers: bootstrap intervals over cases and paired tests.

Every metric mmke reports is a mean over edit cases, so its uncertainty is that of a mean over a
sample of cases:

- :func:`bootstrap_ci` — the percentile bootstrap interval of the mean (resampling cases with
  replacement). Seeded, so a report is reproducible; when every resample can be enumerated
  (``n ** n <= resamples``) the exact bootstrap distribution is used instead of random draws.
- :func:`paired_difference` — for two runs on the same cases: the mean of the per-case
  differences, its bootstrap interval, and a two-sided p-value from the sign-flip permutation
  test (exact when ``2 ** n <= resamples``, Monte Carlo otherwise). "A beats B" is claimed only
  where the interval excludes 0.

Percentiles use the inverted-CDF definition (the smallest value whose cumulative share reaches
the level), so small examples can be checked by hand.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its ``level`` interval (fractions, like the metrics)."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = DEFAULT_LEVEL

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-case differences A - B, its interval, and the sign-flip test's p-value."""

    diff: Interval
    p_value: float

    @property
    def excludes_zero(self) -> bool:
        return self.diff.lo > 0 or self.diff.hi < 0


def _quantiles(values: np.ndarray, weights: np.ndarray | None, level: float) -> tuple[float, float]:
    """Inverted-CDF quantiles at (1 - level) / 2 and (1 + level) / 2 of a (weighted) sample."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    w = np.ones_like(v) if weights is None else weights[order]
    cdf = np.cumsum(w) / w.sum()
    a = (1 - level) / 2
    # a small tolerance so that a cumulative share of exactly 0.025 counts as reaching it
    lo = v[np.searchsorted(cdf, a - 1e-12, side="left")]
    hi = v[min(np.searchsorted(cdf, 1 - a - 1e-12, side="left"), len(v) - 1)]
    return float(lo), float(hi)


def _bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Means of bootstrap resamples of ``x`` and their weights (None: equally likely draws)."""
    n = len(x)
    if n ** n <= resamples:  # every ordered resample, each equally likely: the exact distribution
        idx = np.array(list(itertools.product(range(n), repeat=n)))
        return x[idx].mean(1), None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, 500):  # in blocks: memory stays small for many cases
        k = min(500, resamples - s)
        means[s:s + k] = x[rng.integers(0, n, size=(k, n))].mean(1)
    return means, None


def bootstrap_ci(values: Sequence[float], *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (one value per case)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("bootstrap_ci needs a non-empty list of per-case values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means, w = _bootstrap_means(x, resamples, seed)
    lo, hi = _quantiles(means, w, level)
    return Interval(float(x.mean()), lo, hi, len(x), level)


def mean_of_means_ci(groups: Sequence[Sequence[float]], *, level: float = DEFAULT_LEVEL,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The mean of the groups' means (e.g. of five metrics each scored on its own cases) and its
    percentile interval from resampling each group's values independently (seeded)."""
    xs = [np.asarray(g, dtype=float) for g in groups]
    if not xs or any(x.ndim != 1 or len(x) == 0 for x in xs):
        raise ValueError("mean_of_means_ci needs non-empty groups of per-case values")
    rng = np.random.default_rng(seed)
    draws = np.mean([x[rng.integers(0, len(x), (resamples, len(x)))].mean(1) for x in xs], axis=0)
    a = (1 - level) / 2
    return Interval(float(np.mean([x.mean() for x in xs])), float(np.quantile(draws, a)),
                    float(np.quantile(draws, 1 - a)), sum(len(x) for x in xs), level)


def sign_flip_p_value(diffs: Sequence[float], *, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean difference is 0" by flipping the signs of the per-case
    differences: the share of sign assignments whose |mean| is at least the observed |mean|."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    obs = abs(d.mean())
    if obs == 0:
        return 1.0
    tol = 1e-12 * max(1.0, obs)
    if 2 ** n <= resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float((np.abs((signs * d).mean(1)) >= obs - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, resamples, 1000):
        k = min(1000, resamples - s)
        signs = rng.choice((1.0, -1.0), size=(k, n))
        hits += int((np.abs((signs * d).mean(1)) >= obs - tol).sum())
    return (hits + 1) / (resamples + 1)  # Monte Carlo: never exactly 0


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = DEFAULT_LEVEL,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedDifference:
    """A - B on the same cases (``a[i]`` and ``b[i]`` belong to case i)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same cases: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return PairedDifference(bootstrap_ci(d, level=level, resamples=resamples, seed=seed),
                            sign_flip_p_value(d, resamples=max(resamples, 10000), seed=seed))


def fmt_interval(iv: Interval | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"98.0 [96.0, 100.0]"`` (percent by default); an en dash for a missing cell."""
    if iv is None or math.isnan(iv.mean):
        return "–"
    return f"{scale * iv.mean:.{digits}f} [{scale * iv.lo:.{digits}f}, {scale * iv.hi:.{digits}f}]"
