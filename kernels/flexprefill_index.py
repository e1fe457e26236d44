"""FlexPrefill's block index from its per-head choices (Triton): the query-aware or vertical-slash block set of
each head, the sink and the diagonal, straight into BlockIndex's sorted layout (no (P x P) mask, no sort).

Per batch b and query head h, block pair (i, j) with allowed(i, j) = j <= i, v_i and v_j (blocks holding a
valid token) and fb the first valid block:

    vs(i, j)   = col[j] or diag[i - j]                       (the kept column blocks and block diagonals)
    qa(i, j)   = key_ij > t or (key_ij == t and H + rho_ij x_t < T) or colmin[j] or diagmin[i - j]
    keep(i, j) = allowed and j >= fb and ((qa if the head is query-aware else vs) or j == fb or j == i)

key_ij: the float32 bits of the head's pooled block mass; t, x_t = float(t), H = H(t + 1) and T from
kernels/coverage_threshold.py over the head's P x P masses; rho_ij the rank of (i, j) among the head's entries
equal to t in row-major order (ties_before[i] plus the ties earlier in row i): the stable-sort rule. This is
methods/flexprefill.choose for granularity 'block' (torch: top_count of the coverage, the two vertical-slash
masks, torch.where, blocks.finish, BlockIndex.from_mask's sort). One program per (ROWS rows, batch x head); the
kept ids go out in increasing order, PAD (-1) after the row's count (width P).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from stem_cli.index import BlockIndex
from stem_cli.kernels.coverage_select import _row_tile
from stem_cli.kernels.tpd_select import prune_rows, row_configs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _flexprefill_index(
    Mass, QueryAware, Key, Above, Target, TiesBefore, Col, Diag, ColMin, DiagMin, Valid, First, Counts, Indices,
    smb, smh, smi, smj,
    stb, sti,
    svb, svj,
    scb, sch, sci,
    sib, sih, sii, sik,
    n_heads, p,
    BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
):
    bh, b, h, i, row_ok, ii, jj, fb, allowed = _row_tile(Valid, First, svb, svj, n_heads, p, BLOCK_P, ROWS)
    allowed = allowed & (jj >= fb)
    delta = tl.maximum(ii - jj, 0)
    head = bh * p  # the (B, H, P) keep vectors are contiguous
    qa = tl.load(QueryAware + bh) != 0
    if qa:
        t = tl.load(Key + bh)
        x_t = tl.where(t < 2147483648, t, 0).to(tl.int32).to(tl.float32, bitcast=True)
        x = tl.load(Mass + b * smb + h * smh + ii * smi + jj * smj, mask=allowed, other=0.0).to(tl.float32)
        x = tl.where(allowed & (x > 0), x, 0.0)
        key = tl.where(allowed, x.to(tl.int32, bitcast=True).to(tl.int64), -1)
        tied = key == t
        before = tl.load(TiesBefore + bh * stb + i * sti, mask=row_ok, other=0)
        rank = (before[:, None] + tl.cumsum(tied.to(tl.int64), 1) - 1).to(tl.float32)
        keep = (key > t) | (tied & (tl.load(Above + bh) + rank * x_t < tl.load(Target + bh)))
        keep = keep | (tl.load(ColMin + head + jj, mask=allowed, other=0) != 0)
        keep = keep | (tl.load(DiagMin + head + delta, mask=allowed, other=0) != 0)
    else:
        keep = tl.load(Col + head + jj, mask=allowed, other=0) != 0
        keep = keep | (tl.load(Diag + head + delta, mask=allowed, other=0) != 0)
    keep = allowed & (keep | (jj == fb) | (jj == ii))

    count = tl.sum(keep.to(tl.int32), 1)
    tl.store(Counts + b * scb + h * sch + i * sci, count, mask=row_ok)
    rows = Indices + b * sib + h * sih + ii * sii
    slot = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(rows + slot * sik, jj + tl.zeros([ROWS, BLOCK_P], tl.int32), mask=keep)
    pad = row_ok[:, None] & (jj >= count[:, None]) & (jj < p)
    tl.store(rows + jj * sik, tl.full([ROWS, BLOCK_P], -1, tl.int32), mask=pad)


# Keyed on the row length only (shapes, never the GPU's name).
_tuned = triton.autotune(configs=row_configs(), key=["BLOCK_P"], prune_configs_by={"early_config_prune": prune_rows})(
    _flexprefill_index)


def build(mass: torch.Tensor, query_aware: torch.Tensor, qa_threshold: dict, keeps: dict, block_valid: torch.Tensor,
          first_block: torch.Tensor, *, block_size: int, seq_len: int) -> BlockIndex:
    """mass (B, H, P, P) pooled block masses; query_aware (B, H) bool; qa_threshold: coverage_threshold.threshold_rows
    of the masses, rows (B H), segments of P; keeps: "col", "diag", "col_min", "diag_min" (B, H, P) bool;
    block_valid (B, P) bool; first_block (B,) -> BlockIndex (width: the largest count, one host read)."""
    batch, heads, p, _ = mass.shape
    device = mass.device
    vec = {name: keeps[name].to(device=device, dtype=torch.int8).contiguous() for name in ("col", "diag", "col_min", "diag_min")}
    valid = block_valid.to(device=device, dtype=torch.int8)
    first = first_block.to(device=device, dtype=torch.int32)
    qa = query_aware.to(device=device, dtype=torch.int8).reshape(-1).contiguous()
    ties = qa_threshold["ties_before"]
    counts = torch.empty(batch, heads, p, dtype=torch.int32, device=device)
    indices = torch.empty(batch, heads, p, p, dtype=torch.int32, device=device)
    args = (mass, qa, qa_threshold["key"], qa_threshold["above"], qa_threshold["target"], ties, vec["col"], vec["diag"],
            vec["col_min"], vec["diag_min"], valid, first, counts, indices, *mass.stride(), *ties.stride(),
            *valid.stride(), *counts.stride(), *indices.stride(), heads, p)
    meta = dict(BLOCK_P=triton.next_power_of_2(max(p, 16)))
    if INTERPRET:
        _flexprefill_index[(1, batch * heads)](*args, **meta, ROWS=triton.next_power_of_2(p))
    else:
        _tuned[lambda m: (triton.cdiv(p, m["ROWS"]), batch * heads)](*args, **meta)
    width = max(int(counts.max()) if counts.numel() else 0, 1)  # the one host read, after every launch is queued
    return BlockIndex(counts, indices[..., :width].contiguous(), block_size, seq_len)


__all__ = ["build"]
