"""Block-sparse causal flash attention forward, GQA-packed: one K/V tile load serves a whole query-head group.

For an index per KV head (StemConfig gqa='kv'), the G = Hq / Hkv query heads of
a group attend to the same key blocks K(i) of query block i. For query row m of
query head h = c G + j (KV head c):

    O[h, m] = sum_{n in S(m)} softmax_n(scale * q_{h,m} . k_{c,n}) v_{c,n},
    S(m) = { n : block(n) in K_c(i), n <= m, n < N, n >= start[b] }

the same math as block_sparse_attn.py (online softmax, base-2 exponentials with
log2(e) in the scale, rows with an empty S(m) written as zeros with lse = -inf).
What differs is the tiling. The G * BLOCK rows (h, m) of one (query block, KV
head) are stacked position-major, head-minor,

    r = (m - i BLOCK) G + j,   r in [0, G BLOCK),

and cut into TILE_M-row tiles; tile t holds rows r in [t TILE_M, (t+1) TILE_M),
i.e. positions i BLOCK + r // G of heads c G + r % G. All its rows share one index
row, so each BLOCK_N x d tile of K and V is loaded once for G heads' rows, and the
G BLOCK / TILE_M tiles of a group are adjacent programs (their K/V come from L2).
Any G works (3 included): TILE_M only has to divide G BLOCK. On the diagonal
block a tile walks only the key tiles up to its last position.

LONGEST_FIRST: programs take (query block, batch x KV head) items in the order of a
permutation array, rows with more blocks first (TPD budgets grow along the
sequence), so the longest rows do not start last and leave SMs idle at the tail.
No warp specialisation: Triton 3.6 on sm_90 compiles tl.range(..., warp_specialize=True) of this
loop to the identical PTX at 8 and 16 warps and fails in its pass manager at 4 warps
(tests/bench/gqa_compile.py --variants warp_specialize shows both).
Left padding: keys before start[b] are masked. Any N: loads past N are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stem_cli.index import BlockIndex
from stem_cli.kernels.block_sparse_attn import INTERPRET, LENGTH_ARGS, _online_softmax_step, _write_output, launch_buffers

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_90 (H100/H200); a config above it fails at launch


@triton.jit(do_not_specialize=LENGTH_ARGS + ("n_blocks",))  # see block_sparse_attn.LENGTH_ARGS
def _gqa_packed_fwd(
    Q, K, V, Out, Lse, Counts, Indices, Start, Order,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    scb, sch, scp,
    sib, sih, sip, sik,
    n_ctx, n_blocks, n_kv_heads, qk_scale_log2, head_dim,
    BLOCK: tl.constexpr, TILE_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_START: tl.constexpr, LONGEST_FIRST: tl.constexpr,
):
    TILES_PER_ITEM: tl.constexpr = GROUP * BLOCK // TILE_M
    pid = tl.program_id(0)
    item = pid // TILES_PER_ITEM
    tile = pid % TILES_PER_ITEM
    if LONGEST_FIRST:
        item = tl.load(Order + item)
    q_block = item % n_blocks
    bkv = item // n_blocks
    b = (bkv // n_kv_heads).to(tl.int64)  # batch strides times b pass 2^31 at 256K x 32 heads
    kvh = bkv % n_kv_heads

    r = tile * TILE_M + tl.arange(0, TILE_M)
    pos = q_block * BLOCK + r // GROUP  # query position of each row
    h = kvh * GROUP + r % GROUP  # query head of each row
    row_ok = pos < n_ctx
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + h[:, None] * sqh + pos[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0

    count = tl.load(Counts + b * scb + kvh * sch + q_block * scp)
    row = Indices + b * sib + kvh * sih + q_block * sip
    # Ids ascend and the diagonal block can only be the last: the ones before it lie wholly
    # below the diagonal and inside N, so they need no causal or length mask.
    last = tl.load(row + (count - 1) * sik, mask=count > 0, other=-1)
    n_plain = tl.where(last == q_block, count - 1, count)
    last_pos = tl.minimum(q_block * BLOCK + ((tile + 1) * TILE_M - 1) // GROUP, n_ctx - 1)
    n_diag = tl.where(last == q_block, (last_pos - q_block * BLOCK) // BLOCK_N + 1, 0)  # key tiles up to it

    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_M], dtype=tl.float32)
    acc = tl.zeros([TILE_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    TILES: tl.constexpr = BLOCK // BLOCK_N
    for step in range(0, n_plain * TILES):
        kb = tl.load(row + (step // TILES) * sik)
        offs_n = kb * BLOCK + (step % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        if HAS_START:
            s = tl.where(offs_n[None, :] >= start, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)
    for step in range(0, n_diag):  # the diagonal block: causal, N and padding masks
        offs_n = q_block * BLOCK + step * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_ctx
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        keep = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :] & (offs_n[None, :] >= start)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)

    out_ptrs = Out + b * sob + h[:, None] * soh + pos[:, None] * son + offs_d[None, :] * sod
    lse_ptrs = Lse + (b * n_kv_heads * GROUP + h) * n_ctx + pos
    _write_output(acc, m_i, l_i, out_ptrs, row_ok[:, None] & d_ok[None, :], lse_ptrs, row_ok, STORE_LSE)


# (TILE_M, BLOCK_N, num_warps, num_stages). 256-row tiles halve the K/V shared-memory reads per
# FLOP again; with 16 warps each warp group still holds 64 rows of the accumulator (ptxas caps
# 16 warps at 128 registers: 96 B of spills at head dim 128, none at 64). (256, 128, 16, 2) spilled
# 5.5 KB per thread at head dim 128 and is left out; (128, 64, 8, 2) is the 2-stage config that
# fits head dim 256 (192 KB). Shared memory and registers per config: tests/bench/gqa_compile.py.
CONFIGS = [
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
    (256, 64, 16, 2), (256, 64, 8, 2),
]


def shared_memory_estimate(tile_m: int, block_n: int, head_dim: int, stages: int, element_size: int = 2) -> int:
    """Bytes of the Q tile plus `stages` K and V tiles; the pruning bound (the sm_90 compile check
    in tests/bench/gqa_compile.py reads the real number per config)."""
    return element_size * head_dim * (tile_m + 2 * stages * block_n)


def _prune(configs, named_args, **kwargs):
    """Tiles inside one index block and dividing the group's rows; shared memory under the sm_90 limit."""
    block, group, d = kwargs["BLOCK"], kwargs["GROUP"], kwargs["HEAD_DIM"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= block and (group * block) % c.kwargs["TILE_M"] == 0
            and shared_memory_estimate(c.kwargs["TILE_M"], c.kwargs["BLOCK_N"], d, c.num_stages) <= SHARED_MEMORY_LIMIT]
    if kept:
        return kept
    return [triton.Config({"TILE_M": min(64, tile_rows(group, block)), "BLOCK_N": min(64, block)}, num_warps=4, num_stages=2)]


