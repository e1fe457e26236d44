"""Equal-budget comparisons: solve each method's own knob so its BUD on these inputs hits a target.

A method's budget knob (its `Knob`: Stem's k_scale, streaming's window, XAttention's
threshold, ...) moves its BUD monotonically. A pre-fill of each probe prompt runs
dense, and at every governed layer the method's selector is tried on that layer's
real q/k/v for a grid of knob values; the BUD of each value is summed over layers and
prompts exactly as a real run would count it (dense layers full, sliding-window layers
not counted). A second pass refines between the two grid values that bracket the target.

Two forwards per (method, length, probe prompt), whatever the grid: no per-candidate
model run, and nothing held in memory but counts. A data-dependent method (XAttention,
FlexPrefill, MInference) keeps different amounts on different inputs, so the probes are
prompts of several tasks, not one; and the probe runs on dense hidden states. The BUD
of the real (sparse) run therefore can differ; every result row carries the BUD
actually achieved. Solved knobs are stored and reused (stem_cli/runs/knobs.py).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

import stem_cli
from stem_cli.config import ConfigError, replace
from stem_cli.index import block_pair_counts, causal_pairs, computed_pairs
from stem_cli.registry import get_method

TOLERANCE = 0.01  # +-1 BUD point, as the comparison promises
GRID = 16  # knob values per pass
SOLVER_VERSION = 1  # bump when a change to the solver changes the knob it finds: stored knobs are keyed by it

# progress(text, done, total): what is being tried, in probe forwards done of at most `total`
Progress = Callable[[str, int, int], None]


class BudgetOutOfReach(ConfigError):
    """A method whose knob cannot reach the asked BUD at a length (its forced blocks, dense layers or dense heads
    set a floor): `method`, `seq_len` and the reachable `low`, `high` say which, for callers that drop it."""

    def __init__(self, message: str, *, method: str, seq_len: int, low: float, high: float):
        super().__init__(message)
        self.method, self.seq_len, self.low, self.high = method, seq_len, low, high


def knob_grid(low: float, high: float, count: int, integer: bool) -> list[float]:
    if integer:
        return sorted({int(round(x)) for x in np.linspace(low, high, count)})
    if low > 0 and high / low > 20:  # a wide positive range: equal ratios, not equal steps
        return [float(x) for x in np.geomspace(low, high, count)]
    return [float(x) for x in np.linspace(low, high, count)]


@torch.no_grad()
def bud_curve(model, method: str, config, values: list[float], probes: torch.Tensor | list[torch.Tensor],
              on_probe: Callable[[int], None] | None = None) -> list[float]:
    """BUD of `method` with its knob at each of `values`, over dense pre-fills of the probe prompts.
    `on_probe(i)`: called after the i-th (1-based) probe's forward."""
    probes = [probes] if isinstance(probes, torch.Tensor) else list(probes)
    m = get_method(method)
    configs = [replace(config, {m.knob.name: v}, method) for v in values]
    done = [0.0] * len(values)
    total = [0.0]
    pairs_cache: dict[tuple, torch.Tensor] = {}

    split = m.estimate is not None and m.choose is not None
    # A method with run state (elastic with a router: its pre-RoPE key hooks) is probed as a run would
    # run it, so the router routes on the keys it was trained on; the knob does not touch that state.
    state = m.prepare(model, config) if m.prepare is not None else None
    extra = {} if state is None else {"state": state}

    def probe(layer, q, k, v, scale, key_valid):
        batch, hq, n, _ = q.shape
        estimated = None
        for i, cfg in enumerate(configs):
            block = cfg.block_size
            key = (n, block, None if key_valid is None else key_valid.data_ptr())
            if key not in pairs_cache:
                pairs_cache[key] = block_pair_counts(key_valid, batch, n, block, device=q.device)
            pairs = pairs_cache[key]
            causal = float(causal_pairs(pairs, hq))
            if i == 0:
                total[0] += causal
            if layer in getattr(cfg, "dense_layers", ()):  # elastic has per-head modes instead
                done[i] += causal
                continue
            if split:  # the knob does not touch the estimate: compute it once per layer
                if estimated is None:
                    estimated = m.estimate(q, k, v, layer=layer, config=cfg, scale=scale, key_valid=key_valid)
                index = m.choose(estimated, seq_len=n, config=cfg, key_valid=key_valid)
            else:
                index = m.select(q, k, v, layer=layer, config=cfg, scale=scale, key_valid=key_valid, **extra)
            if index.block_size != block:
                pairs = block_pair_counts(key_valid, batch, n, index.block_size, device=q.device)
            done[i] += float(computed_pairs(index, pairs, hq))

    runtime = stem_cli.apply(model, "dense")
    runtime.probe = probe
    try:
        for i, ids in enumerate(probes, 1):
            pairs_cache.clear()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if on_probe is not None:
                on_probe(i)
    finally:
        runtime.probe = None
        if state is not None and hasattr(state, "keys"):  # elastic's key hooks, installed by its prepare above
            state.keys.remove_hooks()
    if not total[0]:
        raise ConfigError(f"method {method!r}: the model has no layer this method governs at {probes[0].shape[1]} tokens")
    return [d / total[0] for d in done]


