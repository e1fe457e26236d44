"""Today's PrHS selection before the device-side rewrite (issue 18): the test oracle.

The same algorithm as prhs.select (see its module docstring), computed the way it
was: one host sync per layer-step reads which rows re-anchor, and only those rows
are scored (their keys read in place when few re-anchor). prhs.select must give the
same anchors, index sets, deltas and state, step by step (tests/test_prhs.py).
Not used by the runtime.
"""

from __future__ import annotations

import torch

from stem_cli.decode.common import (
    NEG_INF,
    Selection,
    StepContext,
    dedupe,
    drop_fraction,
    dropped_from_probs,
    freeze_fraction,
    full_logits,
    pad_to,
    row_budget,
    salient_width,
    schedule_count,
    softmax_rows,
    topk_rows,
)
from stem_cli.decode.config import PrhsConfig
from stem_cli.decode.prhs import compact, delta_check, dilate, running_key_norm, share_count


def _put(state: dict, key: str, rows, value: torch.Tensor, n_rows: int, fill) -> None:
    """state[key][rows] = value for flat per-row state; the last dim may differ and is padded with fill.
    rows: None (every row) or a LongTensor of row ids (index_copy_: no host sync)."""
    cur = state.get(key)
    if cur is None or cur.shape[0] != n_rows or cur.shape[1:-1] != value.shape[1:-1]:
        cur = value.new_full((n_rows, *value.shape[1:]), fill)
    if value.dim() > 1 and cur.shape[-1] != value.shape[-1]:
        width = max(cur.shape[-1], value.shape[-1])
        cur, value = (torch.cat([x, x.new_full((*x.shape[:-1], width - x.shape[-1]), fill)], -1) for x in (cur, value))
    if rows is None:
        cur = value.clone()
    else:
        cur = cur.index_copy(0, rows, value.to(cur.dtype))
    state[key] = cur



def _anchor_rows(anchor: torch.Tensor, n_anchor: int) -> torch.Tensor:
    """The ids of the True rows, ascending, given their count (no host sync, unlike nonzero())."""
    order = torch.sort(anchor.to(torch.int8), descending=True, stable=True).indices
    return order[:n_anchor]


