"""Column and diagonal sums of the last R queries' exact attention (Triton): MInference's vertical/slash scores
and FlexPrefill's last-block statistics, without the (R x N) attention in memory.

Per batch and query head (GQA: query head h reads KV head h // g), rows t < R at positions r_t = N - R + t:

    S[t, c] = scale * q[r_t] . k[c]          allowed: c <= r_t and key c valid (not left padding)
    A[t, c] = exp(S[t, c] - m_t) / l_t       m_t, l_t: max and sum of exponentials over the allowed c (0 if none)
    columns[c]   = sum_t A[t, c]
    diagonals[o] = sum_t A[t, r_t - o]       (offset o >= 0)

One program per (SPLIT consecutive key chunks of BLOCK_N keys, batch x query head). PASS 0 writes each program's
partial (m, l) per row, which the wrapper folds (m = max m_s, l = sum l_s exp(m_s - m)); PASS 1 recomputes each
chunk's scores, normalises them, stores the column sums (each key belongs to one program) and adds the diagonal
sums. Diagonals are pre-summed inside the chunk: the (R x BLOCK_N) probabilities go to the program's own scratch
slot (reused chunk after chunk, so the scratch is grid-sized, not N-sized) and are read back sheared, cell
(t, e) = A[t, t + BLOCK_N - 1 - e], so that column e holds one diagonal; the R + BLOCK_N - 1 sums then go out by
atomic adds (float32; the order of the adds is not fixed, so diagonals agree with a sequential sum to float32
rounding). Dots in the inputs' dtype (bf16: exact products), fp32 accumulation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 128  # R at most (MInference's 64, FlexPrefill's block of 128)


@triton.jit
def _scores(q_base, k_base, t, c, n, rows, sqn, sqd, skn, skd, KeyValid, skv, scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
    """S for rows t and keys c, -inf where not allowed: (BLOCK_R, BLOCK_N) float32."""
    pos = n - rows + t
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        qt = tl.load(q_base + pos[:, None] * sqn + dd[None, :] * sqd, mask=(t[:, None] < rows) & (dd[None, :] < HEAD_DIM),
                     other=0.0)
        kt = tl.load(k_base + c[None, :] * skn + dd[:, None] * skd, mask=(c[None, :] < n) & (dd[:, None] < HEAD_DIM),
                     other=0.0)
        acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
    ok = (t[:, None] < rows) & (c[None, :] <= pos[:, None]) & (c[None, :] < n)
    if HAS_VALID:
        ok = ok & (tl.load(KeyValid + c * skv, mask=c < n, other=0) != 0)[None, :]
    return tl.where(ok, acc * scale, float("-inf"))


@triton.jit
def _last_rows(
    Q, K, KeyValid, M, L, Columns, Diagonals, Scratch,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    skvb, skv,
    sms, smb, smh,
    scb, sch,
    n, rows, n_q_heads, group, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, SPLIT: tl.constexpr, PASS: tl.constexpr, HAS_VALID: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + (h // group) * skh
    valid_row = KeyValid + b * skvb
    t = tl.arange(0, BLOCK_R)
    first = pid_s * SPLIT * BLOCK_N
    stats = b * smb + h * smh + t
    if PASS == 0:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        for step in range(SPLIT):
            c = first + step * BLOCK_N + tl.arange(0, BLOCK_N)
            s = _scores(q_base, k_base, t, c, n, rows, sqn, sqd, skn, skd, valid_row, skv, scale,
                        HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_N, HAS_VALID, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
            l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
            m = m_new
        tl.store(M + pid_s * sms + stats, m, mask=t < rows)
        tl.store(L + pid_s * sms + stats, l, mask=t < rows)
    else:
        m = tl.load(M + stats, mask=t < rows, other=0.0)
        m = tl.where(m == float("-inf"), 0.0, m)
        l = tl.load(L + stats, mask=t < rows, other=0.0)
        inv_l = tl.where(l > 0, 1.0 / tl.maximum(l, 1e-30), 0.0)  # a row without an allowed key adds nothing
        slot = Scratch + (bh * tl.num_programs(0) + pid_s) * BLOCK_R * BLOCK_N
        u = tl.arange(0, BLOCK_N)
        e = tl.arange(0, BLOCK_E)
        for step in range(SPLIT):
            c0 = first + step * BLOCK_N
            c = c0 + u
            s = _scores(q_base, k_base, t, c, n, rows, sqn, sqd, skn, skd, valid_row, skv, scale,
                        HEAD_DIM, BLOCK_D, BLOCK_R, BLOCK_N, HAS_VALID, PRECISION)
            a = tl.exp(s - m[:, None]) * inv_l[:, None]
            tl.store(Columns + b * scb + h * sch + c, tl.sum(a, 0), mask=c < n)
            tl.debug_barrier()  # the previous chunk's sheared reads are done before the slot is overwritten
            tl.store(slot + t[:, None] * BLOCK_N + u[None, :], a)
            tl.debug_barrier()
            col = t[:, None] + BLOCK_N - 1 - e[None, :]  # sheared: column e is one diagonal
            inside = (col >= 0) & (col < BLOCK_N)
            # .cg: read through L2, never an L1 line left from the previous chunk's reads of the slot.
            diag = tl.sum(tl.load(slot + t[:, None] * BLOCK_N + col, mask=inside, other=0.0, cache_modifier=".cg"), 0)
            o = n - rows - c0 + e - (BLOCK_N - 1)  # cell (t, t + BLOCK_N - 1 - e) has offset r_t - c = o
            # Chunks past the end hold zeros: adding them is harmless.
            tl.atomic_add(Diagonals + b * scb + h * sch + o, diag, mask=(o >= 0) & (o < n) & (e < BLOCK_R + BLOCK_N - 1),
                          sem="relaxed")


def supported(rows: int) -> bool:
    return 1 <= rows <= MAX_ROWS


def last_rows_sums(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, key_valid: torch.Tensor | None,
                   precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, N, d), k (B, Hkv, N, d), key_valid (B, N) bool or None -> (columns, diagonals), (B, Hq, N) float32
    (module docstring). `precision` applies to float32 inputs only ("ieee" or "tf32x3")."""
    if not supported(rows):
        raise ValueError(f"rows={rows}: the fused last-rows estimate takes 1 to {MAX_ROWS} rows")
    if q.dtype == torch.float64:  # the kernel computes in float32
        q, k = q.float(), k.float()
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    device = q.device
    block_r = max(16, triton.next_power_of_2(rows))
    block_n = 16 if INTERPRET else 64
    split = 2 if INTERPRET else 32  # key chunks per program
    splits = triton.cdiv(n, block_n * split)
    block_e = triton.next_power_of_2(block_r + block_n - 1)
    has_valid = key_valid is not None
    valid = key_valid.to(device=device, dtype=torch.int8) if has_valid else torch.ones(1, 1, dtype=torch.int8, device=device)
    m_part = torch.empty(splits, batch, hq, rows, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    columns = torch.empty(batch, hq, n, dtype=torch.float32, device=device)
    diagonals = torch.zeros(batch, hq, n, dtype=torch.float32, device=device)
    scratch = torch.empty(batch * hq * splits * block_r * block_n, dtype=torch.float32, device=device)
    grid = (splits, batch * hq)
    meta = dict(HEAD_DIM=d, BLOCK_D=min(triton.next_power_of_2(max(d, 16)), 128), BLOCK_R=block_r, BLOCK_N=block_n,
                BLOCK_E=block_e, SPLIT=split, HAS_VALID=has_valid,
                PRECISION=precision if q.dtype == torch.float32 else "ieee")
    common = (*q.stride(), *k.stride(), valid.stride(0) if has_valid else 0, valid.stride(1) if has_valid else 0)
    tail = (*columns.stride()[:2], n, rows, hq, hq // hkv, scale)
    if not INTERPRET:
        meta["num_warps"] = 8 if block_r > 64 else 4  # the sheared (R x R + BLOCK_N) read in registers
    _last_rows[grid](q, k, valid, m_part, l_part, columns, diagonals, scratch, *common, *m_part.stride()[:3], *tail,
                     **meta, PASS=0)
    m = m_part.amax(0)
    m_ref = torch.where(torch.isfinite(m), m, 0.0)
    l = (l_part * torch.exp(m_part - m_ref)).sum(0)
    _last_rows[grid](q, k, valid, m, l, columns, diagonals, scratch, *common, 0, *m.stride()[:2], *tail, **meta, PASS=1)
    return columns, diagonals


__all__ = ["last_rows_sums", "supported", "MAX_ROWS"]
