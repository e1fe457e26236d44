"""Sparse decode attention over a gathered set of cached positions (Triton, split-K).

One query per (sequence b, query head h) against a KV cache of T positions; the
selection is a row of positions per (b, KV head) shared by the GQA group:
indices (B, Hkv, K), counts (B, Hkv); entry i is used when i < count and
0 <= index < T (so -1 pads anywhere are skipped). For used set S:

    o_h = sum_{j in S} softmax_S(scale * q_h . k_j) v_j,      lse_h = log sum_{j in S} exp(scale * q_h . k_j)

Pass 1 (grid: B * Hkv rows x SPLITS): a program takes one row and one chunk of
its used entries, loads the whole GQA group's queries as one BLOCK_H x d tile
(each gathered K/V row is read once for the group), and folds BLOCK_N gathered
keys at a time into the online-softmax state (running max m, sum l, unnormalised
accumulator; exponentials in base 2 with log2(e) folded into the scale), then
writes (m, l, acc) for its split.
Pass 2: m* = max_s m_s, w_s = 2^(m_s - m*),
o = sum_s w_s acc_s / sum_s w_s l_s, lse = ln 2 (m* + log2 sum_s w_s l_s).
Empty rows give zeros and lse = -inf, never NaN. Pass 2 is its own launch
(_sparse_decode_combine, grid B * Hq) by default. With FUSED_COMBINE it runs in pass 1's
launch instead: the last split program of a row to finish (a ticket, row_sort._arrive)
combines the row's splits for its GQA group. That saves a launch but serialises pass 2
behind the slowest split, and on an H200 it measured slower (one run, 128K, B = 1, 32 layers
in a CUDA graph: split-K 4.38 ms fused vs 4.14 two launches, PrHS 0.987 vs 0.894; the decode
benchmark's *-fused-graph variants). Its tickets are a per-device
int32 buffer every launch leaves at zero (CUDA graphs replay it); during a graph capture
that finds no buffer yet (none may be allocated there), pass 2 is the second launch, said once.

With no index (indices=None) the same two passes attend to every position:
flash-decoding split-K, the dense baseline of the decode benchmark.
gated_logits: PrHS's scoring of the rows that re-anchor (the others' keys unread).

Splits are chosen on the host so that B * Hkv * SPLITS covers the GPU about
twice (at least one BLOCK_N tile per split); autotuned on the tile shapes.
Both passes (and PrHS's selection kernels) take part in programmatic dependent launch for a
step of few rows on sm_90+ (launch.py): each waits for the kernel before it first thing.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl
from stem_cli.kernels.block_sparse_attn import _online_softmax_step
from stem_cli.kernels.launch import pdl_options, sm_count, wait_for_prior_grid
from stem_cli.kernels.row_sort import _arrive

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK_ALIGN = 64  # split chunks are whole multiples of the widest BLOCK_N
COMBINE_TILE = tl.constexpr(32)  # splits per load in the fused pass 2
FUSED_COMBINE = False  # pass 2 in pass 1's launch: measured slower on an H200 (docstring), so off


# Integer arguments that change with the cache length (every decode step): unspecialised, so a generation
# compiles each kernel once rather than once per "divisible by 16" pattern of them (chunk stays: it is aligned).
PARTIAL_LENGTHS = ("n_keys", "n_entries", "n_splits")
GATED_LENGTHS = ("lo", "n_cols")


@triton.jit(do_not_specialize=PARTIAL_LENGTHS)
def _sparse_decode_partial(
    Q, K, V, Idx, Counts, Acc, M, L, Out, Lse, Tickets,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sib, sih, sik,
    scb, sch,
    sob, soh, sod,
    n_kv_heads, group: tl.constexpr, n_keys, n_entries, chunk, n_splits, qk_scale_log2, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_COUNTS: tl.constexpr,
    HAS_INDEX: tl.constexpr, FUSED_COMBINE: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    wait_for_prior_grid(USE_GDC)
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_row // n_kv_heads).to(tl.int64)
    kvh = pid_row % n_kv_heads

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < group
    heads = kvh * group + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=h_ok[:, None] & d_ok[None, :], other=0.0)

    if HAS_COUNTS:
        count = tl.load(Counts + b * scb + kvh * sch)
    else:  # every entry of the row (-1 pads are skipped anyway)
        count = n_entries
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)
    idx_row = Idx + b * sib + kvh * sih
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        in_row = offs < hi
        if HAS_INDEX:
            idx = tl.load(idx_row + offs * sik, mask=in_row, other=-1)
            ok = in_row & (idx >= 0) & (idx < n_keys)
            pos = tl.where(ok, idx, 0).to(tl.int64)
        else:  # dense: entry i is position i (flash-decoding split-K over the whole cache)
            ok = in_row
            pos = offs.to(tl.int64)
        k = tl.load(k_base + pos[None, :] * skn + offs_d[:, None] * skd, mask=ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        s = tl.where(ok[None, :], s, float("-inf"))
        v = tl.load(v_base + pos[:, None] * svn + offs_d[None, :] * svd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)

    out_heads = (b * n_kv_heads * group + heads) * n_splits + split  # (B, Hq, SPLITS) row-major
    tl.store(M + out_heads, m_i, mask=h_ok)
    tl.store(L + out_heads, l_i, mask=h_ok)
    tl.store(Acc + out_heads[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_ok[:, None])
    if FUSED_COMBINE:
        if _arrive(Tickets + pid_row, n_splits):  # the row's last split: pass 2 for its group's heads
            _combine_group(Acc, M, L, Out, Lse, b, kvh * group, offs_d, sob, soh, sod, n_kv_heads * group, n_splits,
                           head_dim, GROUP=group, HEAD_DIM=HEAD_DIM, S_TILE=COMBINE_TILE)


@triton.jit
def _combine_group(Acc, M, L, Out, Lse, b, head0, offs_d, sob, soh, sod, n_q_heads, n_splits, head_dim,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, S_TILE: tl.constexpr):
    """Pass 2 for the GROUP heads from head0, S_TILE splits per load (the splits were written by other programs
    of the launch: read through L2, .cg). The heads are unrolled and each tile's loads are independent, so the
    last program waits about one L2 round trip per tile, not one per split (a split-by-split loop cost ~15 us
    a layer at 33 splits on an H200), and folds the tiles with a running maximum."""
    for hh in tl.static_range(GROUP):
        head = head0 + hh
        base = (b * n_q_heads + head) * n_splits
        m_run = tl.full([], float("-inf"), dtype=tl.float32)
        l_run = tl.full([], 0.0, dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, n_splits, S_TILE):
            offs_s = s0 + tl.arange(0, S_TILE)
            s_ok = offs_s < n_splits
            m = tl.load(M + base + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
            l = tl.load(L + base + offs_s, mask=s_ok, other=0.0, cache_modifier=".cg")
            a = tl.load(Acc + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.where(m_run == float("-inf"), 0.0, tl.math.exp2(m_run - m_safe))
            w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
            l_run = l_run * alpha + tl.sum(w * l, 0)
            acc = acc * alpha + tl.sum(w[:, None] * a, 0)
            m_run = m_new
        has_key = l_run > 0
        out = acc / tl.where(has_key, l_run, 1.0)
        tl.store(Out + b * sob + head * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=offs_d < head_dim)
        m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
        lse = tl.where(has_key, (m_safe + tl.math.log2(tl.where(has_key, l_run, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(Lse + b * n_q_heads + head, lse)


@triton.jit(do_not_specialize=("n_splits",))
def _sparse_decode_combine(
    Acc, M, L, Out, Lse,
    sob, soh, sod,
    n_q_heads, n_splits, head_dim,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, USE_GDC: tl.constexpr = False,
):
    wait_for_prior_grid(USE_GDC)
    pid = tl.program_id(0)
    b = pid // n_q_heads
    h = pid % n_q_heads
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_splits
    offs_d = tl.arange(0, HEAD_DIM)
    base = pid.to(tl.int64) * n_splits
    m = tl.load(M + base + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(L + base + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(Acc + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_star = tl.max(m, 0)
    m_safe = tl.where(m_star == float("-inf"), 0.0, m_star)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
    l_sum = tl.sum(w * l, 0)
    has_key = l_sum > 0
    out = tl.sum(w[:, None] * acc, 0) / tl.where(has_key, l_sum, 1.0)
    tl.store(Out + b.to(tl.int64) * sob + h * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=offs_d < head_dim)
    lse = tl.where(has_key, (m_safe + tl.math.log2(tl.where(has_key, l_sum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + pid, lse)


def _configs():
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 2), (64, 4, 3), (32, 4, 2), (64, 8, 2), (32, 2, 2), (64, 2, 3)]
    ]


_tuned = triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_H", "HAS_COUNTS", "HAS_INDEX"])(_sparse_decode_partial)

def _num_splits(rows: int, width: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk): about two programs per SM, at least CHUNK_ALIGN entries per split."""
    target = 2 * sm_count(device) if device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(target, max(rows, 1)), triton.cdiv(max(width, 1), CHUNK_ALIGN), 128))
    chunk = triton.cdiv(triton.cdiv(max(width, 1), splits), CHUNK_ALIGN) * CHUNK_ALIGN
    return triton.cdiv(max(width, 1), chunk), chunk