def select(ctx: StepContext, config: PrhsConfig, state: dict) -> Selection:
    """One layer-step. Host syncs: none at an anchor-only step (the first after a pre-fill, or the time
    selector off); ONE otherwise (reading how many rows re-anchor, with the counters, in one copy), which
    decides whether anything scores the cache. A shared step (no row re-anchors) is O(budget): the
    cosine test, the anchor's stored set, the forced positions. Rows that re-anchor while others share:
    when at most half the rows anchor, only theirs score the cache (one product per row on its keys in
    place: O(T) per anchor row, no copy of the cache); when more do, one batched product scores every
    row (fewer launches, at most twice the key reads) and the anchor rows' logits are kept."""
    b, h, t = ctx.batch, ctx.kv_heads, ctx.n_keys
    n_rows, g = b * h, ctx.q.shape[2]
    flat_b = torch.arange(n_rows, device=ctx.device) // h
    ws = ctx.window_start()
    f_drop = drop_fraction(ctx.layer, ctx.num_layers, phi=config.phi, alpha=config.alpha, start=config.depth_start) if config.uses("depth") else 0.0
    f_freeze = freeze_fraction(ctx.layer, ctx.num_layers, psi=config.psi, gamma=config.gamma, start=config.freeze_start) if config.uses("layer") else 0.0
    frozen = schedule_count(f_freeze, t)  # host-side: an upper bound of every row's frozen count
    sink_end = (ctx.start + ctx.sinks).clamp_max(ws)
    drop_end = (sink_end + schedule_count(f_drop, ctx.n_valid)).clamp_max(ws) if f_drop > 0 else sink_end  # t = each sequence's valid tokens
    width = salient_width(ctx, config.budget, config.budget_fraction)
    forced = ctx.forced_indices()[flat_b]  # (R, F)
    check = delta_check(config) if config.max_delta > 0 else None
    need_full = config.audit or check is not None or frozen == 0
    kmax = running_key_norm(ctx, state) if check == "bound" else None  # O(new keys) per step

    logits_all = full_logits(ctx).flatten(0, 1) if config.audit else None  # (R, g, T)
    p_all = None
    qf = ctx.q.float().flatten(0, 1)  # (R, g, d)
    delta = torch.zeros(n_rows, g, device=ctx.device)
    known = torch.zeros(n_rows, dtype=torch.bool, device=ctx.device)
    shared_idx = None
    n_cos = n_fallback = 0
    anchor = None  # None: every row anchors

    if config.uses("time") and state.get("has") is not None and state["has"].shape[0] == n_rows:
        qa = state["q"]
        qa_norm = state.get("q_norm")
        if qa_norm is None or qa_norm.shape != qa.shape[:-1]:
            qa_norm = qa.norm(dim=-1)
        cos = (qf * qa).sum(-1) / (qf.norm(dim=-1) * qa_norm).clamp_min(1e-12)
        similar = cos.amin(-1) > config.tau
        share, cos_fail = state["has"] & similar, state["has"] & ~similar
        static = state["static"]
        keep_static = (static >= 0) & (static < ws)
        if f_drop > 0:
            keep_static &= ~((static >= sink_end[flat_b, None]) & (static < drop_end[flat_b, None]))
        shared_idx = torch.cat([forced, torch.where(keep_static, static, torch.full_like(static, -1))], dim=-1)
        fallback = None
        if check is not None:
            if check == "exact":
                logits_all = full_logits(ctx).flatten(0, 1) if logits_all is None else logits_all
                p_all = softmax_rows(logits_all)
                est = dropped_from_probs(p_all, shared_idx)
                delta, known = torch.where(share[:, None], est, delta), share.clone()
            else:
                fpos = state["forced_pos"]
                sink_slot = torch.arange(fpos.shape[-1], device=ctx.device) < ctx.sinks
                kept_forced = (fpos >= 0) & (sink_slot | (fpos >= ws))
                m = (state["p_forced"] * kept_forced[:, None, :]).sum(-1) + (state["p_static"] * keep_static[:, None, :]).sum(-1)
                m = m.clamp(0.0, 1.0)
                if check == "anchor":
                    est = 1.0 - m
                else:
                    eps = ctx.scale * (qf - qa).norm(dim=-1) * state["kmax"][:, None]
                    est = (1.0 - m) / ((1.0 - m) + torch.exp(-2.0 * eps) * m).clamp_min(1e-30)
                est = torch.where((state["T"] >= ws)[:, None], est, torch.ones_like(est))
            fallback = share & (est.amax(-1) > config.max_delta)
            share = share & ~fallback
            known = known & share
        anchor = ~share
        counts = [cos_fail.sum()] + ([fallback.sum()] if fallback is not None else [])
        # THE host sync of the step (one copy): which rows re-anchor decides whether anything scores
        # the cache, and which keys are read; the counters come along.
        got = torch.cat([anchor.long(), torch.stack(counts)]).tolist()
        host_rows = [i for i, a in enumerate(got[:n_rows]) if a]
        n_anchor, n_cos = len(host_rows), got[n_rows]
        n_fallback = got[n_rows + 1] if fallback is not None else 0
    else:
        n_anchor, host_rows = n_rows, None

    out_width = forced.shape[-1] + width
    final = (pad_to(shared_idx, out_width) if shared_idx is not None
             else torch.full((n_rows, out_width), -1, dtype=torch.long, device=ctx.device))
    out_width = final.shape[-1]

    if n_anchor:
        rows = None if n_anchor == n_rows else _anchor_rows(anchor, n_anchor)
        rb = flat_b if rows is None else flat_b.index_select(0, rows)  # the rows' sequences, for (B, ...) tensors
        pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))  # flat (R, ...) tensors
        freeze_end = (sink_end + schedule_count(f_freeze, ctx.n_valid)).clamp_max(ws)
        excl_end = torch.maximum(drop_end, freeze_end)  # [sink_end, excl_end): never scored at an anchor
        avail = pick((row_budget(ctx, config.budget, config.budget_fraction) - ctx.forced_count())[flat_b])  # (Ra,)
        forced_a = pick(forced)
        # Before lo lie only padding, sinks and frozen tokens, for every row: with left padding,
        # start + floor(f (T - start)) >= floor(f T). Those logits are never computed.
        lo = 0 if need_full else min(ctx.sinks + schedule_count(f_freeze, t), ws)
        pos = torch.arange(lo, t, device=ctx.device)
        if logits_all is not None:
            lo, pos, logits = 0, torch.arange(t, device=ctx.device), pick(logits_all)
        else:
            if rows is None:
                logits = full_logits(ctx, lo).flatten(0, 1)
            elif 2 * n_anchor > n_rows:  # most rows anchor: one batched product over every row, then theirs
                logits = full_logits(ctx, lo).flatten(0, 1).index_select(0, rows)
            else:  # a few rows anchor: only their keys are read (in place, no gathered copy of the cache)
                logits = full_logits(ctx, lo, rows=rows, host_rows=host_rows)
            if lo > 0:  # the softmax of the unfrozen suffix, the same for every row whatever its padding
                logits = logits.masked_fill((pos < freeze_end[rb, None])[:, None, :], NEG_INF)
        p = softmax_rows(logits)  # (Ra, g, T - lo); the full softmax when lo == 0
        cand = (ctx.valid_mask()[rb, lo:] & ~ctx.forced_mask()[rb, lo:]
                & ~((pos >= sink_end[rb, None]) & (pos < excl_end[rb, None])))
        scores = p.mean(1).masked_fill(~cand, NEG_INF)
        prev = ctx.prev_indices
        if frozen > 0 and prev is not None:
            prev = pick(prev)
            inherit = (prev >= drop_end[rb, None]) & (prev < freeze_end[rb, None])
            inherited = compact(torch.where(inherit, prev, torch.full_like(prev, -1)), min(frozen, width))
        else:
            inherited = forced.new_full((rb.shape[0], 0), -1)
        n_inherited = (inherited >= 0).sum(-1)
        free = (avail - n_inherited).clamp_min(0)
        ranked = topk_rows(scores, free, width)
        ranked = torch.where(ranked >= 0, ranked + lo, ranked)
        anchor_idx = torch.cat([forced_a, compact(torch.cat([inherited, ranked], -1), width)], dim=-1)
        d_a = dropped_from_probs(p, anchor_idx) if lo == 0 else None
        if check is not None and (f_drop > 0 or f_freeze > 0):
            # max_delta guards the depth and layer selectors too: a row whose restricted set drops more
            # than max_delta falls back to exact top-k over every candidate (lo == 0 here: exact delta).
            # Computed for every anchor row and chosen per row by mask: no host sync.
            bad = d_a.amax(-1) > config.max_delta
            n_fallback = n_fallback + bad.sum()
            every = ctx.valid_mask()[rb] & ~ctx.forced_mask()[rb]
            exact = topk_rows(p.mean(1).masked_fill(~every, NEG_INF), avail, width)
            ranked = torch.where(bad[:, None], exact, ranked)
            inherited = torch.where(bad[:, None], torch.full_like(inherited, -1), inherited)
            free = (avail - (inherited >= 0).sum(-1)).clamp_min(0)
            exact_idx = torch.cat([forced_a, compact(exact, width)], dim=-1)
            anchor_idx = torch.where(bad[:, None], exact_idx, anchor_idx)
            d_a = torch.where(bad[:, None], dropped_from_probs(p, exact_idx), d_a)
        if d_a is not None:
            if rows is None:
                delta, known = d_a, torch.ones_like(known)
            else:
                delta = delta.index_copy(0, rows, d_a.to(delta.dtype))
                known = known.index_fill(0, rows, True)
        if rows is None:
            final = pad_to(anchor_idx, out_width)
        else:
            final = final.index_copy(0, rows, pad_to(anchor_idx, out_width))

        if config.uses("time"):
            top, around = dilate(ranked, share_count(free, config.r), config.r)
            ok = (around >= 0) & (around < t)
            safe = torch.where(ok, around, torch.zeros_like(around))
            ok &= ctx.valid_mask()[rb].gather(1, safe) & (safe >= excl_end[rb, None])  # not padding, sinks, dropped or frozen
            around = torch.where(ok, around, torch.full_like(around, -1))
            static = compact(dedupe(torch.cat([inherited, top, around], -1)), width)
            n, ra_count = n_rows, rb.shape[0]
            qa_rows = pick(qf)
            _put(state, "q", rows, qa_rows, n, 0.0)
            _put(state, "q_norm", rows, qa_rows.norm(dim=-1), n, 1.0)  # what every later cosine test divides by
            _put(state, "has", rows, torch.ones(ra_count, dtype=torch.bool, device=ctx.device), n, False)
            _put(state, "T", rows, torch.full((ra_count,), t, dtype=torch.long, device=ctx.device), n, 0)
            _put(state, "static", rows, static, n, -1)
            if check in ("bound", "anchor"):  # lo == 0 here: p is the full softmax
                def at(idx):
                    got = p.gather(2, idx.clamp_min(0)[:, None, :].expand(-1, g, -1))
                    return got.masked_fill((idx < 0)[:, None, :], 0.0)

                _put(state, "p_static", rows, at(static), n, 0.0)
                _put(state, "p_forced", rows, at(forced_a), n, 0.0)
                _put(state, "forced_pos", rows, forced_a, n, -1)
                if kmax is not None:
                    _put(state, "kmax", rows, pick(kmax), n, 0.0)

    logits_out = logits_all.view(b, h, g, t) if logits_all is not None else None
    return Selection(
        final.view(b, h, out_width), delta.view(b, h, g), known.view(b, h), logits_out,
        decisions=n_rows, anchors=n_anchor, cosine_reanchors=n_cos, fallbacks=n_fallback,
    )
