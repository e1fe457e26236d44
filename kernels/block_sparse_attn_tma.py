"""Block-sparse causal flash attention forward, K/V tiles through tensor descriptors (TMA).

The same math as block_sparse_attn.py (see its docstring): O[m] is the softmax
over the keys of the selected blocks that are causal, inside N and not padding,
with rows that have no key written as zeros. The difference is only how K and V
tiles move: a 4-D tensor descriptor over (B, Hkv, N, d) lets Hopper's copy engine
fetch each BLOCK_N x d tile (zero-filled past N) while the tensor cores work.
Needs compute capability >= 9.0, a power-of-two head dim and 16-byte aligned strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from stem_cli.index import BlockIndex
from stem_cli.kernels.block_sparse_attn import INTERPRET, LENGTH_ARGS, _online_softmax_step, _prune, _write_output, launch_buffers


@triton.jit(do_not_specialize=LENGTH_ARGS)  # see block_sparse_attn.LENGTH_ARGS
def _block_sparse_attn_tma_fwd(
    Q, k_desc, v_desc, Out, Lse, Counts, Indices, Start,
    sqb, sqh, sqn, sqd,
    sob, soh, son, sod,
    scb, sch, scp,
    sib, sih, sip, sik,
    n_ctx, qk_scale_log2, n_q_heads, group, index_head_div,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_START: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    kvh = h // group
    ih = h // index_head_div
    q_block = (pid_m * BLOCK_M) // BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=offs_m[:, None] < n_ctx, other=0.0)
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    count = tl.load(Counts + b * scb + ih * sch + q_block * scp)
    row = Indices + b * sib + ih * sih + q_block * sip
    last = tl.load(row + (count - 1) * sik, mask=count > 0, other=-1)
    n_plain = tl.where(last == q_block, count - 1, count)  # blocks wholly below the diagonal
    TILES: tl.constexpr = BLOCK // BLOCK_N
    for step in range(0, n_plain * TILES):
        kb = tl.load(row + (step // TILES) * sik)
        start_n = kb * BLOCK + (step % TILES) * BLOCK_N
        k = k_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k))
        if HAS_START:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = tl.where(offs_n[None, :] >= start, s, float("-inf"))
        v = v_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)
    for step in range(n_plain * TILES, count * TILES):  # the diagonal block
        start_n = q_block * BLOCK + (step % TILES) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = k_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k))
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < n_ctx) & (offs_n[None, :] >= start)
        s = tl.where(keep, s, float("-inf"))
        v = v_desc.load([b, kvh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)

    out_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    _write_output(acc, m_i, l_i, out_ptrs, offs_m[:, None] < n_ctx, Lse + pid_bh * n_ctx + offs_m, offs_m < n_ctx, STORE_LSE)


def _set_block_shape(nargs):
    n = nargs["BLOCK_N"]
    for name in ("k_desc", "v_desc"):
        nargs[name].block_shape = [1, 1, n, nargs["HEAD_DIM"]]


_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_block_shape)
        for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
    ],
    key=["HEAD_DIM", "BLOCK", "STORE_LSE"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_attn_tma_fwd)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Tensor descriptors need Hopper or newer (by capability), a power-of-two head dim and aligned strides."""
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or d > 256:
        return False
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return all(x.stride(-1) == 1 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0 for x in (k, v))


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
):
    """Same contract as block_sparse_attn.block_sparse_attention; check `supported` first."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    scale, out, lse, counts, indices, start = launch_buffers(q, index, scale, kv_start, return_lse, out)
    bn = min(64, index.block_size)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, d])
    v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, d])
    args = (
        q, k_desc, v_desc, out, lse, counts, indices, start,
        *q.stride(), *out.stride(), *counts.stride(), *indices.stride(),
        n, scale * 1.4426950408889634, hq, hq // hkv, hq // index.num_heads,
    )
    meta = dict(BLOCK=index.block_size, HEAD_DIM=d, STORE_LSE=return_lse, HAS_START=kv_start is not None)
    if INTERPRET:
        bm = min(64, index.block_size)
        _block_sparse_attn_tma_fwd[(triton.cdiv(n, bm), batch * hq)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    else:
        _tuned[lambda m: (triton.cdiv(n, m["BLOCK_M"]), batch * hq)](*args, **meta)
    return (out, lse) if return_lse else out
