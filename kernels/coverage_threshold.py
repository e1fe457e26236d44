"""Coverage threshold of long rows without a sort (Triton): per row, the fewest entries, largest first, whose
mass reaches a share of the row's total. FlexPrefill's coverage over a head's N column scores, its N diagonal
scores and its P x P pooled block masses (methods/blocks.coverage, no forced entries).

Row r holds x_e >= 0, e < M, allowed where A[r // group, e] != 0. With T = threshold * sum_{allowed} x_e the
kept entries are taken by decreasing x, each while the mass taken before it is < T. A float32 x >= 0 is ordered
as its bits (key_e, an integer; -1 where not allowed), so with H(u) = sum of x_e over key_e >= u:

    t = max{u : H(u) >= T}            the key of the last entry taken (H falls as u rises)
    kept: key_e > t, and the r-th (r = 0, 1, ..) entry with key_e == t, in increasing e, while H(t + 1) + r x_t < T

(a stable descending sort, as kernels/coverage_select.py). t is found 4 bits at a time from bit 31: level L
(shift 28 - 4L) evaluates H at the 16 candidates prefix + k 2^shift, k < 16, and the next level's prefix adds
the largest k with H >= T (H(prefix) >= T holds by the previous level; level 0's H(0) is the total). Each
level is one launch over (CHUNKS, R) programs, each summing its chunk for the 16 candidates into its own slot
of a partial buffer; the next launch reduces the slots in a fixed order (deterministic, no atomics). The final
launch (STAGE = 8) takes t and sums, per segment of SEG consecutive entries (one program each), the mass and
count above t and the count equal to t. Work: 8 passes of 16 compare-adds per entry; memory: 9 reads of x.
Sums run in float32 in the row's order, not the sorted order: a row whose cumulative mass lands within rounding
of T may take one entry more or fewer than a sort-and-cumsum.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LEVELS = 8  # 4 bits each: the 32 bits of a float32 key
CANDIDATES = 16


@triton.jit
def _keys(X, Allowed, r, e, m, group, sxr, sxm, sar, sam):
    ok = e < m
    ok = ok & (tl.load(Allowed + (r // group) * sar + e * sam, mask=ok, other=0) != 0)
    x = tl.load(X + r * sxr + e * sxm, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(ok & (x > 0), x, 0.0)  # -0.0 and anything not allowed hold no mass
    key = tl.where(ok, x.to(tl.int32, bitcast=True).to(tl.int64), -1)
    return x, key


@triton.jit
def _coverage_threshold(
    X, Allowed, Active, Part, Prefix, Target, Above, AboveCount, TieCount,
    sxr, sxm, sar, sam,
    m, group, n_rows, chunks, chunk, seg, n_seg, threshold,
    STAGE: tl.constexpr, TILE: tl.constexpr, CH_PAD: tl.constexpr,
):
    c = tl.program_id(0)
    r = tl.program_id(1)
    if tl.load(Active + r) != 0:
        kk = tl.arange(0, 16)
        if STAGE == 0:
            prefix = tl.zeros([1], tl.int64)
        else:
            cc = tl.arange(0, CH_PAD)
            prev = Part + ((STAGE - 1) * n_rows + r) * chunks * 16
            parts = tl.load(prev + cc[:, None] * 16 + kk[None, :], mask=cc[:, None] < chunks, other=0.0)
            h = tl.sum(parts, 0)  # H at the previous level's candidates, summed in a fixed order
            if STAGE == 1:
                target = threshold * tl.sum(tl.where(kk == 0, h, 0.0), 0)  # H(0): the row's total
                if c == 0:
                    tl.store(Target + r, target)
            else:
                target = tl.load(Target + r)
            best = tl.sum(((h >= target) & (kk > 0)).to(tl.int64), 0)
            old = tl.zeros([1], tl.int64)
            if STAGE > 1:
                old = tl.load(Prefix + (STAGE - 1) * n_rows + r + tl.zeros([1], tl.int32))
            prefix = old + (best << (28 - 4 * (STAGE - 1)))
        if c == 0:
            tl.store(Prefix + STAGE * n_rows + r + tl.zeros([1], tl.int32), prefix)
        if STAGE < 8:
            cand = prefix + (kk.to(tl.int64) << (28 - 4 * STAGE))  # (16,)
            acc = tl.zeros([16], tl.float32)
            start = c * chunk
            for e0 in range(start, tl.minimum(start + chunk, m), TILE):
                x, key = _keys(X, Allowed, r, e0 + tl.arange(0, TILE), m, group, sxr, sxm, sar, sam)
                acc += tl.sum(tl.where(key[:, None] >= cand[None, :], x[:, None], 0.0), 0)
            tl.store(Part + ((STAGE * n_rows + r) * chunks + c) * 16 + kk, acc)
        else:
            t = prefix  # (1,): the last key taken
            start = c * seg
            mass = tl.zeros([1], tl.float32)
            above = tl.zeros([1], tl.int32)
            tied = tl.zeros([1], tl.int32)
            for e0 in range(start, tl.minimum(start + seg, m), TILE):
                e = e0 + tl.arange(0, TILE)
                x, key = _keys(X, Allowed, r, e, m, group, sxr, sxm, sar, sam)
                inside = e < start + seg
                up = inside & (key > t)
                mass += tl.sum(tl.where(up, x, 0.0), 0)
                above += tl.sum(up.to(tl.int32), 0)
                tied += tl.sum((inside & (key == t)).to(tl.int32), 0)
            one = tl.zeros([1], tl.int32)
            tl.store(Above + r * n_seg + c + one, mass)
            tl.store(AboveCount + r * n_seg + c + one, above)
            tl.store(TieCount + r * n_seg + c + one, tied)


def threshold_rows(x: torch.Tensor, allowed: torch.Tensor, threshold: float, *, active: torch.Tensor | None = None,
                   segment: int | None = None) -> dict:
    """x (R, M) float >= 0; allowed (A, M) bool, row r reads allowed[r * A // R] (R a multiple of A); active (R,)
    bool (inactive rows are skipped: their results are undefined). Returns, per row: "key" t (R,) int64,
    "target" T, "above" H(t + 1) (R,) float32, "count" (R,) int64 the entries kept, and per segment of
    `segment` entries (default: the whole row) "ties_before" (R, S) int64, the entries equal to t in earlier
    segments (the rank offset of a stable order). No host read."""
    rows, m = x.shape
    a_rows = allowed.shape[0]
    if rows % a_rows:
        raise ValueError(f"{rows} rows do not split into {a_rows} allowed masks")
    device = x.device
    allowed = allowed.to(device=device, dtype=torch.int8)
    active = (torch.ones(rows, dtype=torch.int8, device=device) if active is None
              else active.to(device=device, dtype=torch.int8).contiguous())
    tile = 64 if INTERPRET else 512  # x 16 candidates: an 8K-element tile per program
    # About 8 programs per row per SM-sized wave: chunks of whole tiles.
    chunks = max(1, min(triton.cdiv(m, tile), 64 if INTERPRET else max(1, 2048 // rows)))
    chunk = triton.cdiv(triton.cdiv(m, chunks), tile) * tile
    chunks = triton.cdiv(m, chunk)
    seg = m if segment is None else segment
    n_seg = triton.cdiv(m, seg)
    part = torch.empty(LEVELS, rows, chunks, CANDIDATES, dtype=torch.float32, device=device)
    prefix = torch.zeros(LEVELS + 1, rows, dtype=torch.int64, device=device)
    target = torch.zeros(rows, dtype=torch.float32, device=device)
    above = torch.zeros(rows, n_seg, dtype=torch.float32, device=device)
    above_count = torch.zeros(rows, n_seg, dtype=torch.int32, device=device)
    tie_count = torch.zeros(rows, n_seg, dtype=torch.int32, device=device)
    common = (x, allowed, active, part, prefix, target, above, above_count, tie_count, *x.stride(), *allowed.stride(),
              m, rows // a_rows, rows, chunks, chunk, seg, n_seg, float(threshold))
    ch_pad = triton.next_power_of_2(chunks)
    warps = {} if INTERPRET else {"num_warps": 4}
    for stage in range(LEVELS):
        _coverage_threshold[(chunks, rows)](*common, STAGE=stage, TILE=tile, CH_PAD=ch_pad, **warps)
    seg_tile = tile if segment is None else max(16, min(triton.next_power_of_2(seg), 4096 if not INTERPRET else 1024))
    _coverage_threshold[(n_seg, rows)](*common, STAGE=LEVELS, TILE=seg_tile, CH_PAD=ch_pad, **warps)

    key = prefix[LEVELS]
    h_above = above.sum(-1)
    n_above = above_count.sum(-1, dtype=torch.int64)
    n_tied = tie_count.sum(-1, dtype=torch.int64)
    x_t = torch.where(key < 2**31, key, 0).to(torch.int32).view(torch.float32)
    # Ties taken: the r < n_tied with H(t + 1) + r x_t < T, found from the quotient and checked on both sides.
    ratio = torch.where(x_t > 0, (target - h_above) / torch.where(x_t > 0, x_t, 1.0), float(2**62))
    take = ratio.clamp(0, float(2**62)).ceil().clamp(max=2**62).to(torch.int64)
    take = torch.minimum(take, n_tied)
    take = take - ((take > 0) & (h_above + (take - 1).to(torch.float32) * x_t >= target)).to(torch.int64)
    take = take + ((take < n_tied) & (h_above + take.to(torch.float32) * x_t < target)).to(torch.int64)
    ties_before = torch.cumsum(tie_count, -1, dtype=torch.int64) - tie_count
    return {"key": key, "target": target, "above": h_above, "count": n_above + take, "ties_before": ties_before}


__all__ = ["threshold_rows", "LEVELS"]