def solve_budget(model, method: str, config, probes: torch.Tensor | list[torch.Tensor], target: float, *, grid: int = GRID,
                 progress: Progress | None = None) -> tuple[Any, dict]:
    """(config with the knob set, info) so that BUD over the probe prompts is within TOLERANCE of target.

    `progress(text, done, total)`: the knob values being tried, after every probe forward (two passes at most).
    Raises ConfigError (exit 2 in the CLI) when the target lies outside what the knob can reach.
    """
    if not 0 < target <= 1:
        raise ConfigError(f"--budget {target!r} is not allowed: use a fraction in (0, 1], e.g. 0.3")
    m = get_method(method)
    if m.knob is None:
        raise ConfigError(f"method {method!r} has no budget knob (it computes every causal block); leave it out of --budget or compare against it as the baseline")
    knob = m.knob
    n_probes = 1 if isinstance(probes, torch.Tensor) else len(probes)
    total = 2 * n_probes  # a grid pass, then at most one refining pass
    show = progress or (lambda text, done, total: None)

    def trying(vals: list[float], done: int):
        text = f"trying {knob.name} {min(vals):.4g}..{max(vals):.4g} ({len(vals)} values)"
        show(text, done, total)
        return lambda i: show(f"{text}, probe {i}/{n_probes}", done + i, total)

    values = knob_grid(knob.low, knob.high, grid, knob.integer)
    buds = bud_curve(model, method, config, values, probes, on_probe=trying(values, 0))
    if not knob.increasing:
        values, buds = values[::-1], buds[::-1]
    low_bud, high_bud = min(buds), max(buds)
    if target < low_bud - TOLERANCE or target > high_bud + TOLERANCE:
        raise BudgetOutOfReach(
            f"--budget {target:g} is out of reach for {method!r} at {_length(probes)} tokens: its {knob.name} from "
            f"{knob.low:g} to {knob.high:g} gives BUD {low_bud:.1%} to {high_bud:.1%} (forced blocks and dense layers set the floor)",
            method=method, seq_len=_length(probes), low=low_bud, high=high_bud)
    # Monotone in principle; take the last value at or below the target and its successor.
    below = max((i for i, b in enumerate(buds) if b <= target), default=0)
    above = min(below + 1, len(values) - 1)
    best = min(range(len(values)), key=lambda i: abs(buds[i] - target))
    if abs(buds[best] - target) > TOLERANCE / 4 and above != below:
        fine = knob_grid(values[below], values[above], grid, knob.integer) if not knob.integer else \
            list(range(int(min(values[below], values[above])), int(max(values[below], values[above])) + 1))
        fine_buds = bud_curve(model, method, config, fine, probes, on_probe=trying(fine, n_probes))
        values, buds = values + fine, buds + fine_buds
        best = min(range(len(values)), key=lambda i: abs(buds[i] - target))
    value = values[best]
    show(f"{knob.name}={value:.4g} gives BUD {buds[best]:.1%}", total, total)
    info = {"name": knob.name, "value": value, "target": target, "probe_bud": buds[best], "within_tolerance": abs(buds[best] - target) <= TOLERANCE}
    return replace(config, {knob.name: value}, method), info


def _length(probes) -> int:
    return (probes if isinstance(probes, torch.Tensor) else probes[0]).shape[1]
