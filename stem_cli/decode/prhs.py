"""prhs: pre-hoc KV selection for decoding (PrHS), with the dropped mass reported and bounded.

Per layer and (sequence, KV head) row, each decode step keeps sinks + window +
a salient set, chosen before scoring wherever it can be:

time (index sharing). An anchor step scores every candidate position and keeps
  the exact top (budget - forced) by the group's mean softmax probability (as
  topk-decode). It stores its query and a shared set: its best k_a salient
  positions, k_a the largest count with k_a + 2r ceil(k_a / 3) <= the salient
  budget, dilated by +-r positions around the top third (ceil(k_a / 3)) of them.
  A later step whose queries all have cosine similarity > tau with the anchor's
  (the minimum over the GQA group, since the set serves every head of it) keeps
  sinks + the current window + the shared set (minus what the window now covers or
  the progressive window now drops) and scores nothing; otherwise it re-anchors.
  Shared steps keep at most the budget, like every other step.
depth (progressive window). From l_s = floor(depth_start L) on, layer l drops the
  oldest floor((1 - phi^(alpha (l - l_s)/(L - l_s))) t) tokens after the sinks
  (t = the sequence's context length, padding excluded; the recent window is
  never dropped).
layer (early-token freezing). From l_f = floor(freeze_start L) on, layer l freezes
  the first floor((1 - psi^(gamma (l - l_f)/(L - l_f))) t) tokens after the sinks:
  an anchor step does not score them and keeps, there, what the previous sparse
  layer kept at this step (cross-layer sharing). Their logits are never computed
  unless the full scores are needed anyway (audit, max_delta).

Dropped mass. Anchor steps that scored every position know their exact delta.
With max_delta > 0 every anchor scores every position, and an anchor row whose
set (with the depth and layer selectors' restrictions) drops more than max_delta
falls back to exact top-k over all candidates (a "fallback"); a shared set's
delta is estimated before it is used, and a row whose estimate exceeds max_delta
re-anchors (also a fallback). Only exact top-k itself can then exceed the bound
(counted as over_max_delta: the budget is too small for it). Estimates:
- 'exact': a dense scoring pass gives delta exactly (the default when audit is on,
  which computes that pass anyway);
- 'bound' (default otherwise): with m the anchor query's full-softmax mass on the
  old positions the set still keeps, and eps = scale ||q - q_a|| max_j ||k_j||
  bounding every logit's change, delta <= (1 - m) / ((1 - m) + e^(-2 eps) m).
  A guarantee (tokens added since the anchor must all be in the window, else the
  row falls back), but loose: large query drifts always fall back;
- 'anchor': 1 - m, the anchor query's view of the set (cheap, no guarantee).

On a CUDA bf16/fp16 cache with max_delta = 0 and no audit, a layer-step's selection is three Triton launches and
no torch op (select_fused): kernels/prhs_share.py decides every row and writes the sharing rows' index,
kernels/prhs_select.py scores the re-anchoring rows (a row that shares reads nothing there) and ranks them in one
launch whose tree of merges runs on tickets, its last program per row writing the index, dropped mass and stored
set (kernels/prhs_anchor_rows.py) and its last row the step's counts, added to the runtime's counters in place.
The PyTorch path of select() was ~190 ops per layer-step, a fixed cost at every length. The same sets as the
PyTorch path, which serves every other case (TRITON_SELECT switches).
"""

from __future__ import annotations

import importlib.util
import warnings

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


def delta_check(config: PrhsConfig) -> str:
    if config.delta_check == "auto":
        return "exact" if config.audit else "bound"
    return config.delta_check


