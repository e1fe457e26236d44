"""Block-sparse causal flash attention forward (Triton).

For query row m of head h (KV head h // g) and the key blocks K(i) that the
BlockIndex lists for m's query block i:

    O[m] = sum_{n in S(m)} softmax_n(scale * q_m . k_n) v_n,
    S(m) = { n : block(n) in K(i), n <= m, n < N, n >= start[b] }

computed with the online softmax of FlashAttention: per key tile, running max
m, running sum l and the unnormalised accumulator are rescaled by
exp(m_old - m_new). Rows with an empty S(m) write zeros (and lse = -inf),
never NaN. Exponentials in base 2 with log2(e) folded into the scale.

One program per (query tile of BLOCK_M rows, batch x query head); it walks its
row's key blocks in BLOCK_N-wide tiles as one flat loop so Triton can pipeline
the loads. FP8=True is the e4m3 variant (kernels/block_sparse_attn_fp8.py: its math and
its launcher): per-block scales folded into each tile's logits and P.V. GQA reads the shared K/V head directly (no repeated copies); an index
per KV head serves every query head of its group. Left padding: keys before
start[b] are masked. Any N: loads past N are masked.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stem_cli.index import BlockIndex
from stem_cli.kernels.fp8_quantize import to_e4m3

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2):
    """Fold one tile of raw logits s (-inf = masked) and its values into the running state.

    The scale is applied inside the exponent (one fused multiply-add per element)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * qk_scale_log2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _online_softmax_step_fp8(s, v, m_i, l_i, acc, logit_scale_log2, v_scale, key_bias, PV_FP8: tl.constexpr,
                             PRE_ROUND: tl.constexpr, KEY_BIAS: tl.constexpr):
    """The step for raw e4m3 products s = q8.k8: logit_scale_log2 = c s^Q s^K log2(e) of this tile, v_scale
    = s^V of its key block, key_bias (BLOCK_N,) = c log2(e) qbar.(k_n - kbar) with KEY_BIAS (Q smoothing);
    with PV_FP8, P enters the dot as e4m3(2^8 p), undone with v_scale 2^-8."""
    if KEY_BIAS:
        t = s * logit_scale_log2 + key_bias[None, :]  # -inf stays -inf
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(t - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * logit_scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s * logit_scale_log2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        pv = tl.dot(to_e4m3(p * 256.0, PRE_ROUND), v) * (v_scale * 0.00390625)
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _fold_tile(s, v, m_i, l_i, acc, qk_scale_log2, ks_base, vs_base, kb, key_bias, FP8: tl.constexpr,
               PV_FP8: tl.constexpr, PRE_ROUND: tl.constexpr, KEY_BIAS: tl.constexpr):
    """One key tile of block kb into the running state, by the bf16 or the FP8 step."""
    if FP8:
        m_i, l_i, acc = _online_softmax_step_fp8(s, v, m_i, l_i, acc, qk_scale_log2 * tl.load(ks_base + kb),
                                                 tl.load(vs_base + kb), key_bias, PV_FP8, PRE_ROUND, KEY_BIAS)
    else:
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, qk_scale_log2)
    return m_i, l_i, acc


@triton.jit
def _write_output(acc, m_i, l_i, out_ptrs, out_mask, lse_ptrs, lse_mask, STORE_LSE: tl.constexpr):
    """O = acc / l (zeros where no key: acc is 0 there, never NaN); lse = ln 2 (m + log2 l) or -inf."""
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=out_mask)
    if STORE_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptrs, lse, mask=lse_mask)


