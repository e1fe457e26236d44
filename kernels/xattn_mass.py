"""XAttention's antidiagonal tile softmax, summed per block pair (Triton), without the (N/s) x (N/s) score matrix.

Stride s, block Bk, T = Bk / s tiles per block, tiles a, c of s tokens (queries and keys zero-padded to whole
blocks). Per batch and query head (GQA: query head h reads KV head h // g):

    S[a, c]    = scale / s * sum_{t<s} q[a s + s-1-t] . k[c s + t]          (the antidiagonal tile score)
    allowed    = c <= a and both tiles hold a valid (not left-padding) token
    p[a, c]    = exp(S[a, c] - m_a) / l_a  over the allowed c,  m_a = max_c S[a, c],  l_a = sum_c exp(S[a, c] - m_a)
    M[i, j]    = sum_{a in block i, c in block j} p[a, c]                     (a tile row with no allowed c adds 0)

One program per (BLOCK_A tile rows, batch x query head). Pass 1 walks the key tiles c <= the program's last row
in chunks of BLOCK_C and keeps the running max and sum per row (the online softmax of the fused-attention
tutorial); pass 2 recomputes each chunk's scores, normalises them and sums the (BLOCK_A x BLOCK_C) tile into its
(BLOCK_A/T x BLOCK_C/T) block pairs, stored straight into M. The score tile lives only in registers: the memory
is M (P x P per head), the work twice the causal half of the (N/s x N/s x s d) tile GEMM. Blocks j > i are not
written (the caller zero-fills M). The dot of slot t multiplies the s-strided rows q[a s + s-1-t] and
k[c s + t], loaded straight from q and k (no reshaped or flipped copy); inputs in their own dtype (bf16 on tensor
cores, exact products), fp32 accumulation (float32 inputs: `precision`, "ieee" = plain FMA).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_TILES = 64  # T = Bk / s per block at most: a program's tile rows cover whole blocks


@triton.jit
def _xattn_mass(
    Q, K, TileOk, Out,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    stb, stt,
    sob, soh, soi, soj,
    n, nt, n_q_heads, group, scale_s,
    STRIDE: tl.constexpr, TILES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_a = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    kvh = h // group
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)  # query tile rows
    a_ok = tl.load(TileOk + b * stb + a * stt, mask=a < nt, other=0) != 0
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + kvh * skh
    c_end = tl.minimum((pid_a + 1) * BLOCK_A, nt)  # causal: key tiles up to the last row

    m = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_A], tl.float32)
    for c0 in range(0, c_end, BLOCK_C):  # pass 1: row max and sum of exponentials
        s = _tile_scores(q_base, k_base, a, c0, n, sqn, sqd, skn, skd, scale_s, offs_d,
                         STRIDE, HEAD_DIM, BLOCK_D, BLOCK_A, BLOCK_C, PRECISION)
        s = _masked(s, a, a_ok, c0, TileOk + b * stb, stt, nt, BLOCK_C)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf: exp(-inf - 0) = 0
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(l > 0, 1.0 / tl.maximum(l, 1e-30), 0.0)  # a row without an allowed key tile adds nothing

    QB: tl.constexpr = BLOCK_A // TILES  # query blocks per program
    KB: tl.constexpr = BLOCK_C // TILES
    i = pid_a * QB + tl.arange(0, QB)
    for c0 in range(0, c_end, BLOCK_C):  # pass 2: probabilities summed per block pair
        s = _tile_scores(q_base, k_base, a, c0, n, sqn, sqd, skn, skd, scale_s, offs_d,
                         STRIDE, HEAD_DIM, BLOCK_D, BLOCK_A, BLOCK_C, PRECISION)
        s = _masked(s, a, a_ok, c0, TileOk + b * stb, stt, nt, BLOCK_C)
        prob = tl.exp(s - m[:, None]) * inv_l[:, None]
        mass = tl.sum(tl.sum(tl.reshape(prob, [QB, TILES, KB, TILES]), 3), 1)  # (QB, KB)
        j = c0 // TILES + tl.arange(0, KB)
        ptrs = Out + b * sob + h * soh + i[:, None] * soi + j[None, :] * soj
        tl.store(ptrs, mass, mask=(i[:, None] * TILES < nt) & (j[None, :] * TILES < nt) & (j[None, :] <= i[:, None]))


@triton.jit
def _tile_scores(q_base, k_base, a, c0, n, sqn, sqd, skn, skd, scale_s, offs_d,
                 STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """S for tile rows a and key tiles c0 .. c0 + BLOCK_C - 1: (BLOCK_A, BLOCK_C) float32."""
    c = c0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_A, BLOCK_C], dtype=tl.float32)
    for t in tl.static_range(STRIDE):
        q_tok = a * STRIDE + (STRIDE - 1 - t)
        k_tok = c * STRIDE + t
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            dd = d0 + offs_d
            qt = tl.load(q_base + q_tok[:, None] * sqn + dd[None, :] * sqd,
                         mask=(q_tok[:, None] < n) & (dd[None, :] < HEAD_DIM), other=0.0)
            kt = tl.load(k_base + k_tok[None, :] * skn + dd[:, None] * skd,
                         mask=(k_tok[None, :] < n) & (dd[:, None] < HEAD_DIM), other=0.0)
            acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
    return acc * scale_s


@triton.jit
def _masked(s, a, a_ok, c0, tile_ok_row, stt, nt, BLOCK_C: tl.constexpr):
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = tl.load(tile_ok_row + c * stt, mask=c < nt, other=0) != 0
    ok = (c[None, :] <= a[:, None]) & a_ok[:, None] & c_ok[None, :]
    return tl.where(ok, s, float("-inf"))


def _configs():
    return [
        triton.Config({"BLOCK_A": ba, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        # Shared memory for sm_90 with bf16 inputs, 16-aligned strides (compiled by Triton 3.6, the H200's): the
        # STRIDE x HEAD_DIM/BLOCK_D unrolled loads are multi-buffered per stage, so 64 x 64 tiles need 139 KB at
        # one stage but 524 KB at two and 786 KB at three (an H200 SM holds 227 KB: those failed on the GPU).
        # _prune keeps those that shared_bytes fits: stride 16 at d 128 (or float32 inputs) takes 32- or 16-row tiles.
        for ba, bc, w, st in [(64, 64, 4, 1), (64, 128, 4, 1), (64, 64, 8, 1), (64, 128, 8, 1), (32, 64, 4, 2), (32, 128, 4, 1),
                               (16, 64, 4, 1), (16, 128, 4, 1)]
    ]


SHARED_BYTES = 200 << 10  # below an H200 SM's 227 KB, with room for the layout conversions (~8 KB measured)


def shared_bytes(block_a: int, block_c: int, stages: int, stride: int, head_dim: int, block_d: int, elem: int) -> int:
    """Shared memory of one config, as Triton 3.6 lays it out for sm_90: the query tiles do not depend on the key
    chunk, so all STRIDE x HEAD_DIM / BLOCK_D of them are hoisted out of the key loop and stay resident
    (BLOCK_A x STRIDE x HEAD_DIM elements), plus one key tile per stage. Matches the compiled sizes within 8 KB
    (bf16, d 128, s 8: 64 rows 136 KB, 32 rows 72-80 KB; s 16: 64 rows 264 KB, which failed)."""
    return block_a * stride * head_dim * elem + block_c * block_d * elem * max(1, stages)


def _prune(configs, named_args, **kwargs):
    """Tiles of whole blocks (BLOCK_A and BLOCK_C multiples of T) whose shared memory fits (shared_bytes)."""
    t, stride, d, bd = kwargs["TILES"], kwargs["STRIDE"], kwargs["HEAD_DIM"], kwargs["BLOCK_D"]
    elem = named_args["Q"].element_size()

    def fits(c):
        return shared_bytes(c.kwargs["BLOCK_A"], c.kwargs["BLOCK_C"], c.num_stages, stride, d, bd, elem) <= SHARED_BYTES

    kept = [c for c in configs if c.kwargs["BLOCK_A"] % t == 0 and c.kwargs["BLOCK_C"] % t == 0 and fits(c)]
    if not kept:
        raise ValueError(f"xattn_mass: no tile config fits shared memory at stride {stride}, head dim {d}, "
                         f"{elem}-byte inputs ({t} tiles per block); use estimate_impl='torch'")
    return kept


# Keyed on shapes only: tile count, stride, tiles per block, head dim and dtype-driven precision.
_tuned = triton.autotune(configs=_configs(), key=["nt", "STRIDE", "TILES", "HEAD_DIM", "PRECISION"],
                         prune_configs_by={"early_config_prune": _prune})(_xattn_mass)


def supported(block_size: int, stride: int) -> bool:
    """Whether the kernel covers this grid: T = block_size / stride tiles per block, at most MAX_TILES."""
    return block_size % stride == 0 and block_size // stride <= MAX_TILES


def tile_block_mass(q: torch.Tensor, k: torch.Tensor, tile_ok: torch.Tensor, *, block_size: int, stride: int,
                    scale: float, precision: str = "ieee") -> torch.Tensor:
    """q (B, Hq, N, d), k (B, Hkv, N, d), tile_ok (B, P Bk / s) bool -> M (B, Hq, P, P) float32 (module docstring).
    `precision` applies to float32 inputs only ("ieee" or "tf32x3"); bf16/fp16 inputs multiply exactly."""
    if not supported(block_size, stride):
        raise ValueError(f"block_size={block_size}, stride={stride}: the fused estimate needs block_size / stride "
                         f"<= {MAX_TILES} tiles per block")
    if q.dtype == torch.float64:  # the kernel computes in float32
        q, k = q.float(), k.float()
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    tiles = block_size // stride
    p = -(-n // block_size)
    nt = p * tiles
    tile_ok = tile_ok.to(device=q.device, dtype=torch.int8)
    out = torch.zeros(batch, hq, p, p, dtype=torch.float32, device=q.device)
    args = (q, k, tile_ok, out, *q.stride(), *k.stride(), *tile_ok.stride(), *out.stride(),
            n, nt, hq, hq // hkv, scale / stride)
    block_d = min(triton.next_power_of_2(max(d, 16)), 64)  # 64: 139 KB of shared memory at 64 x 64 tiles, one stage, sm_90
    meta = dict(STRIDE=stride, TILES=tiles, HEAD_DIM=d, BLOCK_D=block_d,
                PRECISION=precision if q.dtype == torch.float32 else "ieee")
    if INTERPRET:
        block = max(16, tiles)
        _xattn_mass[(triton.cdiv(nt, block), batch * hq)](*args, **meta, BLOCK_A=block, BLOCK_C=block)
    else:
        _tuned[lambda m: (triton.cdiv(nt, m["BLOCK_A"]), batch * hq)](*args, **meta)
    return out


__all__ = ["tile_block_mass", "supported", "MAX_TILES"]
