"""Per-block e4m3 quantisation (Triton): the operands of kernels/block_sparse_attn_fp8.py.

For x (B, H, N, d) and block t of Bk rows of each (batch, head), optionally centred first
(`mean`: x <- x - mu with mu the (batch, head)'s channel means over the N tokens, channel_means;
the attention kernel uses it to smooth K and V):

    s_t = amax_{rows of t, all d} |x| / 448        (448 = e4m3's largest finite value;
                                                    s_t = 1 for an all-zero block)
    x8  = rne_e4m3(x / s_t),   x ~= s_t x8,   |x - s_t x8| <= 2^-4 |x|  (3 mantissa bits)
                                                    for |x| / s_t >= 2^-6 (e4m3's smallest normal),
                                                    <= 2^-10 s_t below it (subnormal spacing 2^-9)

One program per (block, batch x head): the block's amax (of the centred rows), then one write of x8
(rows past N written as zeros up to the padded length P Bk) and of s_t. Written in
the layout the attention kernel's dots read: (B, H, P Bk, d) row-major, or with
`transpose` a (B, H, d, P Bk) row-major tensor (keys contiguous, the P.V dot's operand),
returned as its (B, H, P Bk, d) view.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def to_e4m3(x, PRE_ROUND: tl.constexpr):
    """fp32 -> e4m3, nearest even. PRE_ROUND (the interpreter only): first round x to 3 mantissa bits by
    integer ops so the cast is exact: the interpreter's own fp32 -> e4m3 rounding drops the exponent
    carry (triton 3.9 turns 7.9 into 4.0, not 8.0); the GPU's conversion instruction is correct."""
    if PRE_ROUND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep sign, exponent, 3 mantissa bits
        # Below e4m3's smallest normal 2^-6 the grid is 2^-9: x 2^9 to the nearest even integer (+- 1.5 2^23).
        subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        x = tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_blocks(
    X, X8, S, Mean,
    sxb, sxh, sxn, sxd,
    s8b, s8h, s8n, s8d,
    n_ctx, n_heads, n_blocks, head_dim,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, PRE_ROUND: tl.constexpr, CENTER: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    x_base = X + b * sxb + h * sxh
    if CENTER:  # this (batch, head)'s channel means, subtracted from every row inside N (padding rows stay 0)
        mean = tl.load(Mean + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    # Two passes over the block, CHUNK rows at a time (a 1024 x 256 block does not fit in registers):
    # its amax, then the scaled values (the second read comes from L2).
    amax = 0.0
    for r in range(0, BLOCK, CHUNK):
        offs_n = t * BLOCK + r + tl.arange(0, CHUNK)
        x = tl.load(x_base + offs_n[:, None] * sxn + offs_d[None, :] * sxd,
                    mask=(offs_n[:, None] < n_ctx) & d_ok[None, :], other=0.0).to(tl.float32)
        if CENTER:
            x = tl.where(offs_n[:, None] < n_ctx, x - mean[None, :], 0.0)
        amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), 1), 0))
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    for r in range(0, BLOCK, CHUNK):
        offs_n = t * BLOCK + r + tl.arange(0, CHUNK)
        x = tl.load(x_base + offs_n[:, None] * sxn + offs_d[None, :] * sxd,
                    mask=(offs_n[:, None] < n_ctx) & d_ok[None, :], other=0.0).to(tl.float32)
        if CENTER:
            x = tl.where(offs_n[:, None] < n_ctx, x - mean[None, :], 0.0)
        tl.store(X8 + b * s8b + h * s8h + offs_n[:, None] * s8n + offs_d[None, :] * s8d, to_e4m3(x / scale, PRE_ROUND),
                 mask=d_ok[None, :])
    tl.store(S + pid_bh * n_blocks + t, scale)


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, d) -> (B, H, d) float32: the mean of each channel over the N tokens (one read of x)."""
    return torch.mean(x, dim=2, dtype=torch.float32).contiguous()


def quantize_blocks(x: torch.Tensor, block: int, *, transpose: bool = False,
                    mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, N, d) -> (x8, scales): e4m3 values (B, H, ceil(N / block) block, d), the padding rows zeros,
    and float32 scales (B, H, ceil(N / block)), x ~= scale * x8 (see the module docstring); with `mean`
    (B, H, d) float32 (channel_means), the rows centred first: x - mean ~= scale * x8."""
    batch, heads, n, d = x.shape
    p = math.ceil(n / block)
    if transpose:
        x8 = torch.empty(batch, heads, d, p * block, dtype=torch.float8_e4m3fn, device=x.device).transpose(-1, -2)
    else:
        x8 = torch.empty(batch, heads, p * block, d, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(batch, heads, p, dtype=torch.float32, device=x.device)
    if mean is not None and (mean.shape != (batch, heads, d) or mean.dtype != torch.float32 or not mean.is_contiguous()):
        raise ValueError(f"mean must be a contiguous float32 ({batch}, {heads}, {d}) tensor, got {mean.dtype} {tuple(mean.shape)}")
    head_dim = triton.next_power_of_2(d)
    _quantize_blocks[(p, batch * heads)](
        x, x8, scales, scales if mean is None else mean, *x.stride(), *x8.stride(), n, heads, p, d,
        BLOCK=block, CHUNK=min(block, max(16, 8192 // head_dim)), HEAD_DIM=head_dim, PRE_ROUND=INTERPRET,
        CENTER=mean is not None, num_warps=4,
    )
    return x8, scales
