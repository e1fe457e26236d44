"""PrHS's selection on the GPU in a few Triton kernels: gated anchor scoring, an exact chunked top-k, row sorts.

A decode step of PrHS at batch 1 is a handful of rows (B * Hkv) of up to T
positions; in PyTorch its selection was dozens of launches, each torch.topk and
torch.sort several more, and every T-long op ran on every step, shared or not.
Here every kernel reads a per-row flag `active` (the rows that re-anchor, known
only on the device) and a row that shares reads and writes nothing, so a shared
step costs launches, not O(T) traffic, with no host sync.

anchor_topk (the anchor branch of prhs.select, for max_delta = 0 and no audit):
1. _anchor_logits (grid rows x parts): l_hj = scale * q_h . k_j for j in [lo, T),
   rounded to the inputs' dtype first (as torch's bf16 q @ k^T), -inf where the key
   is padding or frozen (j < freeze_end); per part the online (max, sum exp).
   lse_h = log sum_parts sum exp (computed by step 2's programs from the parts; the first stores it).
2. _topk_tree, level 0 (grid rows x chunks of CHUNK positions): the score
   s_j = mean_h exp(l_hj - lse_h) (the group's mean softmax probability) on the
   candidates (valid, not forced, outside [sink_end, excl_end)), packed with its
   position into one int64 key (score bits << 32 | (2^31 - 1 - j): bigger score
   first, then lower position); each chunk sorts its keys and keeps its best KEEP.
3. _topk_tree, merge levels, in the same launch: the best KEEP of the union of chunks'
   bests is the best KEEP overall (exact, no approximation); of each FAN = CHUNK / KEEP
   nodes the last program to finish (a ticket, row_sort._arrive) merges them, level by
   level, until one node is left; its program unpacks positions, -1 past the row's
   count k_row and for non-candidates: topk_rows(scores, k_rows, width) exactly,
   ties to the lower position. The same groups as one launch per level had, so the
   same result; a step where no row re-anchors runs the tickets only.
anchor_select (prhs.select_fused): the same two launches with, in the program that
finishes a re-anchoring row, its index, delta and stored set (kernels/prhs_anchor_rows.py),
and in the last row's program the step's counts summed over rows (and added to the
runtime's counters): no launch of its own for either.
sort_rows: each row sorted in one program (compact: descending, cut to a width;
with dedupe, repeats dropped first: compact(dedupe(x), width)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stem_cli.kernels.launch import pdl_options, wait_for_prior_grid
from stem_cli.kernels.prhs_anchor_rows import _anchor_row
from stem_cli.kernels.row_sort import BIG, INTERPRET, MAX_SORT, _arrive, _sort  # noqa: F401 (BIG, INTERPRET: re-exported)

MAX_KEEP = 4096  # the widest salient set the chunked top-k serves (a sort of 4 * MAX_KEEP keys per program)

# Integer arguments that change with the cache length or from layer to layer (PrHS's frozen span). Triton
# compiles a variant per pattern of "equals 1" / "divisible by 16" of each int argument; unspecialised, these
# kernels compile once per shape instead of once for every such pattern a generation meets (about a minute each
# for _topk_tree with its epilogue). Row strides that vector loads need stay specialised: they are padded.
ANCHOR_LOGITS_LENGTHS = ("svb", "lo", "n_cols", "n_parts")
TOPK_TREE_LENGTHS = ANCHOR_LOGITS_LENGTHS + ("window_start", "n_chunks", "n_merge", "tickets_per_row", "width", "s_prev", "n_keys",
                                             "ranked_div", "prev_width", "n_inherit")
SORT_ROWS_LENGTHS = ("n_cols", "out_cols")
LSE_TILE = 128  # scoring parts combined per iteration into lse (128 parts of 1,024 keys: 128K in one)


@triton.jit(do_not_specialize=ANCHOR_LOGITS_LENGTHS)
def _anchor_logits(
    Q, K, Active, KeyValid, FreezeEnd, Logits, PartM, PartS,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, s_logit,
    n_kv_heads, group, lo, n_cols, n_parts, scale, head_dim,
    HAS_VALID: tl.constexpr, HAS_FREEZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    wait_for_prior_grid(USE_GDC)
    row = tl.program_id(0)
    part = tl.program_id(1)
    b = (row // n_kv_heads).to(tl.int64)
    kvh = row % n_kv_heads
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < group
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    live = tl.load(Active + row).to(tl.int32)
    if live != 0:  # a row that shares reads no key
        heads = kvh * group + offs_h
        offs_d = tl.arange(0, HEAD_DIM)
        d_ok = offs_d < head_dim
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        freeze_end = 0
        if HAS_FREEZE:
            freeze_end = tl.load(FreezeEnd + row)
        out_rows = row.to(tl.int64) * group + offs_h
        for t in range(TILES):
            offs_n = (part * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_cols
            pos = lo + offs_n
            k = tl.load(K + b * skb + kvh * skh + pos[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k).to(Q.dtype.element_ty).to(tl.float32) * scale
            ok = n_ok
            if HAS_VALID:
                ok = ok & (tl.load(KeyValid + b * svb + pos, mask=n_ok, other=0) != 0)
            if HAS_FREEZE:
                ok = ok & (pos >= freeze_end)
            s = tl.where(ok[None, :], s, float("-inf"))
            tl.store(Logits + out_rows[:, None] * s_logit + offs_n[None, :], s, mask=h_ok[:, None] & n_ok[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
    slot = (row.to(tl.int64) * group + offs_h) * n_parts + part
    tl.store(PartM + slot, m_i, mask=h_ok)
    tl.store(PartS + slot, s_i, mask=h_ok)


@triton.jit(do_not_specialize=TOPK_TREE_LENGTHS)
def _topk_tree(
    Logits, PartM, PartS, Lse, Active, KeyValid, Start, SinkEnd, ExclEnd, KRows, Buf, Tickets, Ranked,
    svb, s_logit,
    n_rows, n_kv_heads, group, lo, n_cols, n_parts, window_start, sinks, n_chunks, n_merge, buf_stride, tickets_per_row, width,
    Info, Prev, Index, Static, Scratch, Delta, Flags, Counts, Accum,
    s_prev, s_index, s_static, s_scr, n_keys, n_forced, salient_width, ranked_div, prev_width, n_inherit, r,
    HAS_VALID: tl.constexpr, CHUNK: tl.constexpr, KEEP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    ANCHOR_ROWS: tl.constexpr, USE_TIME: tl.constexpr, HAS_PREV: tl.constexpr, HAS_LOGITS: tl.constexpr,
    HAS_ACCUM: tl.constexpr, BLOCK_PREV: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr, SHARE_ITERS: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    wait_for_prior_grid(USE_GDC)
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = tl.arange(0, CHUNK)
    live = tl.load(Active + row).to(tl.int32) != 0
    row64 = row.to(tl.int64)
    key = tl.full([CHUNK], -1, tl.int64)
    if live:  # level 0: this chunk's candidates, scored and packed, its best KEEP kept
        b = (row // n_kv_heads).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < group
        j = c * CHUNK + offs
        j_ok = j < n_cols
        pos = lo + j
        rows_h = row64 * group + offs_h
        # lse_h from the scoring parts' (max, sum exp), in every program (the first one stores it), BLOCK_P parts
        # at a time (a fixed tile: no compiled variant per power of two of the length)
        m_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_H], tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = h_ok[:, None] & (offs_p < n_parts)[None, :]
            part_m = tl.load(PartM + rows_h[:, None] * n_parts + offs_p[None, :], mask=p_ok, other=float("-inf"))
            part_s = tl.load(PartS + rows_h[:, None] * n_parts + offs_p[None, :], mask=p_ok, other=0.0)
            m_new = tl.maximum(m_max, tl.max(part_m, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m_max - m_safe) + tl.sum(part_s * tl.exp(part_m - m_safe[:, None]), 1)
            m_max = m_new
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        if c == 0:
            tl.store(Lse + rows_h, lse, mask=h_ok)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        logit = tl.load(Logits + rows_h[:, None] * s_logit + j[None, :], mask=h_ok[:, None] & j_ok[None, :], other=float("-inf"))
        score = tl.sum(tl.exp(logit - lse[:, None]), 0) / group
        cand = j_ok
        if HAS_VALID:
            cand = cand & (tl.load(KeyValid + b * svb + pos, mask=j_ok, other=0) != 0)
        rank = pos - tl.load(Start + b)
        sink_end = tl.load(SinkEnd + row)
        excl_end = tl.load(ExclEnd + row)
        cand = cand & ~((rank >= 0) & (rank < sinks)) & (pos < window_start) & ~((pos >= sink_end) & (pos < excl_end))
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)  # a score >= 0: its bits order as it does
        key = _sort(tl.where(cand, (bits << 32) | (0x7FFFFFFF - pos.to(tl.int64)), -1), descending=True)
        if n_merge > 0:
            tl.store(Buf + row64 * buf_stride + c * KEEP + offs, key, mask=offs < KEEP)

    # merge levels: the last program to finish of each FAN nodes merges them (the best KEEP of the union of
    # the chunks' bests is the best KEEP overall), so the whole tree is one launch; the row's last survivor ranks
    go = c >= 0
    node = c
    n_nodes = n_chunks
    in_off = 0
    t_off = 0
    for lvl in range(n_merge):  # a loop, not unrolled: one copy of the sort whatever the depth (compile time)
        grp = node // (CHUNK // KEEP)
        members = tl.minimum(CHUNK // KEEP, n_nodes - grp * (CHUNK // KEEP))
        last = go
        if go:
            last = _arrive(Tickets + row64 * tickets_per_row + t_off + grp, members)
            if last & live:
                at = grp * CHUNK + offs
                key = tl.load(Buf + row64 * buf_stride + in_off + at, mask=at < n_nodes * KEEP, other=-1, cache_modifier=".cg")
                key = _sort(key, descending=True)
                if lvl < n_merge - 1:
                    tl.store(Buf + row64 * buf_stride + in_off + n_nodes * KEEP + grp * KEEP + offs, key, mask=offs < KEEP)
        go = last
        in_off += n_nodes * KEEP
        t_off += (n_nodes + CHUNK // KEEP - 1) // (CHUNK // KEEP)
        n_nodes = (n_nodes + CHUNK // KEEP - 1) // (CHUNK // KEEP)
        node = grp

    if go:  # the row's top-k: positions best first, -1 past the row's count (and on rows that share)
        k_row = tl.load(KRows + row)
        got = tl.where((key >= 0) & (offs < k_row), 0x7FFFFFFF - (key & 0x7FFFFFFF), -1)
        tl.store(Ranked + row64 * width + offs, got, mask=offs < width)
        if ANCHOR_ROWS:  # the re-anchoring row's index, delta and stored set (kernels/prhs_anchor_rows.py)
            if live:
                tl.debug_barrier()
                _anchor_row(row, Info, Ranked, Prev, KeyValid, Logits, Lse, Index, Static, Scratch, Delta, Flags,
                            width, s_prev, svb, s_index, s_static, s_scr,
                            n_rows, n_kv_heads, group, n_keys, n_forced, salient_width, width, ranked_div, prev_width,
                            n_inherit, s_logit, r,
                            USE_TIME=USE_TIME, HAS_VALID=HAS_VALID, HAS_PREV=HAS_PREV, HAS_LOGITS=HAS_LOGITS,
                            BLOCK_P=BLOCK_PREV, BLOCK_A=BLOCK_A, BLOCK_S=BLOCK_S, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K,
                            SHARE_ITERS=SHARE_ITERS)
            # the step's counts (anchors, cosine re-anchors, kept) summed over rows by the last row to finish
            if _arrive(Tickets + n_rows * tickets_per_row, n_rows):
                tot = tl.zeros([4], tl.int32)
                offs_c = tl.arange(0, 4)
                for r0 in range(0, n_rows, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    f = tl.load(Flags + rr[:, None] * 3 + offs_c[None, :], mask=(rr < n_rows)[:, None] & (offs_c < 3)[None, :],
                                other=0, cache_modifier=".cg")
                    tot += tl.sum(f, 0)
                tl.store(Counts + offs_c, tot, mask=offs_c < 3)
                if HAS_ACCUM:  # the runtime's running counters, in place (no add launch per layer)
                    acc = tl.load(Accum + offs_c, mask=offs_c < 3, other=0.0)
                    tl.store(Accum + offs_c, acc + tot.to(tl.float64), mask=offs_c < 3)


def topk_plan(n_cols: int, width: int) -> tuple[int, int, list[int]] | None:
    """(KEEP, CHUNK, programs per level) for the chunked top-k of `width` of n_cols scores, or None when
    width is wider than MAX_KEEP (the caller takes the PyTorch path and says so)."""
    width = min(width, n_cols)
    if width > MAX_KEEP:
        return None
    keep = triton.next_power_of_2(max(width, 1))
    chunk = max(4 * keep, 2048)
    levels = [triton.cdiv(max(n_cols, 1), chunk)]
    while levels[-1] > 1:
        levels.append(triton.cdiv(levels[-1] * keep, chunk))
    return keep, chunk, levels


def anchor_topk(q, k, active, *, lo: int, scale: float, key_valid, start, freeze_end, sink_end, excl_end,
                window_start: int, sinks: int, k_rows, width: int, tickets=None, epilogue: dict | None = None):
    """q (B, Hkv, g, d), k (B, Hkv, T, d), active (R,) bool (R = B * Hkv), key_valid (B, T) bool or None,
    start (B,), freeze_end (R,) or None (nothing masked before softmax), sink_end / excl_end / k_rows (R,) ->
    (ranked (R, min(width, T - lo)) positions best first (lo included, -1 past k_row and for non-candidates),
    logits (R, g, T - lo) float32, lse (R, g)). Inactive rows: ranked all -1, logits and lse undefined.
    tickets: tickets_size(R, levels) int32 zeros kept by the caller (left zero; None: made here, one launch);
    epilogue: prhs_anchor_rows.epilogue(...)'s arguments, run by the program that finishes each row."""
    b, hkv, g, d = q.shape
    rows = b * hkv
    n_cols = k.shape[2] - lo
    plan = topk_plan(n_cols, width)
    if plan is None:
        raise ValueError(f"width {width} is wider than the chunked top-k serves ({MAX_KEEP})")
    keep, chunk, levels = plan
    out_width = min(width, n_cols)
    dev = q.device
    flags = active.to(device=dev, dtype=torch.int8).contiguous()
    q3 = q.reshape(b, hkv * g, d)
    block_n, tiles = 64, 16
    n_parts = triton.cdiv(max(n_cols, 1), block_n * tiles)
    # rows padded to 16 floats: the row stride is then always a multiple of 16 (vector loads, one compiled variant)
    logits = torch.empty(rows, g, triton.cdiv(max(n_cols, 0), 16) * 16, dtype=torch.float32, device=dev)[..., :max(n_cols, 0)]
    s_logit = logits.stride(1)
    part_m = torch.empty(rows, g, n_parts, dtype=torch.float32, device=dev)
    part_s = torch.empty_like(part_m)
    has_valid = key_valid is not None
    valid = key_valid.to(torch.int8).contiguous() if has_valid else flags
    svb = valid.stride(0) if has_valid else 0
    fe = freeze_end.contiguous() if freeze_end is not None else flags
    block_h = max(16, triton.next_power_of_2(g))
    _anchor_logits[(rows, n_parts)](
        q3, k, flags, valid, fe, logits, part_m, part_s, *q3.stride(), *k.stride(), svb, s_logit,
        hkv, g, lo, n_cols, n_parts, scale, d,
        HAS_VALID=has_valid, HAS_FREEZE=freeze_end is not None,
        BLOCK_H=block_h, BLOCK_N=block_n, TILES=tiles, HEAD_DIM=triton.next_power_of_2(max(d, 16)), num_warps=4,
        **pdl_options(dev, rows),
    )
    lse = torch.empty(rows, g, dtype=torch.float32, device=dev)  # written by the first level-0 program of a row
    ranked = torch.empty(rows, out_width, dtype=torch.long, device=dev)
    start_l, sink_l, excl_l, k_l = (x.to(device=dev, dtype=torch.long).contiguous() for x in (start, sink_end, excl_end, k_rows))
    n_merge = len(levels) - 1
    buf = torch.empty(rows, max(sum(levels[:-1]) * keep, 1), dtype=torch.long, device=dev)
    per_row = sum(levels[1:])
    if tickets is None:
        tickets = torch.zeros(tickets_size(rows, levels), dtype=torch.int32, device=dev)
    elif tickets.numel() < tickets_size(rows, levels) or tickets.dtype != torch.int32:
        raise ValueError(f"tickets: {tickets_size(rows, levels)} int32 zeros needed, got {tickets.numel()} {tickets.dtype}")
    ep = epilogue or {}
    none = flags  # placeholder pointers, never read
    # no dot product here: the group's heads need no padding to 16 (a CHUNK x 16 float32 tile would spill)
    _topk_tree[(rows, levels[0])](
        logits, part_m, part_s, lse, flags, valid, start_l, sink_l, excl_l, k_l, buf, tickets, ranked, svb, s_logit,
        rows, hkv, g, lo, n_cols, n_parts, window_start, sinks, levels[0], n_merge, buf.stride(0), per_row, out_width,
        *(ep.get(name, none) for name in ("info", "prev", "index", "static", "scratch", "delta", "flags", "counts", "accum")),
        *(ep.get(name, 0) for name in ("s_prev", "s_index", "s_static", "s_scr", "n_keys", "n_forced", "salient_width",
                                       "ranked_div", "prev_width", "n_inherit", "r")),
        HAS_VALID=has_valid, CHUNK=chunk, KEEP=keep, BLOCK_H=max(2, triton.next_power_of_2(g)),
        BLOCK_P=LSE_TILE, ANCHOR_ROWS=epilogue is not None,
        **{name: ep.get(name, False) for name in ("USE_TIME", "HAS_PREV", "HAS_LOGITS", "HAS_ACCUM")},
        **{name: ep.get(name, 2) for name in ("BLOCK_PREV", "BLOCK_A", "BLOCK_S", "BLOCK_K", "SHARE_ITERS")},
        BLOCK_R=max(2, min(64, triton.next_power_of_2(rows))), num_warps=8, **pdl_options(dev, rows),
    )
    return ranked, logits, lse


