"""Output-Aware block logits from antidiagonal strided scores (Triton).

Stride s, block Bk, T = Bk / s tiles per block. Query tile a, key tile c:

    S[a, c] = scale / s * sum_{t<s} q[a s + s-1-t] . k[c s + t] + bonus[c]

(the mean of the tile's antidiagonal of q.k^T plus the value term
bonus[c] = beta * ReLU(z(log max_{j in c} ||v_j||))). Block logit of query block i
and key block j is the mean of S over their valid tile pairs:

    M[i, j] = sum_{a in i, c in j} w_a w_c S[a, c] / (sum_{a in i} w_a  sum_{c in j} w_c),

w = 1 for a tile holding any valid token, 0 otherwise; -inf above the diagonal
and where a block has no valid tile.

One program per (M / T query blocks, batch x query head): its M query tiles form
the M side of a GEMM whose reduction runs over the s antidiagonal slots (each a
d-wide dot), against NC key tiles (NC / T key blocks) at a time, causal chunks
only; the M x NC tile scores are reduced to block sums in
registers, so nothing of size (N/s)^2 ever reaches memory. Query heads of one
KV head are adjacent in the grid, so their K reads hit L2.

The value term (one pass over V) and tile weights are computed in PyTorch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stem_cli.kernels.reference import _pad_to, value_bonus

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _block_logits_fwd(
    Q, K, Bonus, Wt, Wblock, Out,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    sbb, sbh, sbt,
    swb, swt,
    sgb, sgp,
    sob, soh, soi, soj,
    n_ctx, n_blocks, n_q_heads, group, scale, head_dim,
    STRIDE: tl.constexpr, TPB: tl.constexpr, M: tl.constexpr, NC: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_BONUS: tl.constexpr,
):
    pid_h = tl.program_id(0)  # query head fastest: a KV group's heads run together and share K in L2
    pid_i = tl.program_id(1)
    b = tl.program_id(2)
    kvh = pid_h // group
    QB: tl.constexpr = M // TPB  # query blocks per program
    JB: tl.constexpr = NC // TPB  # key blocks per step

    tile_m = pid_i * M + tl.arange(0, M)  # query tiles of this program
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    w_q = tl.load(Wt + b * swb + tile_m * swt, mask=tile_m * STRIDE < n_ctx, other=0.0)
    blocks_i = pid_i * QB + tl.arange(0, QB)
    wq_block = tl.load(Wblock + b * sgb + blocks_i * sgp, mask=blocks_i < n_blocks, other=0.0)

    q_base = Q + b * sqb + pid_h * sqh
    k_base = K + b * skb + kvh * skh
    last_block = tl.minimum((pid_i + 1) * QB, n_blocks)  # causal: no key block past the last query block
    for j0 in range(0, last_block, JB):
        tile_n = j0 * TPB + tl.arange(0, NC)
        acc = tl.zeros([M, NC], dtype=tl.float32)
        for t in range(STRIDE):  # a loop, not unrolled: Triton pipelines its loads
            rows = tile_m * STRIDE + (STRIDE - 1 - t)
            cols = tile_n * STRIDE + t
            q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=(rows[:, None] < n_ctx) & d_ok[None, :], other=0.0)
            k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd, mask=(cols[None, :] < n_ctx) & d_ok[:, None], other=0.0)
            acc += tl.dot(q, k)
        s = acc * scale
        w_k = tl.load(Wt + b * swb + tile_n * swt, mask=tile_n * STRIDE < n_ctx, other=0.0)
        if HAS_BONUS:
            s += tl.load(Bonus + b * sbb + kvh * sbh + tile_n * sbt, mask=tile_n * STRIDE < n_ctx, other=0.0)[None, :]
        s = s * w_q[:, None] * w_k[None, :]
        sums = tl.sum(tl.sum(tl.reshape(s, [QB, TPB, JB, TPB]), axis=3), axis=1)  # (QB, JB) block sums
        blocks_j = j0 + tl.arange(0, JB)
        wk_block = tl.load(Wblock + b * sgb + blocks_j * sgp, mask=blocks_j < n_blocks, other=0.0)
        denom = wq_block[:, None] * wk_block[None, :]
        causal = blocks_j[None, :] <= blocks_i[:, None]
        logit = tl.where(causal & (denom > 0), sums / tl.where(denom > 0, denom, 1.0), float("-inf"))
        tl.store(
            Out + b * sob + pid_h * soh + blocks_i[:, None] * soi + blocks_j[None, :] * soj,
            logit, mask=(blocks_i[:, None] < n_blocks) & (blocks_j[None, :] < n_blocks),
        )


def block_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    stride: int,
    beta: float,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as reference.block_logits: (B, Hq, P, P) float32, -inf where not choosable."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    p = -(-n // block_size)
    npad = p * block_size
    tpb = block_size // stride
    valid = torch.zeros(batch, npad, dtype=torch.bool, device=q.device)
    valid[:, :n] = True if key_valid is None else key_valid.to(q.device)
    tile_valid = valid.view(batch, npad // stride, stride).any(-1)
    wt = tile_valid.float().contiguous()
    wblock = wt.view(batch, p, tpb).sum(-1).contiguous()
    bonus = value_bonus(_pad_to(v, npad), stride, tile_valid, beta).contiguous() if beta > 0 else wt
    # Everything not written by the kernel (above the diagonal chunks) stays -inf.
    out = torch.full((batch, hq, p, p), float("-inf"), dtype=torch.float32, device=q.device)
    args = (
        q, k, bonus, wt, wblock, out,
        *q.stride(), *k.stride(), *(bonus.stride() if beta > 0 else (0, 0, 0)), *wt.stride(), *wblock.stride(), *out.stride(),
        n, p, hq, hq // hkv, scale / stride, d,
    )
    meta = dict(STRIDE=stride, TPB=tpb, HEAD_DIM=triton.next_power_of_2(max(d, 16)), HAS_BONUS=beta > 0)
    if INTERPRET:
        m = max(16, tpb)  # tl.dot wants >= 16 rows and columns
        _block_logits_fwd[(hq, triton.cdiv(p, m // tpb), batch)](*args, **meta, M=m, NC=m, num_warps=4)
    else:
        _tuned[lambda c: (hq, triton.cdiv(p, c["M"] // tpb), batch)](*args, **meta)
    return out


def _prune(configs, named_args, **kwargs):
    tpb = kwargs["TPB"]
    kept = [c for c in configs if c.kwargs["M"] >= tpb and c.kwargs["NC"] >= tpb]
    return kept or [triton.Config({"M": max(16, tpb), "NC": max(16, tpb)}, num_warps=8, num_stages=2)]


_tuned = triton.autotune(
    configs=[
        triton.Config({"M": m, "NC": nc}, num_warps=w, num_stages=st)
        for m, nc, w, st in [(128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (256, 64, 8, 2), (128, 64, 4, 3)]
    ],
    key=["STRIDE", "TPB", "HEAD_DIM", "HAS_BONUS"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_logits_fwd)