_TICKETS: dict[tuple, torch.Tensor] = {}  # (device, rows) -> int32 zeros, left at zero by every launch


def _tickets(device: torch.device, rows: int) -> torch.Tensor | None:
    """The per-device ticket buffer of the fused pass 2 (one counter per row), made on first use and kept (a CUDA
    graph that captured it keeps using it). None while a graph is being captured before one exists: nothing may
    be allocated for later there, so that call combines in a second launch (said once). Calls on one device
    run on one stream at a time (as a decode loop does): two concurrent streams would share the counters."""
    key = (device.type, device.index, rows)
    buf = _TICKETS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            warnings.warn("stem sparse decode: first call inside a CUDA graph capture; pass 2 runs as a second launch in "
                          "this graph (run one step eagerly before capturing for the one-launch path)", stacklevel=3)
            return None
        buf = _TICKETS[key] = torch.zeros(rows, dtype=torch.int32, device=device)
    return buf


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None,
    counts: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    splits: int | None = None,
):
    """q (B, Hq, d) or (B, Hq, 1, d), k/v (B, Hkv, T, d) (any strides, last dim contiguous preferred),
    indices (B, Hkv, K), counts (B, Hkv) -> output of q's shape and dtype (and lse (B, Hq) float32).
    indices None: dense attention over all T positions (flash-decoding split-K; counts ignored)."""
    squeeze = q.dim() == 4
    q3 = q[:, :, 0] if squeeze else q
    batch, hq, d = q3.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if q.dtype not in (torch.bfloat16, torch.float16) and not INTERPRET:
        raise ValueError(f"dtype {q.dtype} is not supported by the Triton decode kernel: use bfloat16 or float16")
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    # int32 or int64 indices are read as they are (no conversion kernel per call); no counts: whole rows
    has_index = indices is not None
    if has_index:
        idx = indices.to(q.device) if indices.dtype in (torch.int32, torch.int64) else indices.to(q.device, torch.int64)
        width, idx_strides = idx.shape[-1], idx.stride()
    else:  # a placeholder pointer, never read
        idx, width, idx_strides, counts = q3, n_keys, (0, 0, 0), None
    has_counts = counts is not None
    cnt = counts.to(device=q.device, dtype=torch.int32) if has_counts else idx  # idx: a placeholder pointer, never read
    head_dim = triton.next_power_of_2(max(d, 16))
    block_h = max(16, triton.next_power_of_2(group))
    if splits is None:
        n_splits, chunk = _num_splits(batch * hkv, width, q.device)
    else:
        n_splits = max(1, splits)
        chunk = max(1, triton.cdiv(max(width, 1), n_splits))
    acc = torch.empty(batch, hq, n_splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, hq, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty(batch, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=q.device)
    tickets = _tickets(q.device, batch * hkv) if FUSED_COMBINE else None
    fused = tickets is not None
    args = (
        q3, k, v, idx, cnt, acc, m, l, out, lse, tickets if fused else m,  # m: a placeholder pointer, never read
        *q3.stride(), *k.stride(), *v.stride(), *idx_strides, *(cnt.stride() if has_counts else (0, 0)), *out.stride(),
        hkv, group, n_keys, width, chunk, n_splits, scale * 1.4426950408889634, d,
    )
    grid = (batch * hkv, n_splits)
    pdl = pdl_options(q.device, batch * hkv)  # dependent launches: see launch.py
    flags = dict(BLOCK_H=block_h, HEAD_DIM=head_dim, HAS_COUNTS=has_counts, HAS_INDEX=has_index, FUSED_COMBINE=fused, **pdl)
    if INTERPRET:  # the interpreter runs on the CPU: one config, no autotuning
        _sparse_decode_partial[grid](*args, BLOCK_N=32, **flags)
    else:
        _tuned[grid](*args, **flags)
    if not fused:
        _sparse_decode_combine[(batch * hq,)](
            acc, m, l, out, lse, *out.stride(), hq, n_splits, d,
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)), HEAD_DIM=head_dim, **pdl,
        )
    if squeeze:
        out = out[:, :, None]
    return (out, lse) if return_lse else out


