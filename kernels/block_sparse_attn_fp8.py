"""Block-sparse causal flash attention forward with FP8 (e4m3) operands (Triton).

The attention is the one of block_sparse_attn.py (see its docstring): for query row m
and its selected, causal, valid keys S(m), O[m] = sum_{n in S(m)} softmax_n(c q_m . k_n) v_n
with c the softmax scale. Only the operands of the two dots change.

Quantisation (kernels/fp8_quantize.py, run before this kernel): Q, K and V in e4m3 with one
float32 scale per (batch, head, index block t) of Bk rows (Bk = the index's block size, 128 by
default): s_t = amax_t |x| / 448, x ~= s_t x8, relative rounding <= 2^-4 for normal values.
Each BLOCK_M x BLOCK_N tile lies inside one query block i and one key
block j (tiles never cross an index block), so each tile has one scale per operand and the
scales leave the dots:

    logit(m, n) = c q_m . k_n ~= (c s^Q_i s^K_j) (q8_m . k8_n)     fp32 accumulation

one scalar multiply per tile, folded into the exponent's scale (base 2, log2 e included).
The online softmax then runs in fp32 exactly as in the bf16 kernel (running max, sum, rescale).

P and V (PV_FP8=True, what the executor runs): p = exp2(logit - running max) lies in [0, 1];
it enters the dot as e4m3 with the fixed scale 2^8 (a power of two, so the scaling itself is
exact: P 2^8 spans [0, 256], normals down to p = 2^-14, below that subnormals to 2^-17; smaller
weights round to 0, far under the output's resolution):

    acc += (s^V_j / 2^8) (rne_e4m3(2^8 p) . v8)     fp32 accumulation

and the running sum l takes the unrounded fp32 p (the normaliser carries no rounding error of
its own). V is stored transposed, (B, H, d, N), so both dots read their reduction dimension
contiguously, as Hopper's FP8 tensor-core instructions need. PV_FP8=False keeps P and V in
the input dtype (bf16) and quantises only Q and K: the benchmark times both.

Error (per element, relative, before accumulation): Q, K, V and P each carry <= 2^-4 rounding,
independent across elements, so the output's relative error is a few 2^-4 / sqrt(3) in RMS on
random data and smaller where few keys dominate (tests/bench/prefill.py measures it against
the bf16 kernel on the same index). Needs FP8 tensor cores: compute capability >= 8.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stem_cli.index import BlockIndex
from stem_cli.kernels.block_sparse_attn import INTERPRET, _write_output, launch_buffers
from stem_cli.kernels.fp8_quantize import quantize_blocks, to_e4m3

P_SCALE = 256.0  # fixed scale of P in [0, 1] before its e4m3 rounding (a power of two: exact)
MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core dots: Ada (8.9) and Hopper (9.0) onward


@triton.jit
def _online_softmax_step_fp8(s, v, m_i, l_i, acc, logit_scale_log2, v_scale, PV_FP8: tl.constexpr,
                             PRE_ROUND: tl.constexpr):
    """Fold one tile of raw q8.k8 products s (-inf = masked) into the running state.

    logit_scale_log2 = c s^Q s^K log2(e) for this tile; v_scale = s^V of its key block."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * logit_scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * logit_scale_log2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        pv = tl.dot(to_e4m3(p * 256.0, PRE_ROUND), v) * (v_scale * 0.00390625)  # 2^8 = P_SCALE, 2^-8 its inverse
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _block_sparse_attn_fp8_fwd(
    Q, K, V, QS, KS, VS, Out, Lse, Counts, Indices, Start,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sqsb, sqsh, sksb, sksh, svsb, svsh,
    scb, sch, scp,
    sib, sih, sip, sik,
    n_ctx, qk_scale_log2, n_q_heads, group, index_head_div, head_dim,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_START: tl.constexpr, PV_FP8: tl.constexpr, PRE_ROUND: tl.constexpr,
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
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < n_ctx) & d_ok[None, :], other=0.0,
    )
    q_scale_log2 = qk_scale_log2 * tl.load(QS + b * sqsb + h * sqsh + q_block)
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    count = tl.load(Counts + b * scb + ih * sch + q_block * scp)
    row = Indices + b * sib + ih * sih + q_block * sip
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    ks_base = KS + b * sksb + kvh * sksh
    vs_base = VS + b * svsb + kvh * svsh
    # As in the bf16 kernel: every block before the diagonal one needs no mask at all.
    last = tl.load(row + (count - 1) * sik, mask=count > 0, other=-1)
    n_plain = tl.where(last == q_block, count - 1, count)
    TILES: tl.constexpr = BLOCK // BLOCK_N
    for step in range(0, n_plain * TILES):
        kb = tl.load(row + (step // TILES) * sik)
        offs_n = kb * BLOCK + (step % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        if HAS_START:
            s = tl.where(offs_n[None, :] >= start, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step_fp8(s, v, m_i, l_i, acc, q_scale_log2 * tl.load(ks_base + kb),
                                                 tl.load(vs_base + kb), PV_FP8, PRE_ROUND)
    for step in range(n_plain * TILES, count * TILES):  # the diagonal block: causal, N and padding masks
        offs_n = q_block * BLOCK + (step % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_ctx
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        keep = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :] & (offs_n[None, :] >= start)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step_fp8(s, v, m_i, l_i, acc, q_scale_log2 * tl.load(ks_base + q_block),
                                                 tl.load(vs_base + q_block), PV_FP8, PRE_ROUND)

    out_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    _write_output(acc, m_i, l_i, out_ptrs, (offs_m[:, None] < n_ctx) & d_ok[None, :], Lse + pid_bh * n_ctx + offs_m, offs_m < n_ctx, STORE_LSE)


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (128, 64, 4, 3),
                             (64, 64, 4, 3), (64, 128, 4, 3)]
    ]


def _prune(configs, named_args, **kwargs):
    """Tiles must fit inside one index block (one scale per tile and operand)."""
    block = kwargs["BLOCK"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block and c.kwargs["BLOCK_N"] <= block]
    return kept or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2)]