@triton.jit
def _program_rows(Counts, Indices, scb, sch, scp, sib, sih, sip, sik, n_q_heads, group, index_head_div,
                  BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's batch b, query head h, KV head, query block, rows, and its index row:
    (count, pointer to its block ids, n_plain = how many of them lie wholly below the diagonal)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    ih = h // index_head_div
    q_block = (pid_m * BLOCK_M) // BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.load(Counts + b * scb + ih * sch + q_block * scp)
    row = Indices + b * sib + ih * sih + q_block * sip
    # Ids are ascending and the diagonal block can only be the last: every block before
    # it lies wholly below the diagonal and inside N, so it needs no mask at all.
    last = tl.load(row + (count - 1) * sik, mask=count > 0, other=-1)
    n_plain = tl.where(last == q_block, count - 1, count)
    return b, h, h // group, q_block, offs_m, count, row, n_plain


# Integer arguments that change with the prompt's length: N and the strides of the (B, H, p) counts, the
# (B, H, p, K) block ids and the per-block FP8 scales (p = blocks, K = the widest row). They are read a scalar
# at a time or in masks, so leaving them unspecialised costs nothing, and an evaluation over prompts of many
# lengths compiles this kernel once instead of once per "divisible by 16" pattern of them. Q/K/V/O strides stay
# specialised (vector loads need them; with d a multiple of 16 they are whatever N is).
LENGTH_ARGS = ("n_ctx", "scb", "sch", "scp", "sib", "sih", "sip",
               "sqsb", "sqsh", "sksb", "sksh", "svsb", "svsh", "svmb", "svmh", "skbb", "skbh")


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _block_sparse_attn_fwd(
    Q, K, V, Out, Lse, Counts, Indices, Start, QS, KS, VS, VM, KB,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sqsb, sqsh, sksb, sksh, svsb, svsh, svmb, svmh, skbb, skbh,
    scb, sch, scp,
    sib, sih, sip, sik,
    n_ctx, qk_scale_log2, n_q_heads, group, index_head_div, head_dim,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr, HAS_START: tl.constexpr, FP8: tl.constexpr, PV_FP8: tl.constexpr, PRE_ROUND: tl.constexpr,
    KEY_BIAS: tl.constexpr,
):
    b, h, kvh, q_block, offs_m, count, row, n_plain = _program_rows(
        Counts, Indices, scb, sch, scp, sib, sih, sip, sik, n_q_heads, group, index_head_div, BLOCK, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < n_ctx) & d_ok[None, :], other=0.0,
    )
    if FP8:  # the scales QS, KS, VS (B, H, P): Q's of this query block now, K's and V's per key block
        qk_scale_log2 = qk_scale_log2 * tl.load(QS + b * sqsb + h * sqsh + q_block)
    if HAS_START:
        start = tl.load(Start + b)
    else:
        start = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    ks_base = KS + b * sksb + kvh * sksh
    vs_base = VS + b * svsb + kvh * svsh
    kbias_base = KB + b * skbb + h * skbh  # (B, Hq, N) float32, read with KEY_BIAS only
    TILES: tl.constexpr = BLOCK // BLOCK_N
    for step in range(0, n_plain * TILES):
        kb = tl.load(row + (step // TILES) * sik)
        offs_n = kb * BLOCK + (step % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        if HAS_START:
            s = tl.where(offs_n[None, :] >= start, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        key_bias = tl.load(kbias_base + offs_n) if KEY_BIAS else offs_n  # offs_n: a placeholder, unread
        m_i, l_i, acc = _fold_tile(s, v, m_i, l_i, acc, qk_scale_log2, ks_base, vs_base, kb, key_bias, FP8, PV_FP8,
                                   PRE_ROUND, KEY_BIAS)
    for step in range(n_plain * TILES, count * TILES):  # the diagonal block: causal, N and padding masks
        offs_n = q_block * BLOCK + (step % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_ctx
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k)
        keep = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :] & (offs_n[None, :] >= start)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        key_bias = tl.load(kbias_base + offs_n, mask=n_ok, other=0.0) if KEY_BIAS else offs_n
        m_i, l_i, acc = _fold_tile(s, v, m_i, l_i, acc, qk_scale_log2, ks_base, vs_base, q_block, key_bias, FP8, PV_FP8,
                                   PRE_ROUND, KEY_BIAS)

    if PV_FP8:  # V was quantised centred, V - mu: O = acc / l + mu, as (acc + l mu) / l (0 where no key: l = 0)
        v_mean = tl.load(VM + b * svmb + kvh * svmh + offs_d, mask=d_ok, other=0.0)
        acc += l_i[:, None] * v_mean[None, :]
    out_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod
    _write_output(acc, m_i, l_i, out_ptrs, (offs_m[:, None] < n_ctx) & d_ok[None, :], Lse + (b * n_q_heads + h) * n_ctx + offs_m, offs_m < n_ctx, STORE_LSE)


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2)]
    ]


def _prune(configs, named_args, **kwargs):
    """Tiles must fit inside one index block; small blocks get one tile of the block's size."""
    block = kwargs["BLOCK"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block and c.kwargs["BLOCK_N"] <= block]
    return kept or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=2, pre_hook=configs[0].pre_hook)]