@triton.jit(do_not_specialize=GATED_LENGTHS)
def _gated_logits(
    Q, K, Active, Out,
    sqb, sqh, sqd,
    skb, skh, skn, skd, s_out,
    n_kv_heads, group, lo, n_cols, scale, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    b = (row // n_kv_heads).to(tl.int64)
    kvh = row % n_kv_heads
    live = tl.load(Active + row).to(tl.int32)  # 0: a row that does not re-anchor, none of its keys is read
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < group
    heads = kvh * group + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_cols
    read = offs_n < n_cols * live  # all False on an inactive row: masked loads issue no memory traffic
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(K + b * skb + kvh * skh + (lo + offs_n)[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                mask=read[None, :] & d_ok[:, None], other=0.0)
    # Rounded to the inputs' dtype before scaling, as torch's q @ k^T in bf16/fp16 is (full_logits): the same logits.
    s = tl.dot(q, k).to(Q.dtype.element_ty).to(tl.float32) * scale
    s = tl.where(read[None, :], s, float("-inf"))
    out_rows = row.to(tl.int64) * group + offs_h
    tl.store(Out + out_rows[:, None] * s_out + offs_n[None, :], s, mask=h_ok[:, None] & n_ok[None, :])


def gated_logits(q: torch.Tensor, k: torch.Tensor, active: torch.Tensor, *, lo: int = 0, scale: float) -> torch.Tensor:
    """q (B, Hkv, g, d) grouped queries, k (B, Hkv, T, d), active (B * Hkv,) bool -> (B * Hkv, g, T - lo) float32:
    scale * q . k_j for j in [lo, T) on the active rows, -inf on the others, whose keys are never read
    (PrHS's scoring at a step where only some rows re-anchor, with no host sync to find out which)."""
    b, hkv, g, d = q.shape
    n_cols = k.shape[2] - lo
    # rows padded to 16 floats: the row stride is always a multiple of 16 (vector stores, one compiled variant)
    out = torch.empty(b * hkv, g, triton.cdiv(max(n_cols, 0), 16) * 16, dtype=torch.float32, device=q.device)[..., :max(n_cols, 0)]
    if n_cols <= 0:
        return out
    q3 = q.reshape(b, hkv * g, d)
    flags = active.to(device=q.device, dtype=torch.int8).contiguous()
    block_n = 64
    grid = (b * hkv, triton.cdiv(n_cols, block_n))
    _gated_logits[grid](
        q3, k, flags, out, *q3.stride(), *k.stride(), out.stride(1), hkv, g, lo, n_cols, scale, d,
        BLOCK_H=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, HEAD_DIM=triton.next_power_of_2(max(d, 16)),
        num_warps=4,
    )
    return out