def tile_rows(group: int, block: int) -> int:
    """The largest power of two dividing group * block: the most rows a tile can take."""
    rows = group * block
    return rows & -rows


_tuned = triton.autotune(
    configs=[triton.Config({"TILE_M": tm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for tm, bn, w, s in CONFIGS],
    key=["HEAD_DIM", "BLOCK", "GROUP", "STORE_LSE", "HAS_START", "LONGEST_FIRST"],
    prune_configs_by={"early_config_prune": _prune},
)(_gqa_packed_fwd)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, index: BlockIndex) -> str | None:
    """Why the packed kernel cannot run this call (None when it can)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} KV heads"
    if index.num_heads != hkv:
        return (f"the GQA-packed kernel takes an index per KV head ({hkv} heads, StemConfig gqa='kv'), "
                f"not one with {index.num_heads} heads")
    if d > 256:
        return f"head dim {d} > 256 is not supported: the float32 accumulator of a 64-row tile would not fit in registers"
    return None


def longest_first_order(counts: torch.Tensor) -> torch.Tensor:
    """Work items (batch x KV head) * P + query block (counts' row-major order), most blocks first:
    an int32 permutation, computed on the device (no host read)."""
    return torch.argsort(counts.reshape(-1), descending=True, stable=True).to(torch.int32)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    longest_first: bool = False,
    config: tuple[int, int, int, int] | None = None,
):
    """q (B, Hq, N, d), k/v (B, Hkv, N, d) bf16/fp16, index per KV head -> (B, Hq, N, d).

    The contract of block_sparse_attn.block_sparse_attention (kv_start: first valid key per
    sequence; lse in nats) for indices per KV head; a ValueError for anything else. `config`
    (TILE_M, BLOCK_N, num_warps, num_stages) runs that one instead of autotuning (tests, benchmarks)."""
    reason = unsupported_reason(q, k, index)
    if reason is not None:
        raise ValueError(reason)
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale, out, lse, counts, indices, start = launch_buffers(q, index, scale, kv_start, return_lse, out)
    p = -(-n // index.block_size)
    order = longest_first_order(counts) if longest_first else counts  # unread without longest_first
    args = (
        q, k, v, out, lse, counts, indices, start, order,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *counts.stride(), *indices.stride(),
        n, p, hkv, scale * 1.4426950408889634, d,
    )
    meta = dict(BLOCK=index.block_size, HEAD_DIM=triton.next_power_of_2(max(d, 16)), GROUP=group, STORE_LSE=return_lse,
                HAS_START=kv_start is not None, LONGEST_FIRST=longest_first)
    items = batch * hkv * p
    if INTERPRET and config is None:
        # The interpreter runs on the CPU: one config, no autotuning.
        config = (min(64, tile_rows(group, index.block_size)), min(64, index.block_size), 4, 2)
    if config is not None:
        tm, bn, warps, stages = config
        if (group * index.block_size) % tm or index.block_size % bn:
            raise ValueError(f"config {config}: TILE_M must divide group x block ({group * index.block_size}) "
                             f"and BLOCK_N the block ({index.block_size})")
        grid = (items * group * index.block_size // tm,)
        _gqa_packed_fwd[grid](*args, **meta, TILE_M=tm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        _tuned[lambda m: (items * group * index.block_size // m["TILE_M"],)](*args, **meta)
    return (out, lse) if return_lse else out
