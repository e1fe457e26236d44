"""topk-decode: exact top-k every decode step (the oracle PrHS approximates).

Per (sequence, KV head): score every valid cached position with the group's
queries, rank by the group's mean softmax probability, keep sinks + window +
the top (budget - forced) others. Every position is scored, so the exact dropped
mass delta of every step comes for free.
"""

from __future__ import annotations

from stem_cli.decode.common import (
    NEG_INF,
    Selection,
    StepContext,
    dropped_from_probs,
    full_logits,
    row_budget,
    salient_width,
    softmax_rows,
    topk_rows,
    with_forced,
)
from stem_cli.decode.config import TopkDecodeConfig


def exact_topk(ctx: StepContext, config, logits=None) -> tuple:
    """(indices (B, Hkv, F + K), full-softmax probabilities (B, Hkv, g, T), logits)."""
    logits = full_logits(ctx) if logits is None else logits
    p = softmax_rows(logits)
    scores = p.mean(2).masked_fill((ctx.forced_mask() | ~ctx.valid_mask())[:, None, :], NEG_INF)
    k_rows = (row_budget(ctx, config.budget, config.budget_fraction) - ctx.forced_count())[:, None]
    salient = topk_rows(scores, k_rows, salient_width(ctx, config.budget, config.budget_fraction))
    return with_forced(ctx, salient), p, logits


def select(ctx: StepContext, config: TopkDecodeConfig, state: dict) -> Selection:
    idx, p, logits = exact_topk(ctx, config)
    rows = ctx.batch * ctx.kv_heads
    known = idx.new_ones(ctx.batch, ctx.kv_heads, dtype=bool)
    return Selection(idx, dropped_from_probs(p, idx), known, logits, decisions=rows, anchors=rows)


DEFAULTS = TopkDecodeConfig()
DESCRIPTION = "exact top-k of the cached positions every decode step (+ sinks + window); the oracle PrHS approximates"
