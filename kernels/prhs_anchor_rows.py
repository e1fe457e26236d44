"""PrHS's re-anchoring rows after their exact top-k: the kept index, the dropped mass, the stored set.

One program per row r; a row that shares (anchor_r = 0, prhs_share.py) does nothing. With
ranked_r the row's top-k positions best first (-1 pads, kernels/prhs_select.py), prev_r the
previous layer's set and cap = min(frozen, width):

    inherited_r = the largest cap entries of {j in prev_r : drop_end <= j < freeze_end}   (cross-layer sharing)
    index_r     = forced_r (already written) then the `width` largest of inherited_r + ranked_r, descending
    delta_rh    = 1 - sum_{j in index_r} exp(l_hj - lse_h)   (float64 sum; only when every position was scored)
    k_a         = the largest k with k + 2r ceil(k/3) <= free
    static_r    = the `width` largest distinct of inherited_r + ranked_r[:k_a]
                  + {ranked_r[i] + o : i < ceil(k_a/3), 0 < |o| <= r, excl_end <= ranked_r[i] + o < T, valid}

static_r is the set later sharing steps reuse (written in place into the row state). Sorts are
tl.sort of the whole row in one program (bitonic; a row of at most MAX_SORT keys); the ascending
sort that drops repeats goes through a private scratch row, so each key can read its neighbour.

No kernel of its own: _anchor_row is the epilogue of the program that finishes a row's top-k
(kernels/prhs_select.py, _topk_tree), so the index, delta and stored set cost no launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stem_cli.kernels.row_sort import BIG, MAX_SORT, _sort


@triton.jit
def _anchor_row(
    row, Info, Ranked, Prev, KeyValid, Logits, Lse, Index, Static, Scratch, Delta, Flags,
    s_ranked, s_prev, svb, s_index, s_static, s_scr,
    n_rows, n_kv_heads, group, n_keys, n_forced, width, ranked_width, ranked_div, prev_width, n_inherit, s_logit, r,
    USE_TIME: tl.constexpr, HAS_VALID: tl.constexpr, HAS_PREV: tl.constexpr, HAS_LOGITS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    SHARE_ITERS: tl.constexpr,
):
    """One re-anchoring row (the caller checked anchor_r != 0 and stored ranked_r). Ranked, Lse and this
    row's Flags were written by other programs of the same launch: read through L2 (.cg)."""
    row64 = row.to(tl.int64)
    b = (row // n_kv_heads).to(tl.int64)
    drop_end = tl.load(Info + n_rows + row64)
    freeze_end = tl.load(Info + 2 * n_rows + row64)
    excl_end = tl.load(Info + 3 * n_rows + row64)
    free = tl.load(Info + 4 * n_rows + row64)
    scr = Scratch + row64 * s_scr
    if HAS_PREV:  # inherited: the frozen span's share of the previous layer's set, largest first
        offs_p = tl.arange(0, BLOCK_P)
        p = tl.load(Prev + row64 * s_prev + offs_p, mask=offs_p < prev_width, other=-1)
        p = _sort(tl.where((p >= drop_end) & (p < freeze_end), p, -1), descending=True)
        tl.store(scr + offs_p, p, mask=offs_p < n_inherit)
        tl.debug_barrier()

    # the kept index: the width largest of inherited + ranked
    offs_a = tl.arange(0, BLOCK_A)
    from_inh = offs_a < n_inherit
    a_r = offs_a - n_inherit
    a = tl.load(scr + offs_a, mask=from_inh, other=-1)
    a = tl.where(from_inh, a, tl.load(Ranked + row64 * s_ranked + a_r, mask=(a_r >= 0) & (a_r < ranked_width), other=-1))
    a = _sort(a, descending=True)
    tl.store(Index + row64 * s_index + n_forced + offs_a, a, mask=offs_a < width)
    n_kept = tl.load(Flags + row64 * 3 + 2) + tl.sum(((a >= 0) & (offs_a < width)).to(tl.int32), 0)
    tl.store(Flags + row64 * 3 + 2, n_kept)  # the forced count (prhs_share) plus the salient ones

    if HAS_LOGITS:  # every position was scored: the exact dropped mass of the kept index
        tl.debug_barrier()
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < group
        lse = tl.load(Lse + row64 * group + offs_h, mask=h_ok, other=float("-inf"), cache_modifier=".cg")
        finite = lse > float("-inf")
        lse0 = tl.where(finite, lse, 0.0)
        kept = tl.zeros([BLOCK_H], dtype=tl.float64)
        for c in range(0, n_forced + width, BLOCK_K):
            offs_k = c + tl.arange(0, BLOCK_K)
            idx = tl.load(Index + row64 * s_index + offs_k, mask=offs_k < n_forced + width, other=-1)
            ok = h_ok[:, None] & (idx >= 0)[None, :]
            lg = tl.load(Logits + (row64 * group + offs_h)[:, None] * s_logit + idx[None, :], mask=ok, other=float("-inf"))
            pk = tl.where(ok, tl.exp(lg - lse0[:, None]), 0.0)
            kept += tl.sum(pk.to(tl.float64), 1)
        d = tl.where(finite, tl.minimum(tl.maximum(1.0 - kept, 0.0), 1.0), 0.0)
        tl.store(Delta + row64 * group + offs_h, d.to(tl.float32), mask=h_ok)

    if USE_TIME:  # the set later steps share: top k_a, dilated by +-r around the top third
        k_a = (3 * free) // (3 + 2 * r)
        for _ in range(SHARE_ITERS):
            k_a = tl.where(k_a + 2 * r * ((k_a + 2) // 3) > free, tl.maximum(k_a - 1, 0), k_a)
        third = (k_a + 2) // 3
        offs_s = tl.arange(0, BLOCK_S)
        rel = offs_s - n_inherit
        sec = rel // ranked_div  # 0: the top k_a; 1..r: offsets -r..-1; r+1..2r: offsets 1..r
        i = rel % ranked_div
        in_r = (rel >= 0) & (sec < 1 + 2 * r) & (i < ranked_width)
        rk = tl.load(Ranked + row64 * s_ranked + i, mask=in_r, other=-1)
        o = tl.where(sec <= r, sec - 1 - r, sec - r)
        nb = rk + o
        nb_ok = in_r & (i < third) & (rk >= 0) & (nb >= 0) & (nb < n_keys) & (nb >= excl_end)
        if HAS_VALID:
            nb_ok = nb_ok & (tl.load(KeyValid + b * svb + nb, mask=nb_ok, other=0) != 0)
        v = tl.where(sec == 0, tl.where(in_r & (i < k_a) & (rk >= 0), rk, -1), tl.where(nb_ok, nb, -1))
        v = tl.where(offs_s < n_inherit, tl.load(scr + offs_s, mask=offs_s < n_inherit, other=-1), v)
        s = _sort(tl.where(v >= 0, v, BIG))  # ascending: repeats side by side, pads last
        tl.store(scr + BLOCK_S + offs_s, s)
        tl.debug_barrier()
        before = tl.load(scr + BLOCK_S + offs_s - 1, mask=offs_s > 0, other=-1)
        x = _sort(tl.where((s == before) | (s == BIG), -1, s), descending=True)
        tl.store(Static + row64 * s_static + offs_s, x, mask=offs_s < width)


def epilogue(info, ranked_width: int, prev, key_valid, logits, lse_scored: bool, index, static, delta, flags, counts, accum, *,
             n_keys: int, n_forced: int, width: int, inherit_cap: int, r: int, use_time: bool) -> dict:
    """The arguments of _anchor_row (and of the step's count) for prhs_select.anchor_topk's epilogue: info (5, R)
    and index (R, n_forced + >= width) from prhs_share; ranked_width, the top-k rows' width (min(width, T - lo));
    prev (R, P) or None; key_valid (B, T) int8 or None; logits (R, g, T) when every position was scored
    (lse_scored), else None. The launch fills index, delta (R, g) and static (R, >= width) on the re-anchoring
    rows, in place, adds their salient count to flags[:, 2] (R, 3) int32, writes counts (3,) int32 = flags
    summed over rows and, when accum (3,) float64 is given, adds them to it."""
    rows = index.shape[0]
    has_prev = prev is not None
    n_inherit = min(inherit_cap, prev.shape[-1]) if has_prev else 0
    block_s = triton.next_power_of_2(max(n_inherit + (1 + 2 * r) * ranked_width, width, 2))
    if block_s > MAX_SORT:
        raise ValueError(f"rows of {n_inherit + (1 + 2 * r) * ranked_width} entries are wider than the row sort serves ({MAX_SORT})")
    scratch = torch.empty(rows, 2 * block_s, dtype=torch.long, device=index.device)
    ep = dict(info=info, index=index, static=static, scratch=scratch, delta=delta, flags=flags, counts=counts,
              s_index=index.stride(0), s_static=static.stride(0), s_scr=scratch.stride(0), n_keys=n_keys, n_forced=n_forced,
              salient_width=width, ranked_div=max(ranked_width, 1), prev_width=prev.shape[-1] if has_prev else 0,
              n_inherit=n_inherit, r=r, USE_TIME=use_time, HAS_PREV=has_prev, HAS_LOGITS=lse_scored, HAS_ACCUM=accum is not None,
              BLOCK_PREV=max(2, triton.next_power_of_2(prev.shape[-1] if has_prev else 1)),
              BLOCK_A=max(2, triton.next_power_of_2(n_inherit + ranked_width)), BLOCK_S=block_s, BLOCK_K=64, SHARE_ITERS=r + 2)
    if has_prev:
        ep.update(prev=prev, s_prev=prev.stride(0))
    if accum is not None:
        ep["accum"] = accum
    return ep
