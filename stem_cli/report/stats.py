"""Uncertainty of accuracy numbers: intervals, paired deltas and the verdict a reader can act on.

An accuracy cell is the mean of n per-sample scores in [0, 100]; a delta to the
baseline is the mean of n paired per-sample differences in [-100, 100] (both methods
ran the same samples, so differences are resampled together). An average over tasks
weights every task equally (RULER's and LongBench's averages) and resamples within each
task. Every interval is 95% by default and picked by what the data can carry:
- "wilson": one group of pass/fail scores (0 or 100: a needle found or not): the Wilson
  score interval, inside [0, 100] and honest down to n = 1;
- "bootstrap": every group has at least MIN_BOOTSTRAP samples: a seeded percentile
  bootstrap (stratified by task) over each group's values plus two pseudo-values at the
  ends of the range (as Agresti-Coull and Agresti-Min add pseudo-counts), so a run whose
  scores happen not to vary (30 of 30 answered by both methods) is not reported as
  certain: its delta's interval is about +-9 points, near the rule of three's 10;
- "bound": fewer samples: the values are bounded, so a mean of n of them varies at most as
  a proportion q (its value rescaled to [0, 1]) of n trials would: Wilson's interval at q,
  with n the effective sample count of the equal-weight average (k^2 / sum 1/n_t).
  Conservative, never zero-width from too few samples.
The verdict on a delta at margin X points (default 2):
- "keeps accuracy (within X points, 95%)": the delta's interval lies above -X;
- "loses accuracy": the delta's interval lies below -X;
- "inconclusive (n too small)": the interval straddles -X.
Head to head (one method against another, neither the dense baseline: does A beat B?):
- "better (95%)": the delta's interval lies above 0; "worse (95%)": below 0;
- "inconclusive (n too small)": it contains 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000
MARGIN = 2.0  # points of accuracy a method may lose and still "keep" it
SEED = 0
MIN_BOOTSTRAP = 20  # samples per group below which a bootstrap's spread is not trusted
KEEPS, LOSES, INCONCLUSIVE = "keeps", "loses", "inconclusive"
BETTER, WORSE = "better", "worse"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    method: str  # "wilson" | "bootstrap" | "bound" | "none" (n = 0)


NONE = Interval(math.nan, math.nan, math.nan, 0, "none")


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(successes: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: a bounded mean), in [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    z = _z(level)
    p = min(max(successes / n, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The exact bounds at p = 0 and p = 1 (float rounding would leave 1e-15 there).
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def _interval(groups: list[np.ndarray], lo: float, hi: float, level: float, resamples: int, seed: int) -> Interval:
    """Equal-weight mean over groups of each group's mean; values lie in [lo, hi] (module docstring)."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return NONE
    n = sum(len(g) for g in groups)
    point = float(np.mean([g.mean() for g in groups]))
    width = hi - lo
    if len(groups) == 1 and bool(np.all((groups[0] == lo) | (groups[0] == hi))):
        low, high = wilson(float((groups[0] == hi).sum()), len(groups[0]), level)
        return Interval(point, lo + width * low, lo + width * high, n, "wilson")
    if min(len(g) for g in groups) >= MIN_BOOTSTRAP:
        rng = np.random.default_rng(seed)
        padded = [np.concatenate([g, [lo, hi]]) for g in groups]
        draws = sum(g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(1) for g in padded) / len(groups)
        tail = (1 - level) / 2 * 100
        low, high = (float(x) for x in np.percentile(draws, [tail, 100 - tail]))
        return Interval(point, min(low, point), max(high, point), n, "bootstrap")
    # Equal-weight mean of k group means: its variance is that of one mean over n_eff samples.
    n_eff = len(groups) ** 2 / sum(1 / len(g) for g in groups)
    q = (point - lo) / width
    low, high = wilson(q * n_eff, n_eff, level)
    return Interval(point, lo + width * low, lo + width * high, n, "bound")


def _array(values) -> np.ndarray:
    return np.asarray(list(values), dtype=np.float64)


def mean_interval(scores, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The mean of per-sample scores (0..100) with its interval."""
    return _interval([_array(scores)], 0.0, 100.0, level, resamples, seed)


def task_average(per_task: dict[str, list[float]], *, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = SEED) -> Interval:
    """Equal-weight mean over tasks of each task's mean score, with its (stratified) interval."""
    return _interval([_array(v) for v in per_task.values()], 0.0, 100.0, level, resamples, seed)


def _differences(method: dict[str, list[float]], baseline: dict[str, list[float]]) -> list[np.ndarray]:
    out = []
    for task in method:
        if task not in baseline:
            continue
        a, b = _array(method[task]), _array(baseline[task])
        if a.shape != b.shape:
            raise ValueError(f"a paired delta needs the same samples: task {task!r} has {len(a)} vs {len(b)} scores")
        out.append(a - b)
    return out


def paired_delta(method, baseline, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """mean(method - baseline) over the same samples (aligned lists), with its paired interval."""
    return _interval(_differences({"": method}, {"": baseline}), -100.0, 100.0, level, resamples, seed)


def paired_task_average(method: dict[str, list[float]], baseline: dict[str, list[float]], *, level: float = LEVEL,
                        resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Delta of the equal-weight task averages over the tasks both ran, paired within each task."""
    return _interval(_differences(method, baseline), -100.0, 100.0, level, resamples, seed)


def verdict(delta: Interval, margin: float = MARGIN) -> tuple[str, str]:
    """(kind, text) for a paired delta's interval: keeps / loses / inconclusive (module docstring)."""
    if delta.n == 0 or math.isnan(delta.low):
        return INCONCLUSIVE, "inconclusive (no paired samples)"
    if delta.low >= -margin:
        return KEEPS, f"keeps accuracy (within {margin:g} points, 95%)"
    if delta.high < -margin:
        return LOSES, "loses accuracy"
    return INCONCLUSIVE, "inconclusive (n too small)"


def head_to_head(delta: Interval) -> tuple[str, str]:
    """(kind, text) for a paired delta of method A minus method B: better / worse / inconclusive (module docstring)."""
    if delta.n == 0 or math.isnan(delta.low):
        return INCONCLUSIVE, "inconclusive (no paired samples)"
    if delta.low > 0:
        return BETTER, "better (95%)"
    if delta.high < 0:
        return WORSE, "worse (95%)"
    return INCONCLUSIVE, "inconclusive (n too small)"
