"""Pooled block logits and their causal row softmax (Triton): FlexPrefill's query-aware block distribution,
without the (P x P) logits in memory.

Per batch and query head (GQA: query head h reads KV head h // g), with q_bar, k_bar the blocks' mean-pooled
queries and keys (B, H, P, d) and v_i whether block i holds a valid (not left-padding) token:

    S[i, j]   = scale * q_bar[i] . k_bar[j]                allowed: j <= i, v_i and v_j
    out[i, j] = exp(S[i, j] - m_i) / l_i                    m_i, l_i: max and sum of exponentials over allowed j
    out[i, j] = 0                                           not allowed (a row with no allowed j is all zeros)

i.e. softmax(S masked to -inf).nan_to_num(0), the torch definition in methods/flexprefill.estimate. One program
per (BLOCK_I query blocks, batch x query head): pass 1 keeps the online max and sum over j <= the program's last
row, pass 2 recomputes the tiles and writes every entry of its rows (zeros past the diagonal, so the output needs
no fill). FLOPs 2 x (P^2 / 2) x 2d per head, memory P^2 x 4 bytes written. float32 operands: `precision`
"tf32x3" (three TF32 products, float32-level error; the default on the GPU) or "ieee" (plain FMA).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits(q_base, k_base, i, j, p, i_ok, BlockOk_b, svp, sqi, sqd, skj, skd, scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
            PRECISION: tl.constexpr):
    """S for rows i and columns j, -inf where not allowed: (BLOCK_I, BLOCK_J) float32."""
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        qt = tl.load(q_base + i[:, None] * sqi + dd[None, :] * sqd, mask=(i[:, None] < p) & (dd[None, :] < HEAD_DIM),
                     other=0.0)
        kt = tl.load(k_base + j[None, :] * skj + dd[:, None] * skd, mask=(j[None, :] < p) & (dd[:, None] < HEAD_DIM),
                     other=0.0)
        acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
    j_ok = tl.load(BlockOk_b + j * svp, mask=j < p, other=0) != 0
    ok = (j[None, :] <= i[:, None]) & i_ok[:, None] & j_ok[None, :]
    return tl.where(ok, acc * scale, float("-inf"))


@triton.jit
def _pooled_block_softmax(
    Qb, Kb, BlockOk, Out,
    sqb, sqh, sqi, sqd,
    skb, skh, skj, skd,
    svb, svp,
    sob, soh, soi, soj,
    p, n_q_heads, group, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    q_base = Qb + b * sqb + h * sqh
    k_base = Kb + b * skb + (h // group) * skh
    ok_b = BlockOk + b * svb
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = (tl.load(ok_b + i * svp, mask=i < p, other=0) != 0) & (i < p)
    j_end = tl.minimum((pid_i + 1) * BLOCK_I, p)  # causal: columns up to the last row

    m = tl.full([BLOCK_I], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_I], tl.float32)
    for j0 in range(0, j_end, BLOCK_J):
        s = _logits(q_base, k_base, i, j0 + tl.arange(0, BLOCK_J), p, i_ok, ok_b, svp, sqi, sqd, skj, skd, scale,
                    HEAD_DIM, BLOCK_D, BLOCK_I, BLOCK_J, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(l > 0, 1.0 / tl.maximum(l, 1e-30), 0.0)  # a row with no allowed block stays zeros

    rows = Out + b * sob + h * soh + i[:, None] * soi
    for j0 in range(0, j_end, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        s = _logits(q_base, k_base, i, j, p, i_ok, ok_b, svp, sqi, sqd, skj, skd, scale,
                    HEAD_DIM, BLOCK_D, BLOCK_I, BLOCK_J, PRECISION)
        tl.store(rows + j[None, :] * soj, tl.exp(s - m[:, None]) * inv_l[:, None], mask=(i[:, None] < p) & (j[None, :] < p))
    for j0 in range(tl.cdiv(j_end, BLOCK_J) * BLOCK_J, p, BLOCK_J):  # past the diagonal: zeros
        j = j0 + tl.arange(0, BLOCK_J)
        tl.store(rows + j[None, :] * soj, tl.zeros([BLOCK_I, BLOCK_J], tl.float32), mask=(i[:, None] < p) & (j[None, :] < p))


def _configs():
    # float32 tiles of BLOCK_D = 64: (64 + 64) x 64 x 4 bytes = 32 KB per stage (checked for sm_90 under Triton 3.6).
    return [triton.Config({"BLOCK_I": bi, "BLOCK_J": bj}, num_warps=w, num_stages=st)
            for bi, bj, w, st in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 64, 4, 1)]]


# Keyed on shapes only: block count, head dim and precision.
_tuned = triton.autotune(configs=_configs(), key=["p", "HEAD_DIM", "PRECISION"])(_pooled_block_softmax)


def block_softmax(q_bar: torch.Tensor, k_bar: torch.Tensor, block_ok: torch.Tensor, scale: float,
                  precision: str = "tf32x3") -> torch.Tensor:
    """q_bar (B, Hq, P, d), k_bar (B, Hkv, P, d) float32, block_ok (B, P) bool -> (B, Hq, P, P) float32
    (module docstring)."""
    if q_bar.dtype == torch.float64:  # the kernel computes in float32
        q_bar, k_bar = q_bar.float(), k_bar.float()
    batch, hq, p, d = q_bar.shape
    hkv = k_bar.shape[1]
    ok = block_ok.to(device=q_bar.device, dtype=torch.int8)
    out = torch.empty(batch, hq, p, p, dtype=torch.float32, device=q_bar.device)
    args = (q_bar, k_bar, ok, out, *q_bar.stride(), *k_bar.stride(), *ok.stride(), *out.stride(),
            p, hq, hq // hkv, float(scale))
    meta = dict(HEAD_DIM=d, BLOCK_D=min(triton.next_power_of_2(max(d, 16)), 64),
                PRECISION=precision if q_bar.dtype == torch.float32 else "ieee")
    if INTERPRET:
        _pooled_block_softmax[(triton.cdiv(p, 16), batch * hq)](*args, **meta, BLOCK_I=16, BLOCK_J=16)
    else:
        _tuned[lambda m: (triton.cdiv(p, m["BLOCK_I"]), batch * hq)](*args, **meta)
    return out


__all__ = ["block_softmax"]
