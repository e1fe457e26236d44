"""Sparse decode attention in plain PyTorch: the oracle the Triton decode kernel is checked against.

Shapes: one query per sequence and query head, q (B, Hq, d); the KV cache
k, v (B, Hkv, T, d); GQA group g = Hq / Hkv, query head h reads KV head h // g.
A selection is given per (sequence, KV head) and serves the whole group:

    indices (B, Hkv, K) int, counts (B, Hkv) int (optional; default K).
    Entry i of a row is used when i < count and 0 <= index < T; other entries
    (padding, -1) are skipped. Used indices must be distinct.

For query head h of sequence b with used set S:

    o = sum_{j in S} softmax_S(scale * q . k_j) v_j,     lse_S = log sum_{j in S} exp(scale * q . k_j)

(truncate-and-renormalise). Rows with an empty S give zeros and lse = -inf.

Dropped mass: with the full softmax p_j over the valid cached positions V,

    delta = sum_{j in V \\ S} p_j = 1 - exp(lse_S - lse_V)

which is also the total-variation distance between the renormalised sparse
distribution and p (the sparse one moves mass only onto S, by exactly delta).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def used_entries(indices: torch.Tensor, counts: torch.Tensor | None, n_keys: int) -> torch.Tensor:
    """(B, Hkv, K) bool: entries of the index rows that name a key."""
    used = (indices >= 0) & (indices < n_keys)
    if counts is not None:
        used &= torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].to(indices.device)
    return used


def group_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, Hq, d) or (B, Hq, 1, d) -> (B, Hkv, g, d)."""
    if q.dim() == 4:
        q = q[:, :, 0]
    b, hq, d = q.shape
    return q.reshape(b, n_kv, hq // n_kv, d)


def gather_rows(x: torch.Tensor, indices: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, T, d) at indices (B, Hkv, K) -> (B, Hkv, K, d); unused entries read position 0."""
    safe = torch.where(used, indices, torch.zeros_like(indices)).long()
    return x.gather(2, safe[..., None].expand(*safe.shape, x.shape[-1]))


def selected_logits(q, k, indices, counts=None, *, scale: float) -> torch.Tensor:
    """(B, Hkv, g, K) scale * q.k at the used entries, -inf elsewhere (float32 or wider)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = group_queries(q, k.shape[1]).to(dtype)
    used = used_entries(indices, counts, k.shape[2])
    ks = gather_rows(k, indices, used).to(dtype)
    s = torch.einsum("bhgd,bhkd->bhgk", qg, ks) * scale
    return s.masked_fill(~used[:, :, None, :], NEG_INF)


def sparse_decode_attention(q, k, v, indices, counts=None, *, scale: float | None = None, return_lse: bool = False):
    """q (B, Hq, d) or (B, Hq, 1, d) -> output of q's shape (float32 or wider); see the module docstring."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, _hkv = k.shape[:2]
    s = selected_logits(q, k, indices, counts, scale=scale)
    used = used_entries(indices, counts, k.shape[2])
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, g), -inf for an empty row
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = p.masked_fill(~used[:, :, None, :], 0.0)
    vs = gather_rows(v, indices, used).to(p.dtype)
    out = torch.einsum("bhgk,bhkd->bhgd", p, vs)
    out = out.reshape(b, -1, out.shape[-1])
    if q.dim() == 4:
        out = out[:, :, None]
    lse = lse.reshape(b, -1)
    return (out, lse) if return_lse else out


def full_logits(q, k, key_valid: torch.Tensor | None = None, *, scale: float) -> torch.Tensor:
    """(B, Hkv, g, T) scale * q.k over the whole cache, -inf at invalid (padded) positions."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = group_queries(q, k.shape[1]).to(dtype)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k.to(dtype)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, :].to(s.device), NEG_INF)
    return s


def dense_decode_attention(q, k, v, key_valid=None, *, scale: float | None = None):
    """Full attention of one query over the valid cache (the dense oracle), q's shape, float32 or wider."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, hkv, t, _ = k.shape
    indices = torch.arange(t, device=k.device).expand(b, hkv, t)
    if key_valid is not None:
        indices = torch.where(key_valid[:, None, :].to(k.device), indices, torch.full_like(indices, -1))
    return sparse_decode_attention(q, k, v, indices, scale=scale)


def selection_mask(indices, counts, n_keys: int) -> torch.Tensor:
    """(B, Hkv, T) bool: the positions a selection uses."""
    used = used_entries(indices, counts, n_keys)
    mask = torch.zeros(*indices.shape[:2], n_keys + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(2, torch.where(used, indices, torch.full_like(indices, n_keys)).long(), True)
    return mask[..., :n_keys]


def dropped_mass(q, k, indices, counts=None, key_valid=None, *, scale: float, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hq) exact delta: the full softmax mass (over valid positions) of what the selection drops.

    `logits` (B, Hkv, g, T), when the caller already has full_logits, saves the scoring pass."""
    s = full_logits(q, k, key_valid, scale=scale) if logits is None else logits
    keep = selection_mask(indices, counts, k.shape[2])[:, :, None, :]
    lse_all = torch.logsumexp(s, dim=-1)
    lse_kept = torch.logsumexp(s.masked_fill(~keep, NEG_INF), dim=-1)
    delta = -torch.expm1(lse_kept - lse_all)  # 1 - exp(.), exact near 0
    delta = torch.where(torch.isfinite(lse_all), delta, torch.zeros_like(delta)).clamp(0.0, 1.0)
    return delta.reshape(delta.shape[0], -1)


def total_variation(q, k, indices, counts=None, key_valid=None, *, scale: float) -> torch.Tensor:
    """(B, Hq) 0.5 * sum_j |p_sparse(j) - p(j)| from the two distributions written out (for tests)."""
    s = full_logits(q, k, key_valid, scale=scale)
    keep = selection_mask(indices, counts, k.shape[2])[:, :, None, :]
    p = torch.softmax(s, dim=-1)
    sparse = torch.softmax(s.masked_fill(~keep, NEG_INF), dim=-1)
    tv = 0.5 * (sparse - p).abs().sum(-1)
    return tv.reshape(tv.shape[0], -1)
