"""Cumulative-threshold (coverage) block selection with forced sinks and diagonal (Triton): one program per
(batch, head, ROWS query-block rows). XAttention's selector (methods/blocks.coverage on its block mass).

Row i of head h (batch b) sees masses x_j >= 0, j < P, the valid blocks v_j (valid[b, j]) and the first valid block
fb (first[b]). Allowed: j <= i, v_i and v_j. Forced: allowed and (fb <= j < fb + sink or j == i). With
T = tau * sum_{allowed} x_j and F = sum_{forced} x_j, the others (allowed, not forced) are taken by decreasing
mass, each while F + (the mass taken before it) < T: the fewest blocks, forced first, reaching tau of the row.

No sort: a float32 x >= 0 is ordered as its bits (an int32 key), so with H(u) = sum of the others' x over
key >= u, an other with key e is taken iff F + H(e + 1) < T. H falls as u rises, so the taken set is
{key >= t} with t = max{u : F + H(u) >= T}, found one bit at a time from bit 31 (32 steps of a masked row sum).
Ties at t are taken by increasing block id, the r-th (r = 0, 1, ...) while F + H(t + 1) + r x_t < T: what a
stable descending sort does (torch.sort leaves ties unordered, so the two agree on rows without exactly tied
masses at the boundary). Sums run in float32 in the row's order, not the sorted order: a row whose cumulative
mass lands within rounding of T may take one block more or fewer than a sort-and-cumsum.
The kept ids go out in increasing order at their prefix-count positions, PAD (-1) after the row's count: the
layout of BlockIndex (width P; the caller trims it to the largest count).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stem_cli.index import BlockIndex
from stem_cli.kernels.tpd_select import prune_rows, row_configs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _row_tile(Valid, First, svb, svj, n_heads, p, BLOCK_P: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS query blocks i against all key blocks j of its (batch, head): the causal block pairs
    whose both blocks hold a valid token (`allowed`), and the sequence's first valid block fb. Shared with
    kernels/flexprefill_index.py, which launches over the same (row tile, batch x head) grid."""
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = i < p
    j = tl.arange(0, BLOCK_P)
    ii, jj = i[:, None], j[None, :]
    vj = tl.load(Valid + b * svb + j * svj, mask=j < p, other=0) != 0
    vi = tl.load(Valid + b * svb + i * svj, mask=row_ok, other=0) != 0
    fb = tl.load(First + b)
    allowed = (jj <= ii) & vj[None, :] & vi[:, None] & row_ok[:, None] & (jj < p)
    return bh, b, h, i, row_ok, ii, jj, fb, allowed


@triton.jit
def _coverage_select(
    Mass, Valid, First, Counts, Indices,
    smb, smh, smi, smj,
    svb, svj,
    scb, sch, sci,
    sib, sih, sii, sik,
    n_heads, p, threshold, sink,
    BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
):
    bh, b, h, i, row_ok, ii, jj, fb, allowed = _row_tile(Valid, First, svb, svj, n_heads, p, BLOCK_P, ROWS)
    x = tl.load(Mass + b * smb + h * smh + ii * smi + jj * smj, mask=allowed, other=0.0).to(tl.float32)
    x = tl.where(allowed, x, 0.0)
    forced = allowed & (jj >= fb) & ((jj < fb + sink) | (jj == ii))
    other = allowed & ~forced

    target = threshold * tl.sum(x, 1)
    kept = tl.sum(tl.where(forced, x, 0.0), 1)
    key = tl.where(other, x.to(tl.int32, bitcast=True).to(tl.int64), -1)  # x >= 0: bits in float order

    t = tl.zeros([ROWS], dtype=tl.int64)
    for step in tl.static_range(32):
        cand = t + (1 << (31 - step))
        reach = kept + tl.sum(tl.where(key >= cand[:, None], x, 0.0), 1) >= target
        t = tl.where(reach, cand, t)
    above = key > t[:, None]
    tied = key == t[:, None]
    base = kept + tl.sum(tl.where(above, x, 0.0), 1)
    rank = (tl.cumsum(tied.to(tl.int32), 1) - 1).to(tl.float32)
    keep = forced | above | (tied & (base[:, None] + rank * x < target[:, None]))

    count = tl.sum(keep.to(tl.int32), 1)
    tl.store(Counts + b * scb + h * sch + i * sci, count, mask=row_ok)
    rows = Indices + b * sib + h * sih + ii * sii
    slot = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(rows + slot * sik, jj + tl.zeros([ROWS, BLOCK_P], tl.int32), mask=keep)
    pad = row_ok[:, None] & (jj >= count[:, None]) & (jj < p)
    tl.store(rows + jj * sik, tl.full([ROWS, BLOCK_P], -1, tl.int32), mask=pad)


# Keyed on the row length only (shapes, never the GPU's name).
_tuned = triton.autotune(configs=row_configs(), key=["BLOCK_P"], prune_configs_by={"early_config_prune": prune_rows})(_coverage_select)


def select(mass: torch.Tensor, block_valid: torch.Tensor, first_block: torch.Tensor, *, threshold: float,
           sink_blocks: int, block_size: int, seq_len: int, trim: bool = True) -> BlockIndex:
    """mass (B, H, P, P) >= 0, block_valid (B, P) bool, first_block (B,) int on mass's device -> BlockIndex.
    trim: cut the index to the largest row count (one device sync), as BlockIndex.from_mask does; else width P."""
    batch, heads, p, p2 = mass.shape
    if p != p2:
        raise ValueError(f"mass must be (B, H, P, P), got {tuple(mass.shape)}")
    device = mass.device
    valid = block_valid.to(device=device, dtype=torch.int8)
    first = first_block.to(device=device, dtype=torch.int32)
    counts = torch.empty(batch, heads, p, dtype=torch.int32, device=device)
    indices = torch.empty(batch, heads, p, p, dtype=torch.int32, device=device)
    args = (mass, valid, first, counts, indices, *mass.stride(), *valid.stride(), *counts.stride(), *indices.stride(),
            heads, p, float(threshold), sink_blocks)
    meta = dict(BLOCK_P=triton.next_power_of_2(max(p, 16)))
    if INTERPRET:
        _coverage_select[(1, batch * heads)](*args, **meta, ROWS=triton.next_power_of_2(p))
    else:
        _tuned[lambda m: (triton.cdiv(p, m["ROWS"]), batch * heads)](*args, **meta)
    if trim:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
        indices = indices[..., :width].contiguous()
    return BlockIndex(counts, indices, block_size, seq_len)


__all__ = ["select"]
