"""Intervals, paired deltas and verdicts (stem_cli/report/stats.py) against hand-computed cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from stem_cli.report import stats


@pytest.mark.parametrize("successes,n,low,high", [
    (5, 10, 0.23659, 0.76341),   # mixed: the textbook Wilson interval
    (10, 10, 0.72247, 1.0),      # all correct
    (0, 10, 0.0, 0.27753),       # all wrong
    (1, 1, 0.20655, 1.0),        # one sample
])
def test_wilson_by_hand(successes, n, low, high):
    lo, hi = stats.wilson(successes, n)
    assert lo == pytest.approx(low, abs=1e-5) and hi == pytest.approx(high, abs=1e-5)


def test_pass_fail_cells_use_wilson_in_points():
    cell = stats.mean_interval([100] * 5 + [0] * 5)
    assert cell.method == "wilson" and cell.n == 10 and cell.mean == 50
    assert (cell.low, cell.high) == pytest.approx((23.659, 76.341), abs=1e-3)
    assert stats.mean_interval([100] * 10).high == 100 and stats.mean_interval([0] * 10).low == 0


def test_partial_credit_few_samples_is_bounded_not_zero_width():
    cell = stats.mean_interval([50])
    assert cell.method == "bound" and cell.low < 10 and cell.high > 90  # one sample says almost nothing
    cell = stats.mean_interval([50, 50, 50])
    assert cell.method == "bound" and cell.high - cell.low > 30


def test_bootstrap_interval_covers_the_mean_and_matches_the_normal_width():
    rng = np.random.default_rng(1)
    scores = rng.choice([0, 25, 50, 75, 100], size=400).tolist()
    cell = stats.mean_interval(scores)
    assert cell.method == "bootstrap" and cell.low < cell.mean < cell.high
    normal = 1.96 * np.std(scores) / math.sqrt(len(scores))
    assert (cell.high - cell.low) / 2 == pytest.approx(normal, rel=0.15)
    assert stats.mean_interval(scores) == cell  # seeded: the same samples give the same interval


def _paired(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Synthetic pass/fail pairs: the baseline answers 80%, the method loses 5% of those."""
    rng = random.Random(seed)
    base = [100.0 if rng.random() < 0.8 else 0.0 for _ in range(n)]
    method = [0.0 if b and rng.random() < 0.05 else b for b in base]
    return method, base


def test_paired_delta_interval_shrinks_with_n():
    widths = []
    for n in (20, 80, 320, 1280):
        delta = stats.paired_delta(*_paired(n, seed=n))
        assert delta.method == "bootstrap" and delta.n == n and delta.low <= delta.mean <= delta.high
        widths.append(delta.high - delta.low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_paired_delta_is_paired():
    """Two methods that differ on 1 of 400 samples: an unpaired interval would span many points."""
    base = [100.0 if i % 2 else 0.0 for i in range(400)]
    method = list(base)
    method[1] = 0.0
    delta = stats.paired_delta(method, base)
    assert delta.mean == pytest.approx(-0.25) and delta.high - delta.low < 2.0
    with pytest.raises(ValueError, match="same samples"):
        stats.paired_delta([100.0], [100.0, 0.0])


def test_no_variation_is_not_certainty():
    """30 of 30 answered by both: not 'keeps within 2 points' (rule of three: up to ~10 points)."""
    delta = stats.paired_delta([100.0] * 30, [100.0] * 30)
    assert delta.low < -5 and stats.verdict(delta)[0] == stats.INCONCLUSIVE
    delta = stats.paired_delta([100.0] * 400, [100.0] * 400)
    assert delta.low > -2 and stats.verdict(delta)[0] == stats.KEEPS


@pytest.mark.parametrize("low,high,kind", [
    (-1.9, 3.0, stats.KEEPS), (-2.0, 0.0, stats.KEEPS), (-2.1, 1.0, stats.INCONCLUSIVE),
    (-30.0, -2.1, stats.LOSES), (-30.0, -2.0, stats.INCONCLUSIVE), (0.5, 9.0, stats.KEEPS),
])
def test_verdict_thresholds(low, high, kind):
    got, text = stats.verdict(stats.Interval((low + high) / 2, low, high, 50, "bootstrap"), margin=2.0)
    assert got == kind
    assert text.startswith({stats.KEEPS: "keeps accuracy (within 2 points", stats.LOSES: "loses",
                            stats.INCONCLUSIVE: "inconclusive"}[kind])
    assert stats.verdict(stats.Interval(-1.0, -4.0, 2.0, 50, "bootstrap"), margin=5.0)[0] == stats.KEEPS


@pytest.mark.parametrize("low,high,kind", [
    (0.1, 9.0, stats.BETTER), (0.0, 9.0, stats.INCONCLUSIVE), (-3.0, 2.0, stats.INCONCLUSIVE),
    (-9.0, -0.1, stats.WORSE), (-9.0, 0.0, stats.INCONCLUSIVE),
])
def test_head_to_head_thresholds(low, high, kind):
    assert stats.head_to_head(stats.Interval((low + high) / 2, low, high, 20, "bound"))[0] == kind


def test_head_to_head_of_a_few_paired_samples():
    """Three samples a task, A ahead on each by 100 or 0: too few to call; thirty of each, A better."""
    few = stats.paired_task_average({"a": [100.0, 100.0, 0.0]}, {"a": [0.0, 0.0, 0.0]})
    assert stats.head_to_head(few)[0] == stats.INCONCLUSIVE
    many = stats.paired_task_average({"a": [100.0] * 20 + [0.0] * 10}, {"a": [0.0] * 30})
    assert stats.head_to_head(many)[0] == stats.BETTER
    assert stats.head_to_head(stats.NONE)[0] == stats.INCONCLUSIVE


def test_one_sample_quick_start_is_inconclusive():
    """The README quick start's case: dense 90, stem 20 from one sample per task."""
    delta = stats.paired_task_average({"a": [0.0], "b": [40.0]}, {"a": [100.0], "b": [80.0]})
    assert delta.mean == pytest.approx(-70.0) and stats.verdict(delta)[0] == stats.INCONCLUSIVE


def test_task_average_weights_tasks_equally():
    avg = stats.task_average({"big": [100.0] * 30, "small": [0.0] * 2})
    assert avg.mean == pytest.approx(50.0) and avg.n == 32 and avg.low < 50 < avg.high
    lots = {f"t{i}": [100.0 if j % 2 else 0.0 for j in range(40)] for i in range(4)}
    assert stats.task_average(lots).method == "bootstrap"
    delta = stats.paired_task_average({"x": [100.0] * 25, "y": [0.0] * 25}, {"x": [0.0] * 25, "y": [0.0] * 25, "z": [1.0]})
    assert delta.mean == pytest.approx(50.0)  # task z is not in both: left out
