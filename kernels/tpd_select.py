"""TPD top-k selection with the forced blocks (Triton): one program per (batch, head, ROWS query-block rows).

Row i of head h (batch b) sees the block logits x_j, j < P, its budget k(i) (budget[b, i])
and the first valid block fb (first[b]). A block is choosable when x_j > -inf and j <= i;
it is forced when choosable and fb <= j and (j < fb + sink or j > i - window or j == i).

    rule "code"   (released code): keep = top_k(x over choosable) | forced,  k = min(k(i), #choosable)
    rule "inside" (forced first) : keep = top_k(x', over choosable),        k = min(max(k(i), #forced), #choosable)
                                   with x'_j = +inf for forced j (they rank first, inside the budget)

top_k without sorting: the k-th largest value t is found by a radix (bit-by-bit) search
over order-preserving integer keys, t = max{ u : #{j : key_j >= u} >= k }, one bit per step
from the most significant (33 steps: 32 bits of a float32 plus the "forced" rank above
every float). Then top_k = {key > t} plus the first k - #{key > t} of {key == t} by block id.
The kept ids are written in increasing order at their prefix-count positions, PAD (-1)
after the row's count up to `width` columns: exactly BlockIndex's layout.

Key of a float32 with bits w (as int32): w when w >= 0, w ^ 0x7FFFFFFF when w < 0 (negative
floats reversed), plus 2^31 so every key lies in [0, 2^32); not choosable: -1.

Ties: at the k-th value the lower block ids are kept, as the reference's stable sort
(kernels/reference.py select_topk) keeps them; torch.topk (methods/blocks.select_topk)
leaves the order of ties unspecified, so the two are equal whenever the logits of a row are
distinct. No host synchronisation: budgets, first blocks
and the output width come in as device tensors and host integers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stem_cli.index import PAD, BlockIndex

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RULES = ("code", "inside")


@triton.jit
def _tpd_select(
    Logits, Budget, First, Counts, Indices,
    slb, slh, sli, slj,
    sbb, sbi,
    scb, sch, sci,
    sib, sih, sii, sik,
    n_heads, p, width, sink, window,
    BLOCK_P: tl.constexpr, ROWS: tl.constexpr, INSIDE: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # this program's rows
    row_ok = i < p
    j = tl.arange(0, BLOCK_P)
    ii, jj = i[:, None], j[None, :]
    x = tl.load(Logits + b * slb + h * slh + ii * sli + jj * slj, mask=row_ok[:, None] & (jj < p), other=float("-inf"))
    x = tl.where(x == 0.0, 0.0, x.to(tl.float32))  # -0.0 and +0.0 are one value (one key), as for a sort
    fb = tl.load(First + b)
    budget = tl.load(Budget + b * sbb + i * sbi, mask=row_ok, other=0).to(tl.int32)

    ok = (x > float("-inf")) & (jj <= ii) & (jj < p)
    forced = ok & (jj >= fb) & ((jj < fb + sink) | (jj > ii - window) | (jj == ii))
    n_ok = tl.sum(ok.to(tl.int32), 1)

    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    if INSIDE:
        n_forced = tl.sum(forced.to(tl.int32), 1)
        key = tl.where(forced, 4294967296, key)
        k = tl.minimum(tl.maximum(budget, n_forced), n_ok)
    else:
        k = tl.minimum(budget, n_ok)
    key = tl.where(ok, key, -1)

    # t = the k-th largest key of each row, one bit at a time from bit 32 down.
    t = tl.zeros([ROWS], dtype=tl.int64)
    for step in tl.static_range(33):
        cand = t + (1 << (32 - step))
        enough = tl.sum((key >= cand[:, None]).to(tl.int32), 1) >= k
        t = tl.where(enough, cand, t)
    above = key > t[:, None]
    tied = key == t[:, None]
    need = k - tl.sum(above.to(tl.int32), 1)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= need[:, None]))
    if INSIDE:
        keep = chosen
    else:
        keep = chosen | forced

    count = tl.sum(keep.to(tl.int32), 1)
    tl.store(Counts + b * scb + h * sch + i * sci, count, mask=row_ok)
    rows = Indices + b * sib + h * sih + ii * sii
    slot = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(rows + slot * sik, jj + tl.zeros([ROWS, BLOCK_P], tl.int32), mask=keep & (slot < width))
    pad = row_ok[:, None] & (jj >= count[:, None]) & (jj < width)
    tl.store(rows + jj * sik, tl.full([ROWS, BLOCK_P], -1, tl.int32), mask=pad)


def row_configs():
    """Rows per program and warps: the search space of the row-per-program selection kernels (also coverage_select)."""
    return [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (2, 4, 8)]


def prune_rows(configs, named_args, **kwargs):
    """At most 8192 keys in flight per program (a (ROWS, BLOCK_P) int64 tile lives in registers)."""
    kept = [c for c in configs if c.kwargs["ROWS"] * kwargs["BLOCK_P"] <= 8192]
    return kept or [triton.Config({"ROWS": 1}, num_warps=8)]


# Keyed on the row length and the rule only (shapes, never the GPU's name).
_tuned = triton.autotune(configs=row_configs(), key=["BLOCK_P", "INSIDE"], prune_configs_by={"early_config_prune": prune_rows})(_tpd_select)


def select(
    logits: torch.Tensor,
    budget: torch.Tensor,
    first_block: torch.Tensor,
    *,
    sink_blocks: int,
    window_blocks: int,
    width: int,
    block_size: int,
    seq_len: int,
    rule: str = "code",
) -> BlockIndex:
    """logits (B, H, P, P) float (-inf = not choosable; j > i is never chosen whatever it holds),
    budget (B, P) int and first_block (B,) int on the logits' device -> BlockIndex with
    `width` = min(width, P) index columns (an upper bound on any row's count, known on the host)."""
    if rule not in RULES:
        raise ValueError(f"unknown forced-block rule {rule!r}; rules: {', '.join(RULES)}")
    batch, heads, p, p2 = logits.shape
    if p != p2:
        raise ValueError(f"logits must be (B, H, P, P), got {tuple(logits.shape)}")
    width = max(1, min(int(width), p))
    device = logits.device
    budget = budget.to(device=device)
    first_block = first_block.to(device=device, dtype=torch.int32)
    counts = torch.empty(batch, heads, p, dtype=torch.int32, device=device)
    indices = torch.empty(batch, heads, p, width, dtype=torch.int32, device=device)
    args = (
        logits, budget, first_block, counts, indices,
        *logits.stride(), *budget.stride(), *counts.stride(), *indices.stride(),
        heads, p, width, sink_blocks, window_blocks,
    )
    meta = dict(BLOCK_P=triton.next_power_of_2(max(p, 16)), INSIDE=rule == "inside")
    if INTERPRET:
        # The interpreter runs numpy on the CPU: many rows per program, no autotuning.
        rows = triton.next_power_of_2(p)
        _tpd_select[(1, batch * heads)](*args, **meta, ROWS=rows)
    else:
        _tuned[lambda m: (triton.cdiv(p, m["ROWS"]), batch * heads)](*args, **meta)
    return BlockIndex(counts, indices, block_size, seq_len)


__all__ = ["select", "RULES", "PAD"]