def share_count(avail: torch.Tensor, r: int) -> torch.Tensor:
    """Largest k with k + 2r ceil(k/3) <= avail (elementwise)."""
    k = (3 * avail.clamp_min(0)) // (3 + 2 * r)
    for _ in range(r + 2):
        k = torch.where(k + 2 * r * ((k + 2) // 3) > avail, (k - 1).clamp_min(0), k)
    return k


def dilate(ranked: torch.Tensor, k_a: torch.Tensor, r: int) -> tuple:
    """Ranked salient rows (R, W) best first, counts k_a (R,) -> (kept top k_a (R, W),
    the +-r neighbours of the top ceil(k_a/3) (R, 2r W)), -1 elsewhere."""
    rank = torch.arange(ranked.shape[-1], device=ranked.device)
    top = torch.where((rank < k_a[:, None]) & (ranked >= 0), ranked, torch.full_like(ranked, -1))
    third = torch.where((rank < ((k_a + 2) // 3)[:, None]) & (ranked >= 0), ranked, torch.full_like(ranked, -1))
    around = [torch.where(third >= 0, third + o, torch.full_like(third, -1)) for o in range(-r, r + 1) if o != 0]
    return top, torch.cat(around, dim=-1) if around else ranked[:, :0]


def compact(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Used entries first (descending), cut or padded to width."""
    if idx.shape[-1] == 0:
        return pad_to(idx, width)
    s, _ = torch.sort(idx, dim=-1, descending=True)
    return pad_to(s[..., :width], width)


# None: the Triton selection (kernels/prhs_select.py) wherever it serves (a CUDA bf16/fp16 cache, max_delta = 0,
# no audit, the widths below its limits); False: always the PyTorch path (the benchmark's "old" PrHS);
# True: the Triton path wherever the config allows, on the CPU too (the tests run it in the Triton interpreter).
TRITON_SELECT: bool | None = None
_announced: set = set()


def triton_path(ctx: StepContext, config: PrhsConfig, check, width: int) -> bool:
    """Whether this layer-step's selection runs in the Triton kernels. A CUDA step that could but does not
    says why once (a slower path, never taken silently)."""
    if TRITON_SELECT is False or importlib.util.find_spec("triton") is None:
        return False
    on_gpu = ctx.q.is_cuda and ctx.q.dtype in (torch.bfloat16, torch.float16)
    if not (on_gpu or TRITON_SELECT):
        return False
    from stem_cli.kernels.prhs_select import MAX_SORT, topk_plan

    reason = None
    if config.audit or check is not None:
        reason = "audit or max_delta > 0 (full softmax needed)"
    elif topk_plan(ctx.n_keys, width) is None or (3 + 2 * config.r) * width + ctx.sinks + ctx.window > MAX_SORT:
        reason = f"salient width {width} wider than the Triton selection serves"
    if reason is not None:
        if on_gpu and reason not in _announced:
            _announced.add(reason)
            warnings.warn(f"PrHS selection takes the PyTorch path (slower): {reason}", stacklevel=3)
        return False
    return True


def _store(state: dict, key: str, rows: torch.Tensor | None, value: torch.Tensor, n_rows: int, fill) -> None:
    """state[key][r] = value[r] for the rows r where `rows` (R,) bool is True (None: every row), for flat
    per-row state; the last dim may differ and is padded with fill. In place wherever the buffer fits,
    so a CUDA graph that captured the step replays into the state it reads next time. No host sync."""
    cur = state.get(key)
    if cur is None or cur.dim() != value.dim() or cur.shape[0] != n_rows or cur.shape[1:-1] != value.shape[1:-1]:
        cur = state[key] = value.new_full((n_rows, *value.shape[1:]), fill)
    if value.dim() > 1 and cur.shape[-1] != value.shape[-1]:
        width = max(cur.shape[-1], value.shape[-1])
        if cur.shape[-1] < width:  # a wider set than before (budget_fraction on a longer context): a new buffer
            cur = state[key] = torch.cat([cur, cur.new_full((*cur.shape[:-1], width - cur.shape[-1]), fill)], -1)
        value = torch.cat([value, value.new_full((*value.shape[:-1], width - value.shape[-1]), fill)], -1)
    value = value.to(cur.dtype)
    if rows is None:
        cur.copy_(value)
    else:
        cur.copy_(torch.where(rows.view(-1, *([1] * (value.dim() - 1))), value, cur))


def running_key_norm(ctx: StepContext, state: dict) -> torch.Tensor:
    """(B * Hkv,) max_j ||k_j|| over the valid cached keys, kept incrementally: each step folds in only
    the keys added since the last call (one, in generation), instead of a pass over the whole cache.
    The cache is append-only between pre-fills (the runtime drops the state at each pre-fill); a
    shorter cache, or another batch shape, starts over."""
    t = ctx.n_keys
    seen = state.get("kmax_len", 0)
    run = state.get("kmax_run")
    if run is None or seen > t or run.shape[0] != ctx.batch * ctx.kv_heads:
        run, seen = None, 0
    if t > seen:
        k = ctx.k[:, :, seen:]
        norms = torch.linalg.vector_norm(k, dim=-1, dtype=torch.promote_types(k.dtype, torch.float32))
        if ctx.key_valid is not None:
            norms = norms.masked_fill(~ctx.key_valid[:, None, seen:], 0.0)
        new = norms.amax(-1).flatten()
        run = new if run is None else torch.maximum(run, new)
        state["kmax_run"], state["kmax_len"] = run, t
    return run


def score_rows(ctx: StepContext, lo: int, rows: torch.Tensor | None) -> torch.Tensor:
    """(R, g, T - lo) logits as full_logits(ctx, lo) gives them, for the rows where `rows` (R,) bool is True
    (None: every row). Other rows may hold -inf instead (their result is discarded): on a GPU the Triton
    gated scoring kernel reads no key of a row that does not re-anchor, so a shared step costs O(budget)
    memory traffic, not O(T), with no host sync to find out which rows those are."""
    if rows is not None and ctx.q.is_cuda and ctx.q.dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("triton"):
        from stem_cli.kernels.sparse_decode import gated_logits

        logits = gated_logits(ctx.q, ctx.k, rows, lo=lo, scale=ctx.scale)
        if ctx.key_valid is not None:
            logits = logits.masked_fill(~ctx.key_valid.repeat_interleave(ctx.kv_heads, 0)[:, None, lo:], NEG_INF)
        return logits
    return full_logits(ctx, lo).flatten(0, 1)


def _row_state(state: dict, n_rows: int, g: int, d: int, width: int, device) -> None:
    """The fused path's per-row anchor state, made once (and remade for another batch shape; the stored
    set widened when budget_fraction widens it): the kernels update it in place, so a CUDA graph that
    captured a step replays into the state it reads next time."""
    q = state.get("q")
    if q is None or q.shape != (n_rows, g, d) or state.get("static") is None:
        state["q"] = torch.zeros(n_rows, g, d, device=device)
        state["q_norm"] = torch.ones(n_rows, g, device=device)
        state["has"] = torch.zeros(n_rows, dtype=torch.bool, device=device)
        state["T"] = torch.zeros(n_rows, dtype=torch.long, device=device)
        state["static"] = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
    elif state["static"].shape[-1] < width:
        static = state["static"]
        state["static"] = torch.cat([static, static.new_full((n_rows, width - static.shape[-1]), -1)], -1)


def select_fused(ctx: StepContext, config: PrhsConfig, state: dict, *, width: int, lo: int, frozen: int,
                 fractions: tuple[float, float]) -> Selection:
    """select() for max_delta = 0 without audit on the Triton path: one kernel decides every row (share or
    re-anchor, kernels/prhs_share.py) and writes the sharing rows' index; the gated scoring, then one launch of
    the exact top-k (kernels/prhs_select.py) whose program finishing each re-anchoring row writes its index,
    dropped mass and stored set (kernels/prhs_anchor_rows.py), and whose last row sums the step's counts (into
    ctx.count_into too, when the runtime gives it). Three launches whatever the cache length, reading O(budget)
    of the cache on a step where every row shares. Same sets, deltas and state as select()."""
    from stem_cli.kernels.prhs_anchor_rows import epilogue
    from stem_cli.kernels.prhs_select import anchor_topk, tickets_size, topk_plan
    from stem_cli.kernels.prhs_share import prhs_share

    b, h, t = ctx.batch, ctx.kv_heads, ctx.n_keys
    n_rows, g, d = b * h, ctx.q.shape[2], ctx.q.shape[3]
    _row_state(state, n_rows, g, d, width, ctx.device)
    key = ("fractions", *fractions, config.budget_fraction)
    if state.get("fractions_key") != key:  # made once per layer (a host-to-device copy: not inside a graph)
        state["fractions"] = torch.tensor([*fractions, config.budget_fraction], dtype=torch.float64, device=ctx.device)
        state["fractions_key"] = key
    need = tickets_size(n_rows, topk_plan(t - lo, width)[2])
    if state.get("tickets") is None or state["tickets"].numel() < need:  # zeros once; every launch leaves them zero
        state["tickets"] = torch.zeros(need, dtype=torch.int32, device=ctx.device)
    valid = ctx.key_valid.to(torch.int8) if ctx.key_valid is not None else None
    prev = ctx.prev_indices if frozen > 0 else None
    cap = min(frozen, width)
    use_time = config.uses("time")
    index, anchor, flags, info, delta, known = prhs_share(
        ctx.q, state["q"], state["q_norm"], state["has"], state["T"], state["static"], valid, ctx.start, ctx.n_valid,
        prev, state["fractions"], n_keys=t, sinks=ctx.sinks, window=ctx.window, budget=config.budget, tau=config.tau,
        inherit_cap=cap, salient_width=max(width, state["static"].shape[-1]), use_time=use_time,
        use_fraction=config.budget_fraction > 0, scored_all=lo == 0)
    counts = torch.empty(3, dtype=torch.int32, device=ctx.device)  # (anchors, cosine re-anchors, kept positions)
    ep = epilogue(info, min(width, t - lo), prev, valid, None, lo == 0, index, state["static"], delta, flags, counts,
                  ctx.count_into, n_keys=t, n_forced=ctx.sinks + ctx.window, width=width, inherit_cap=cap, r=config.r,
                  use_time=use_time)
    anchor_topk(ctx.q, ctx.k, anchor, lo=lo, scale=ctx.scale, key_valid=valid, start=ctx.start,
                freeze_end=info[2] if lo > 0 else None, sink_end=info[0], excl_end=info[3],
                window_start=ctx.window_start(), sinks=ctx.sinks, k_rows=info[4], width=width,
                tickets=state["tickets"], epilogue=ep)
    return Selection(index.view(b, h, -1), delta.view(b, h, g), known.view(b, h), None,
                     decisions=n_rows, anchors=counts[0], cosine_reanchors=counts[1], fallbacks=0, device_counts=counts,
                     counted=ctx.count_into is not None)


def select(ctx: StepContext, config: PrhsConfig, state: dict) -> Selection:
    """One layer-step, with no host sync: which rows re-anchor is a device mask. Both branches are
    computed for every row and chosen per row (torch.where): the shared set (O(budget): the cosine test,
    the anchor's stored set, the forced positions) and the anchor set (exact top-k over the scored
    positions). Scoring reads only the re-anchoring rows' keys on a GPU (score_rows), so a step where every
    row shares reads O(budget) of the cache. The selections, deltas and state equal the host-synchronising
    version's (prhs_reference.py, the tests' oracle) step by step; the state is updated in place, so a
    CUDA graph of the whole decode step replays correctly. Counters are 0-d device tensors."""
    b, h, t = ctx.batch, ctx.kv_heads, ctx.n_keys
    n_rows, g = b * h, ctx.q.shape[2]
    ws = ctx.window_start()
    f_drop = drop_fraction(ctx.layer, ctx.num_layers, phi=config.phi, alpha=config.alpha, start=config.depth_start) if config.uses("depth") else 0.0
    f_freeze = freeze_fraction(ctx.layer, ctx.num_layers, psi=config.psi, gamma=config.gamma, start=config.freeze_start) if config.uses("layer") else 0.0
    frozen = schedule_count(f_freeze, t)  # host-side (from the shape): an upper bound of every row's frozen count
    width = salient_width(ctx, config.budget, config.budget_fraction)
    check = delta_check(config) if config.max_delta > 0 else None
    need_full = config.audit or check is not None or frozen == 0
    if triton_path(ctx, config, check, width):
        lo = 0 if need_full else min(ctx.sinks + frozen, ws)
        return select_fused(ctx, config, state, width=width, lo=lo, frozen=frozen, fractions=(f_drop, f_freeze))
    flat_b = torch.arange(n_rows, device=ctx.device) // h
    sink_end = (ctx.start + ctx.sinks).clamp_max(ws)
    drop_end = (sink_end + schedule_count(f_drop, ctx.n_valid)).clamp_max(ws) if f_drop > 0 else sink_end  # t = each sequence's valid tokens
    forced = ctx.forced_indices()[flat_b]  # (R, F)
    kmax = running_key_norm(ctx, state) if check == "bound" else None  # O(new keys) per step

    logits_all = full_logits(ctx).flatten(0, 1) if config.audit else None  # (R, g, T)
    qf = ctx.q.float().flatten(0, 1)  # (R, g, d)
    delta = torch.zeros(n_rows, g, device=ctx.device)
    known = torch.zeros(n_rows, dtype=torch.bool, device=ctx.device)
    shared_idx = None
    n_cos = n_fallback = 0
    anchor = None  # (R,) bool on the device; None: every row anchors (the first step after a pre-fill, or time off)

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
                est = dropped_from_probs(softmax_rows(logits_all), shared_idx)
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
            n_fallback = fallback.sum()
        anchor = ~share
        n_cos = cos_fail.sum()
    n_anchor = n_rows if anchor is None else anchor.sum()

    # The anchor branch, for every row (rows that share discard it; on a GPU their keys are not read).
    out_width = forced.shape[-1] + width
    freeze_end = (sink_end + schedule_count(f_freeze, ctx.n_valid)).clamp_max(ws)
    excl_end = torch.maximum(drop_end, freeze_end)  # [sink_end, excl_end): never scored at an anchor
    avail = (row_budget(ctx, config.budget, config.budget_fraction) - ctx.forced_count())[flat_b]  # (R,)
    # Before lo lie only padding, sinks and frozen tokens, for every row: with left padding,
    # start + floor(f (T - start)) >= floor(f T). Those logits are never computed.
    lo = 0 if need_full else min(ctx.sinks + schedule_count(f_freeze, t), ws)
    prev = ctx.prev_indices
    if frozen > 0 and prev is not None:
        inherit = (prev >= drop_end[flat_b, None]) & (prev < freeze_end[flat_b, None])
        inherited = compact(torch.where(inherit, prev, torch.full_like(prev, -1)), min(frozen, width))
    else:
        inherited = forced.new_full((n_rows, 0), -1)
    free = (avail - (inherited >= 0).sum(-1)).clamp_min(0)
    pos = torch.arange(lo, t, device=ctx.device)
    if logits_all is not None:
        lo, pos, logits = 0, torch.arange(t, device=ctx.device), logits_all
    else:
        logits = score_rows(ctx, lo, anchor)
        if lo > 0:  # the softmax of the unfrozen suffix, the same for every row whatever its padding
            logits = logits.masked_fill((pos < freeze_end[flat_b, None])[:, None, :], NEG_INF)
    p = softmax_rows(logits)  # (R, g, T - lo); the full softmax when lo == 0
    valid = ctx.valid_mask()[flat_b]  # (R, T)
    cand = (valid[:, lo:] & ~ctx.forced_mask()[flat_b, lo:]
            & ~((pos >= sink_end[flat_b, None]) & (pos < excl_end[flat_b, None])))
    scores = p.mean(1).masked_fill(~cand, NEG_INF)
    ranked = topk_rows(scores, free, width)
    ranked = torch.where(ranked >= 0, ranked + lo, ranked)
    anchor_idx = torch.cat([forced, compact(torch.cat([inherited, ranked], -1), width)], dim=-1)
    d_a = None if lo > 0 else dropped_from_probs(p, anchor_idx)
    if check is not None and (f_drop > 0 or f_freeze > 0):
        # max_delta guards the depth and layer selectors too: a row whose restricted set drops more
        # than max_delta falls back to exact top-k over every candidate (lo == 0 here: exact delta).
        bad = d_a.amax(-1) > config.max_delta
        n_fallback = n_fallback + (bad if anchor is None else bad & anchor).sum()
        every = valid & ~ctx.forced_mask()[flat_b]
        exact = topk_rows(p.mean(1).masked_fill(~every, NEG_INF), avail, width)
        ranked = torch.where(bad[:, None], exact, ranked)
        inherited = torch.where(bad[:, None], torch.full_like(inherited, -1), inherited)
        free = (avail - (inherited >= 0).sum(-1)).clamp_min(0)
        exact_idx = torch.cat([forced, compact(exact, width)], dim=-1)
        anchor_idx = torch.where(bad[:, None], exact_idx, anchor_idx)
        d_a = torch.where(bad[:, None], dropped_from_probs(p, exact_idx), d_a)

    if shared_idx is None:
        final = pad_to(anchor_idx, out_width)
    else:
        final = pad_to(shared_idx, out_width)
        final = torch.where(anchor[:, None], pad_to(anchor_idx, final.shape[-1]), final)
    if d_a is not None:
        if anchor is None:
            delta, known = d_a, torch.ones_like(known)
        else:
            delta = torch.where(anchor[:, None], d_a.to(delta.dtype), delta)
            known = known | anchor

    if config.uses("time"):
        top, around = dilate(ranked, share_count(free, config.r), config.r)
        ok = (around >= 0) & (around < t)
        safe = torch.where(ok, around, torch.zeros_like(around))
        ok &= ctx.valid_at(safe.view(b, h, -1)).view(n_rows, -1) & (safe >= excl_end[flat_b, None])  # not padding, sinks, dropped or frozen
        around = torch.where(ok, around, torch.full_like(around, -1))
        static = compact(dedupe(torch.cat([inherited, top, around], -1)), width)
        n = n_rows
        _store(state, "q", anchor, qf, n, 0.0)
        _store(state, "q_norm", anchor, qf.norm(dim=-1), n, 1.0)  # what every later cosine test divides by
        _store(state, "has", anchor, torch.ones(n, dtype=torch.bool, device=ctx.device), n, False)
        _store(state, "T", anchor, torch.full((n,), t, dtype=torch.long, device=ctx.device), n, 0)
        _store(state, "static", anchor, static, n, -1)
        if check in ("bound", "anchor"):  # lo == 0 here: p is the full softmax
            def at(idx):
                got = p.gather(2, idx.clamp_min(0)[:, None, :].expand(-1, g, -1))
                return got.masked_fill((idx < 0)[:, None, :], 0.0)

            _store(state, "p_static", anchor, at(static), n, 0.0)
            _store(state, "p_forced", anchor, at(forced), n, 0.0)
            _store(state, "forced_pos", anchor, forced, n, -1)
            if kmax is not None:
                _store(state, "kmax", anchor, kmax, n, 0.0)

    logits_out = logits_all.view(b, h, g, t) if logits_all is not None else None
    return Selection(
        final.view(b, h, final.shape[-1]), delta.view(b, h, g), known.view(b, h), logits_out,
        decisions=n_rows, anchors=n_anchor, cosine_reanchors=n_cos, fallbacks=n_fallback,
    )

DEFAULTS = PrhsConfig()
DESCRIPTION = (
    "PrHS: pre-hoc KV selection for decoding: anchor steps take exact top-k, similar later queries (cosine > tau) "
    "reuse the anchor's dilated set; progressive window and early-token freezing in deeper layers; delta reported/bounded"
)
