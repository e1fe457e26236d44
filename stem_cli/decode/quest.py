"""quest: page-level top-k by an upper bound on the page's attention scores (Quest, Tang et al. 2024).

The cache is cut into pages of page_size tokens (from position 0). Each page keeps
the per-channel minimum m and maximum M of its valid keys. For a query q,

    U(q, page) = sum_d max(q_d m_d, q_d M_d) = q+ . M + q- . m      (q+ = max(q, 0), q- = min(q, 0))

bounds q . k from above for every key k of the page (each term bounds q_d k_d).
Pages are ranked per (sequence, KV head) by the group's mean softmax over pages of
scale * U, and the top (budget - forced) // page_size pages are kept whole, with
sinks and window. Full pages' min/max (empty pages' prepared) are computed once and cached for the
generation (Quest keeps them as page metadata); only the last, partial page is
recomputed each step. Nothing scores every key, so delta is known only in audit mode.
"""

from __future__ import annotations

import torch

from stem_cli.decode.common import (
    NEG_INF,
    Selection,
    StepContext,
    row_budget,
    salient_width,
    topk_rows,
    with_forced,
)
from stem_cli.decode.config import QuestConfig


def page_min_max(k: torch.Tensor, key_valid: torch.Tensor | None, page_size: int) -> tuple:
    """k (B, Hkv, n, d) with n a multiple of page_size -> (min, max) (B, Hkv, n / page_size, d) float32
    over each page's valid keys; a page with no valid key gets min = +inf, max = -inf."""
    b, h, n, d = k.shape
    pages = k.reshape(b, h, n // page_size, page_size, d)  # min/max are exact in the cache's dtype
    if key_valid is None:
        return pages.amin(3).float(), pages.amax(3).float()
    valid = key_valid.reshape(b, 1, n // page_size, page_size, 1)
    return pages.masked_fill(~valid, float("inf")).amin(3).float(), pages.masked_fill(~valid, NEG_INF).amax(3).float()


def page_upper_bound(q: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """q (B, Hkv, g, d), mins/maxs (B, Hkv, P, d) -> (B, Hkv, g, P) upper bounds on q . k (-inf for empty pages)."""
    return prepared_upper_bound(q, *prepare_pages(mins, maxs))


def prepare_pages(mins: torch.Tensor, maxs: torch.Tensor) -> tuple:
    """(min, max) -> (lo, hi, empty): empty pages' (B, Hkv, P) bounds zeroed, what every step's bound reads."""
    empty = ~torch.isfinite(mins).all(-1)  # (B, Hkv, P)
    lo = torch.where(empty[..., None], torch.zeros_like(mins), mins)
    hi = torch.where(empty[..., None], torch.zeros_like(maxs), maxs)
    return lo, hi, empty


def prepared_upper_bound(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    qf = q.float()
    u = qf.clamp_min(0) @ hi.transpose(-1, -2) + qf.clamp_max(0) @ lo.transpose(-1, -2)
    return u.masked_fill(empty[:, :, None, :], NEG_INF)


def _bounds(ctx: StepContext, state: dict, page_size: int) -> torch.Tensor:
    """(B, Hkv, g, P) upper bounds for every page: full pages' metadata (min/max, with empty pages'
    zeroed, prepared once) from the generation's cache of them, extended as pages fill up (one page
    every page_size steps); the last, partial page's recomputed (< page_size keys). Assumes an
    append-only cache between pre-fills (the runtime drops the state at each pre-fill)."""
    t = ctx.n_keys
    n_full = t // page_size
    cached = state.get("pages")
    done = 0 if cached is None else cached[0].shape[2]
    if done > n_full or (cached is not None and cached[0].shape[:2] != ctx.k.shape[:2]):  # not the same generation
        cached, done = None, 0
    if n_full > done:
        lo, hi = done * page_size, n_full * page_size
        valid = None if ctx.key_valid is None else ctx.key_valid[:, lo:hi]
        new = prepare_pages(*page_min_max(ctx.k[:, :, lo:hi], valid, page_size))
        cached = new if cached is None else tuple(torch.cat([a, b], 2) for a, b in zip(cached, new))
        state["pages"] = cached  # (lo, hi, empty) of the full pages
    parts = [] if cached is None else [prepared_upper_bound(ctx.q, *cached)]
    if t % page_size:
        lo = n_full * page_size
        tail = ctx.k[:, :, lo:]
        valid = None if ctx.key_valid is None else ctx.key_valid[:, lo:]
        t_min, t_max = page_min_max(tail, valid, tail.shape[2])  # one page of t % page_size keys
        parts.append(page_upper_bound(ctx.q, t_min, t_max))
    return torch.cat(parts, dim=-1)


def select(ctx: StepContext, config: QuestConfig, state: dict) -> Selection:
    ps = config.page_size
    bound = _bounds(ctx, state, ps) * ctx.scale  # (B, Hkv, g, P)
    lse = torch.logsumexp(bound, dim=-1, keepdim=True)
    score = torch.exp(bound - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))).mean(2)  # (B, Hkv, P)
    n_pages = score.shape[-1]
    first = torch.arange(n_pages, device=ctx.device) * ps
    all_window = (first >= ctx.window_start())[None, :]
    all_sinks = (first + ps)[None, :] <= (ctx.start + ctx.sinks)[:, None]  # pages wholly before the sinks' end
    score = score.masked_fill((all_window | all_sinks)[:, None, :], NEG_INF)
    score = score.masked_fill(~torch.isfinite(bound).any(2), NEG_INF)
    k_pages = ((row_budget(ctx, config.budget, config.budget_fraction) - ctx.forced_count()) // ps)[:, None]
    pages = topk_rows(score, k_pages, salient_width(ctx, config.budget, config.budget_fraction) // ps)
    tokens = (pages[..., None] * ps + torch.arange(ps, device=ctx.device)).flatten(-2)
    ok = (pages[..., None] >= 0).expand(*pages.shape, ps).flatten(-2) & (tokens < ctx.n_keys)
    safe = torch.where(ok, tokens, torch.zeros_like(tokens))
    ok &= ctx.valid_at(safe) & ~ctx.forced_at(safe)  # O(kept tokens), not O(T)
    tokens = torch.where(ok, tokens, torch.full_like(tokens, -1))
    rows = ctx.batch * ctx.kv_heads
    return Selection(with_forced(ctx, tokens), decisions=rows, anchors=rows)


DEFAULTS = QuestConfig()
DESCRIPTION = "Quest: per page of 16 tokens, min/max keys bound q.k from above; keep the top pages (+ sinks + window)"