def tickets_size(rows: int, levels: list[int]) -> int:
    """int32 counters _topk_tree needs (zeros before a launch, zeros after it): one per merge group per row,
    and one for the rows' count."""
    return rows * sum(levels[1:]) + 1


@triton.jit(do_not_specialize=SORT_ROWS_LENGTHS)
def _sort_rows(X, Out, n_cols, out_cols, sx, so, DEDUPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    if DEDUPE:
        x = tl.load(X + row * sx + offs, mask=ok, other=BIG)
        x = tl.where(x >= 0, x, -1)
        s = _sort(x)  # ascending: equal positions side by side, the pads past the row last
        tl.store(X + row * sx + offs, s, mask=ok)  # X is a private copy: the neighbours are read back through it
        tl.debug_barrier()
        prev = tl.load(X + row * sx + offs - 1, mask=ok & (offs > 0), other=-1)
        x = tl.where((s == prev) | (s < 0) | (s == BIG), -1, s)
    else:
        x = tl.load(X + row * sx + offs, mask=ok, other=-1)
    x = _sort(x, descending=True)
    tl.store(Out + row * so + offs, x, mask=offs < out_cols)


def sort_rows(idx: torch.Tensor, width: int, *, dedupe: bool = False) -> torch.Tensor:
    """(R, K) int64 positions (-1 pads) -> (R, width): each row sorted descending, cut or padded with -1
    (prhs.compact); with dedupe, repeated positions become -1 first (compact(dedupe(idx), width))."""
    rows, n_cols = idx.shape
    block = triton.next_power_of_2(max(n_cols, width, 2))
    if block > MAX_SORT:
        raise ValueError(f"rows of {max(n_cols, width)} entries are wider than sort_rows serves ({MAX_SORT})")
    x = idx.to(torch.long).contiguous().clone() if dedupe else idx.to(torch.long).contiguous()
    out = torch.empty(rows, width, dtype=torch.long, device=idx.device)
    if rows == 0 or width == 0:
        return out
    _sort_rows[(rows,)](x, out, n_cols, width, x.stride(0), out.stride(0), DEDUPE=dedupe, BLOCK=block,
                        num_warps=8 if block >= 2048 else 4)
    return out
