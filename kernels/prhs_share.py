"""PrHS's per-row decision of one decode step, on the device: share the anchor's set or re-anchor.

One program per (sequence b, KV head) row r, R = B * Hkv rows, group g = Hq / Hkv. With
t the cache length, ws = max(t - window, 0), s_b the first valid position and n_b the
valid count of sequence b:

    forced_r   = [s_b + i for i < sinks, kept if < ws] + [t - window + i for i < window, kept if >= s_b]
                 (-1 where unused, padding or a duplicate of the window)
    sink_end   = min(s_b + sinks, ws)
    drop_end   = min(sink_end + floor(f_drop n_b), ws),   freeze_end = min(sink_end + floor(f_freeze n_b), ws)
    excl_end   = max(drop_end, freeze_end)                        ([sink_end, excl_end) is never scored)
    avail      = max(budget_b, |forced_r|) - |forced_r|           (budget_b = budget or ceil(fraction n_b))
    free       = max(avail - min(|prev_r in [drop_end, freeze_end)|, cap), 0)   (prev: the previous layer's set)
    cos_r      = min_h q_h . qa_h / max(|q_h| |qa_h|, 1e-12),     share_r = has_r and cos_r > tau

A sharing row's index is forced_r then the anchor's stored set minus what the window now holds
(>= ws) and the progressive window now drops ([sink_end, drop_end)); its dropped mass is unknown (0).
A re-anchoring row gets forced_r then -1 pads (prhs_anchor_rows.py fills them), and its stored query,
|q|, has and T are replaced by this step's. Per row: the counts (anchor, cosine re-anchor, kept positions:
|forced_r| plus the shared set's, prhs_anchor_rows.py adds a re-anchoring row's salient ones) and
(sink_end, drop_end, freeze_end, excl_end, free) for the kernels that follow. One launch replaces
the ~150 small torch ops the same decision took (its fixed cost, whatever the cache length).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stem_cli.kernels.launch import pdl_options, wait_for_prior_grid


# Integer arguments that change with the cache length or from layer to layer: unspecialised, one compiled
# variant per shape instead of one per "equals 1 / divisible by 16" pattern of them (see prhs_select.py).
SHARE_LENGTHS = ("svb", "s_prev", "n_keys", "window_start", "prev_width", "inherit_cap")


@triton.jit(do_not_specialize=SHARE_LENGTHS)
def _prhs_share(
    Q, QA, QN, Has, TS, Static, KeyValid, Start, NValid, Prev, Fracs,
    Final, Anchor, Flags, Info, Delta, Known,
    sqb, sqh, sqd, svb, s_static, s_prev, s_final,
    n_rows, n_kv_heads, group, head_dim, n_keys, window_start, sinks, window, budget, tau,
    static_width, prev_width, inherit_cap, salient_width,
    USE_TIME: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PREV: tl.constexpr, USE_FRACTION: tl.constexpr,
    SCORED_ALL: tl.constexpr,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    wait_for_prior_grid(USE_GDC)
    row = tl.program_id(0)
    b = (row // n_kv_heads).to(tl.int64)
    kvh = row % n_kv_heads
    row64 = row.to(tl.int64)
    start = tl.load(Start + b)
    nvf = tl.load(NValid + b).to(tl.float64)

    # forced positions: sinks then window
    f = tl.arange(0, BLOCK_F)
    sink_pos = start + f
    win_pos = n_keys - window + (f - sinks)
    is_sink = f < sinks
    pos = tl.where(is_sink, sink_pos, win_pos)
    ok = tl.where(is_sink, sink_pos < window_start, (f < sinks + window) & (win_pos >= start))
    if HAS_VALID:
        ok = ok & (tl.load(KeyValid + b * svb + pos, mask=ok & (pos >= 0), other=0) != 0)
    forced = tl.where(ok, pos, -1)
    n_forced = tl.sum(ok.to(tl.int64), 0)
    tl.store(Final + row64 * s_final + f, forced, mask=f < sinks + window)

    # the depth / layer schedules' bounds and the salient budget
    f_drop = tl.load(Fracs + 0)
    f_freeze = tl.load(Fracs + 1)
    sink_end = tl.minimum(start + sinks, window_start)
    drop_end = tl.minimum(sink_end + (nvf * f_drop + 1e-9).to(tl.int64), window_start)
    freeze_end = tl.minimum(sink_end + (nvf * f_freeze + 1e-9).to(tl.int64), window_start)
    excl_end = tl.maximum(drop_end, freeze_end)
    if USE_FRACTION:
        row_budget = tl.math.ceil(nvf * tl.load(Fracs + 2)).to(tl.int64)
    else:
        row_budget = tl.zeros([], tl.int64) + budget
    avail = tl.maximum(row_budget, n_forced) - n_forced
    inherited = tl.zeros([], tl.int64)
    if HAS_PREV:
        offs_p = tl.arange(0, BLOCK_P)
        p = tl.load(Prev + row64 * s_prev + offs_p, mask=offs_p < prev_width, other=-1)
        inherited = tl.minimum(tl.sum(((p >= drop_end) & (p < freeze_end)).to(tl.int64), 0), inherit_cap)
    free = tl.maximum(avail - inherited, 0)

    # share or re-anchor
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < group
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = h_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(Q + b * sqb + (kvh * group + offs_h)[:, None] * sqh + offs_d[None, :] * sqd, mask=qmask, other=0.0).to(tl.float32)
    share = tl.zeros([], tl.int32)
    cos_fail = tl.zeros([], tl.int32)
    if USE_TIME:
        state_rows = row64 * group + offs_h
        has = tl.load(Has + row).to(tl.int32)
        qa = tl.load(QA + state_rows[:, None] * head_dim + offs_d[None, :], mask=qmask, other=0.0)
        qa_norm = tl.load(QN + state_rows, mask=h_ok, other=1.0)
        q_norm = tl.sqrt(tl.sum(q * q, 1))
        cos = tl.sum(q * qa, 1) / tl.maximum(q_norm * qa_norm, 1e-12)
        similar = (tl.min(tl.where(h_ok, cos, float("inf")), 0) > tau).to(tl.int32)
        share = has * similar
        cos_fail = has * (1 - similar)
        if share == 0:  # this step's query becomes the row's anchor
            tl.store(QA + state_rows[:, None] * head_dim + offs_d[None, :], q, mask=qmask)
            tl.store(QN + state_rows, q_norm, mask=h_ok)
            tl.store(Has + row, share == 0)
            tl.store(TS + row, n_keys)
    anchor = 1 - share

    # the salient part of the index: the anchor's kept set (sharing rows) or pads
    offs_w = tl.arange(0, BLOCK_W)
    st = tl.load(Static + row64 * s_static + offs_w, mask=offs_w < static_width * share, other=-1)
    keep = (st >= 0) & (st < window_start) & ~((st >= sink_end) & (st < drop_end))
    tl.store(Final + row64 * s_final + sinks + window + offs_w, tl.where(keep, st, -1), mask=offs_w < salient_width)
    n_kept = n_forced + tl.sum((keep & (offs_w < salient_width)).to(tl.int64), 0)

    tl.store(Anchor + row, anchor.to(tl.int8))
    tl.store(Flags + row64 * 3, anchor)
    tl.store(Flags + row64 * 3 + 1, cos_fail)
    tl.store(Flags + row64 * 3 + 2, n_kept.to(tl.int32))
    tl.store(Info + row64, sink_end)
    tl.store(Info + n_rows + row64, drop_end)
    tl.store(Info + 2 * n_rows + row64, freeze_end)
    tl.store(Info + 3 * n_rows + row64, excl_end)
    tl.store(Info + 4 * n_rows + row64, free)
    tl.store(Delta + row64 * group + offs_h, tl.zeros([BLOCK_H], tl.float32), mask=h_ok)
    if SCORED_ALL:  # a re-anchoring row scored every position: its dropped mass is known
        tl.store(Known + row, anchor != 0)
    else:
        tl.store(Known + row, anchor < 0)  # never: nothing scored the frozen prefix


def prhs_share(q, state_q, state_norm, has, state_t, static, key_valid, start, n_valid, prev, fracs, *,
               n_keys: int, sinks: int, window: int, budget: int, tau: float, inherit_cap: int,
               salient_width: int, use_time: bool, use_fraction: bool, scored_all: bool):
    """q (B, Hkv, g, d); the row state state_q (R, g, d) float32, state_norm (R, g), has (R,) bool, state_t (R,),
    static (R, Ws) (updated in place for re-anchoring rows, static excepted); key_valid (B, T) int8 or None;
    start / n_valid (B,); prev (R, P) or None; fracs (3,) float64 (f_drop, f_freeze, budget fraction) ->
    (index (R, sinks + window + salient_width): the sharing rows complete, anchor (R,) int8,
    flags (R, 3) int32 (anchor, cosine re-anchor, kept), info (5, R) int64 (sink_end, drop_end, freeze_end, excl_end,
    free), delta (R, g) zeros, known (R,) bool)."""
    b, hkv, g, d = q.shape
    rows, dev = b * hkv, q.device
    q3 = q.reshape(b, hkv * g, d)
    index = torch.empty(rows, sinks + window + salient_width, dtype=torch.long, device=dev)
    anchor = torch.empty(rows, dtype=torch.int8, device=dev)
    flags = torch.empty(rows, 3, dtype=torch.int32, device=dev)
    info = torch.empty(5, rows, dtype=torch.long, device=dev)
    delta = torch.empty(rows, g, dtype=torch.float32, device=dev)
    known = torch.empty(rows, dtype=torch.bool, device=dev)
    has_valid, has_prev = key_valid is not None, prev is not None
    valid = key_valid if has_valid else anchor  # placeholder pointers, never read
    prev_t = prev if has_prev else index
    _prhs_share[(rows,)](
        q3, state_q, state_norm, has, state_t, static, valid, start, n_valid, prev_t, fracs,
        index, anchor, flags, info, delta, known,
        *q3.stride(), valid.stride(0) if has_valid else 0, static.stride(0), prev_t.stride(0), index.stride(0),
        rows, hkv, g, d, n_keys, max(n_keys - window, 0), sinks, window, budget, tau,
        static.shape[-1], prev.shape[-1] if has_prev else 0, inherit_cap, salient_width,
        USE_TIME=use_time, HAS_VALID=has_valid, HAS_PREV=has_prev, USE_FRACTION=use_fraction, SCORED_ALL=scored_all,
        BLOCK_H=max(2, triton.next_power_of_2(g)), HEAD_DIM=triton.next_power_of_2(max(d, 16)),
        BLOCK_F=max(2, triton.next_power_of_2(sinks + window)),
        BLOCK_W=max(2, triton.next_power_of_2(max(salient_width, static.shape[-1]))),
        BLOCK_P=max(2, triton.next_power_of_2(prev.shape[-1] if has_prev else 1)), num_warps=4, **pdl_options(dev, rows),
    )
    return index, anchor, flags, info, delta, known