_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BLOCK", "STORE_LSE", "PV_FP8"], prune_configs_by={"early_config_prune": _prune}
)(_block_sparse_attn_fp8_fwd)


def unsupported_reason(device: torch.device) -> str | None:
    """Why this kernel cannot run on `device` (no e4m3 tensor cores, or the CPU without the interpreter), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"FP8 attention needs e4m3 tensor cores (compute capability >= 8.9, e.g. Hopper's 9.0); "
                    f"this GPU has {capability[0]}.{capability[1]}")
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return f"FP8 attention runs on a CUDA GPU with compute capability >= 8.9 (or under TRITON_INTERPRET=1), not on {device.type}"


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
    pv_fp8: bool = True,
):
    """q (B, Hq, N, d), k/v (B, Hkv, N, d) bf16/fp16 -> (B, Hq, N, d) in q's dtype; index per query or KV head.

    Quantises Q, K (and V with pv_fp8) to e4m3 per (batch, head, index block), then runs the
    kernel; kv_start (B,) int: first valid key of each sequence (left padding).
    """
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    reason = unsupported_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    if index.block_size < 32 and not INTERPRET:
        raise ValueError(f"block_size={index.block_size} is too small for FP8 dots: use a power of two >= 32")
    scale, out, lse, counts, indices, start = launch_buffers(q, index, scale, kv_start, return_lse, out)
    block = index.block_size
    q8, q_scales = quantize_blocks(q, block)
    k8, k_scales = quantize_blocks(k, block)
    if pv_fp8:
        v_op, v_scales = quantize_blocks(v, block, transpose=True)
    else:
        v_op, v_scales = v, k_scales  # unused scales: any float32 (B, Hkv, P) tensor
    head_dim = triton.next_power_of_2(max(d, 32))
    args = (
        q8, k8, v_op, q_scales, k_scales, v_scales, out, lse, counts, indices, start,
        *q8.stride(), *k8.stride(), *v_op.stride(), *out.stride(),
        *q_scales.stride()[:2], *k_scales.stride()[:2], *v_scales.stride()[:2],
        *counts.stride(), *indices.stride(),
        n, scale * 1.4426950408889634, hq, hq // hkv, hq // index.num_heads, d,
    )
    meta = dict(BLOCK=block, HEAD_DIM=head_dim, STORE_LSE=return_lse, HAS_START=kv_start is not None, PV_FP8=pv_fp8,
                PRE_ROUND=INTERPRET)
    if INTERPRET:
        # The interpreter runs on the CPU: one config, no autotuning.
        bm = min(64, block)
        grid = (triton.cdiv(n, bm), batch * hq)
        _block_sparse_attn_fp8_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=min(64, block))
    else:
        grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]), batch * hq)  # noqa: E731
        _tuned[grid](*args, **meta)
    return (out, lse) if return_lse else out
