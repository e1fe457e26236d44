"""Causal block-logit GEMM with the Output-Aware epilogue (Triton): the second half of
methods/score.py's pooled estimate, over the causal tiles only.

Given the pooled, weight-normalised queries and keys of methods/score.py (per head,
Qbar (P, s d) and Kbar (P, s d), Kbar's slots already reversed), the value term per key
block Bbar (P,) and the valid tiles per block W (P,):

    M[i, j] = scale / s * Qbar[i] . Kbar[j] + Bbar[j]    if j <= i, W_i > 0 and W_j > 0
    M[i, j] = -inf                                       otherwise

One program per (BLOCK_I x BLOCK_J tile, batch x query head); a tile wholly above the
diagonal writes -inf without reading anything, so the GEMM costs half the full P x P one.
GQA: query head h reads the pooled keys and the value term of KV head h // g.
The dot runs on tensor cores in `precision` ("tf32x3": three TF32 products, about float32
accuracy; "tf32": one, ~1e-3 relative; "ieee": plain float32 FMA), accumulating in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PRECISIONS = ("tf32x3", "tf32", "ieee")


@triton.jit
def _block_scores(
    Qb, Kb, Bonus, Weight, Out,
    sqb, sqh, sqi, sqk,
    skb, skh, skj, skk,
    sbb, sbh, sbj,
    swb, swj,
    sob, soh, soi, soj,
    p, kdim, n_q_heads, group, scale_s,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BONUS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // n_q_heads
    h = bh % n_q_heads
    kvh = h // group
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    out_ptrs = Out + b * sob + h * soh + i[:, None] * soi + j[None, :] * soj
    in_range = (i[:, None] < p) & (j[None, :] < p)
    if pid_j * BLOCK_J > pid_i * BLOCK_I + BLOCK_I - 1:  # wholly above the diagonal
        tl.store(out_ptrs, tl.full([BLOCK_I, BLOCK_J], float("-inf"), tl.float32), mask=in_range)
    else:
        acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        q_ptrs = Qb + b * sqb + h * sqh + i[:, None] * sqi
        k_ptrs = Kb + b * skb + kvh * skh + j[None, :] * skj
        for k0 in range(0, kdim, BLOCK_K):
            kk = k0 + offs_k
            qt = tl.load(q_ptrs + kk[None, :] * sqk, mask=(i[:, None] < p) & (kk[None, :] < kdim), other=0.0)
            kt = tl.load(k_ptrs + kk[:, None] * skk, mask=(kk[:, None] < kdim) & (j[None, :] < p), other=0.0)
            acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
        acc = acc * scale_s
        if HAS_BONUS:
            acc += tl.load(Bonus + b * sbb + kvh * sbh + j * sbj, mask=j < p, other=0.0)[None, :]
        wi = tl.load(Weight + b * swb + i * swj, mask=i < p, other=0.0)
        wj = tl.load(Weight + b * swb + j * swj, mask=j < p, other=0.0)
        ok = (j[None, :] <= i[:, None]) & (wi[:, None] > 0) & (wj[None, :] > 0)
        tl.store(out_ptrs, tl.where(ok, acc, float("-inf")), mask=in_range)


def _configs():
    return [
        triton.Config({"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bi, bj, bk, w, s in [(64, 64, 64, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (64, 128, 64, 4, 3),
                                 (128, 128, 64, 8, 2)]
    ]


# Keyed on shapes only: the row count and the pooled width s d.
_tuned = triton.autotune(configs=_configs(), key=["p", "kdim", "HAS_BONUS", "PRECISION"])(_block_scores)


def block_scores(
    q_bar: torch.Tensor,
    k_bar: torch.Tensor,
    bonus: torch.Tensor | None,
    weight: torch.Tensor,
    scale_s: float,
    precision: str = "tf32x3",
) -> torch.Tensor:
    """q_bar (B, Hq, P, K), k_bar (B, Hkv, P, K) float32, bonus (B, Hkv, P) or None, weight (B, P)
    -> logits (B, Hq, P, P) float32 (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    batch, hq, p, kdim = q_bar.shape
    hkv = k_bar.shape[1]
    out = torch.empty(batch, hq, p, p, dtype=torch.float32, device=q_bar.device)
    weight = weight.to(torch.float32)
    bonus_arg = bonus if bonus is not None else weight
    bonus_strides = bonus.stride() if bonus is not None else (0, 0, 0)
    args = (
        q_bar, k_bar, bonus_arg, weight, out,
        *q_bar.stride(), *k_bar.stride(), *bonus_strides, *weight.stride(), *out.stride(),
        p, kdim, hq, hq // hkv, scale_s,
    )
    meta = dict(HAS_BONUS=bonus is not None, PRECISION=precision)
    if INTERPRET:
        bi = 16
        _block_scores[(triton.cdiv(p, bi), triton.cdiv(p, bi), batch * hq)](*args, **meta, BLOCK_I=bi, BLOCK_J=bi, BLOCK_K=32)
    else:
        grid = lambda m: (triton.cdiv(p, m["BLOCK_I"]), triton.cdiv(p, m["BLOCK_J"]), batch * hq)  # noqa: E731
        _tuned[grid](*args, **meta)
    return out
