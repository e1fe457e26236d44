"""Stem: Token Position-Decay budgets over Output-Aware block logits (spec section 1)."""

from __future__ import annotations

import torch

from stem_cli.config import StemConfig
from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref
from stem_cli.kernels import score


def select(q, k, v, *, layer: int, config: StemConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    batch, hq, n, _ = q.shape
    p = -(-n // config.block_size)
    logits = score.block_logits(
        q, k, v, block_size=config.block_size, stride=config.stride, beta=config.beta, scale=scale, key_valid=key_valid
    )
    if config.gqa == "kv":
        # One selection per KV head: the group's mean logit (-inf stays -inf, since
        # every head of a group shares its causal and padding structure).
        logits = logits.view(batch, k.shape[1], hq // k.shape[1], p, p).mean(2)
    first = ref.first_valid_block(key_valid, batch, config.block_size, q.device)
    lengths = torch.full((batch,), n) if key_valid is None else key_valid.sum(-1).cpu()
    budget = ref.row_budgets(
        p, lengths, first, schedule=config.schedule, mu=config.mu, tpd=config.tpd, k_scale=config.k_scale, k_start=config.k_start
    )
    forced = ref.forced_blocks(p, first, config.sink_blocks, config.window_blocks)
    return ref.select_topk(logits, budget, forced, block_size=config.block_size, seq_len=n)


DEFAULTS = StemConfig()
DESCRIPTION = "Stem: TPD per-row budget (decays to mu*k_start) + Output-Aware Metric (score + beta*value norm)"