_tuned = triton.autotune(
    configs=_configs(), key=["HEAD_DIM", "BLOCK", "STORE_LSE", "FP8", "PV_FP8", "KEY_BIAS"], prune_configs_by={"early_config_prune": _prune}
)(_block_sparse_attn_fwd)


def launch_buffers(q, index: BlockIndex, scale, kv_start, return_lse: bool, out):
    """Checks and device buffers both attention kernels launch with:
    (scale, out, lse, counts, indices, start); lse and start alias other buffers when unused."""
    batch, hq, n, d = q.shape
    if index.block_size < 16 or index.block_size & (index.block_size - 1):
        raise ValueError(f"block_size={index.block_size} is not supported by the Triton kernel: use a power of two >= 16")
    if q.dtype not in (torch.bfloat16, torch.float16) and not INTERPRET:
        raise ValueError(f"dtype {q.dtype} is not supported by the Triton kernel: use bfloat16 or float16")
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(batch, hq, n, dtype=torch.float32, device=q.device) if return_lse else out
    counts = index.counts.to(device=q.device, dtype=torch.int32)
    indices = index.indices.to(device=q.device, dtype=torch.int32)
    start = kv_start.to(device=q.device, dtype=torch.int32) if kv_start is not None else counts
    return scale, out, lse, counts, indices, start


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
    """q (B, Hq, N, d), k/v (B, Hkv, N, d) bf16/fp16 -> (B, Hq, N, d); index per query or KV head.

    kv_start (B,) int: first valid key of each sequence (left padding).
    """
    buffers = launch_buffers(q, index, scale, kv_start, return_lse, out)
    return launch(q, k, v, None, index, buffers, n=q.shape[2], d=q.shape[3], has_start=kv_start is not None,
                  return_lse=return_lse)


def launch(q, k, v, scales, index: BlockIndex, buffers, *, n: int, d: int, has_start: bool, return_lse: bool,
           pv_fp8: bool = False, v_mean: torch.Tensor | None = None, key_bias: torch.Tensor | None = None):
    """Run the kernel on operands q, k, v (bf16/fp16, or e4m3 with `scales` = (Q's, K's, V's) float32
    (B, H, P) per-block scales: the FP8 variant, P and V in e4m3 too with pv_fp8, V quantised as V - v_mean,
    v_mean (B, Hkv, d) float32, added back to the output; key_bias (B, Hq, N) float32: c log2(e) qbar.(k_n - kbar),
    added to every logit of key n, Q smoothing)."""
    scale, out, lse, counts, indices, start = buffers
    batch, hq = q.shape[:2]
    hkv = k.shape[1]
    fp8 = scales is not None
    q_scales, k_scales, v_scales = scales if fp8 else (counts, counts, counts)  # unread without FP8
    if fp8 and pv_fp8 and v_mean is None:
        raise ValueError("the FP8 P.V path adds V's channel means back: pass v_mean (zeros for an uncentred V)")
    v_mean = v_mean if fp8 and pv_fp8 else counts  # unread without PV_FP8
    has_bias = fp8 and key_bias is not None
    key_bias = key_bias if has_bias else counts  # unread without KEY_BIAS
    head_dim = triton.next_power_of_2(max(d, 32 if fp8 else 16))  # an e4m3 dot reduces over >= 32
    args = (
        q, k, v, out, lse, counts, indices, start, q_scales, k_scales, v_scales, v_mean, key_bias,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *q_scales.stride()[:2], *k_scales.stride()[:2], *v_scales.stride()[:2], *v_mean.stride()[:2], *key_bias.stride()[:2],
        *counts.stride(), *indices.stride(),
        n, scale * 1.4426950408889634, hq, hq // hkv, hq // index.num_heads, d,
    )
    meta = dict(BLOCK=index.block_size, HEAD_DIM=head_dim, STORE_LSE=return_lse, HAS_START=has_start, FP8=fp8,
                PV_FP8=fp8 and pv_fp8, PRE_ROUND=fp8 and pv_fp8 and INTERPRET, KEY_BIAS=has_bias)
    if INTERPRET:
        # The interpreter runs on the CPU: one config, no autotuning.
        bm = min(64, index.block_size)
        grid = (triton.cdiv(n, bm), batch * hq)
        _block_sparse_attn_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=min(64, index.block_size))
    else:
        grid = lambda m: (triton.cdiv(n, m["BLOCK_M"]), batch * hq)  # noqa: E731
        _tuned[grid](*args, **meta)
    return (out, lse) if return_lse else out
