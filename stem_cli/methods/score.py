"""Output-Aware block logits by pooling first: the block mean of a bilinear score is the
score of the block means.

Stride s, block Bk, T = Bk / s tiles per block, tile weights w (1 when the tile holds a
valid token). The reference computes every tile score

    S[a, c] = scale / s * sum_{t<s} q[a s + s-1-t] . k[c s + t] + bonus[c]

and averages it over the valid tile pairs of block pair (i, j):

    M[i, j] = sum_{a in i, c in j} w_a w_c S[a, c] / (W_i W_j),   W_i = sum_{a in i} w_a.

S is linear in q and in k, so the double sum factorises:

    M[i, j] = scale / s * sum_t Qbar[i, t] . Kbar[j, s-1-t] + Bbar[j]
    Qbar[i, t] = sum_{a in i} w_a q[a s + t] / W_i        (mean over the block's tiles, slot t)
    Kbar[j, t] = sum_{c in j} w_c k[c s + t] / W_j
    Bbar[j]    = sum_{c in j} w_c bonus[c] / W_j

That is one pass over q, k and v (the pooling) and a (P x s d) by (s d x P) GEMM per
head instead of the (N/s) x (N/s) tile GEMM: at 128K tokens and s = 8 the GEMM shrinks
by (Bk/s)^2 = 256 times. Equal to kernels/reference.py's tile-by-tile block_logits up to
float rounding (tested against it). GQA: the pooled keys of a KV head serve its query
heads by broadcasting.
"""

from __future__ import annotations

import torch

from stem_cli.methods.blocks import NEG_INF, pad_to


def value_bonus(v: torch.Tensor, stride: int, tile_valid: torch.Tensor, beta: float) -> torch.Tensor:
    """The value term per key tile: beta * ReLU(z) * w, (B, Hkv, N/s) float32, where
    u = the largest ||v_j||_2 of the tile's stride group, z = (log(u + 1e-6) - mean) / (std + 1e-6)
    with mean and std over the sequence's valid tiles (per batch and KV head), w = 1 on valid tiles."""
    b, hkv, n, d = v.shape
    norms = v.float().norm(dim=-1).view(b, hkv, n // stride, stride).amax(-1)
    logs = torch.log(norms + 1e-6)
    w = tile_valid[:, None].float()  # (B, 1, N/s)
    count = w.sum(-1, keepdim=True).clamp_min(1)
    mean = (logs * w).sum(-1, keepdim=True) / count
    std = (((logs - mean) ** 2 * w).sum(-1, keepdim=True) / count).sqrt()
    z = (logs - mean) / (std + 1e-6)
    return beta * torch.relu(z) * w


def _pooled(x: torch.Tensor, weights: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """(B, H, Npad, d) -> (B, H, P, s, d) float32: weighted sum over each block's tiles, per slot."""
    batch, heads, npad, d = x.shape
    p, tiles = npad // block_size, block_size // stride
    tiled = x.view(batch, heads, p, tiles, stride, d)
    if weights is None:
        return tiled.sum(3, dtype=torch.float32)  # accumulates in float32 without a float32 copy
    w = weights.view(batch, 1, p, tiles, 1, 1).to(x.dtype)
    return (tiled * w).sum(3, dtype=torch.float32)


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
    impl: str = "torch",
) -> torch.Tensor:
    """Same result as the reference's (kernels/reference.py) block_logits: (B, Hq, P, P) float32, -inf where not choosable.

    impl "torch": the pooled GEMM over all P x P block pairs (float32); "triton": the same pooling, then
    kernels/block_scores.py's causal-tiles-only GEMM with the value term and the mask fused (TF32x3 dots)."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    p = -(-n // block_size)
    npad = p * block_size
    tiles = block_size // stride

    valid = torch.zeros(batch, npad, dtype=torch.bool, device=q.device)
    valid[:, :n] = True if key_valid is None else key_valid.to(q.device)
    tile_valid = valid.view(batch, npad // stride, stride).any(-1)  # (B, N/s)
    weight = tile_valid.view(batch, p, tiles).sum(-1).float()  # W: valid tiles per block
    padded = key_valid is not None and not bool(tile_valid.all())
    w = tile_valid if padded else None

    q_bar = _pooled(pad_to(q, npad), w, block_size, stride)  # (B, Hq, P, s, d)
    k_bar = _pooled(pad_to(k, npad), w, block_size, stride).flip(3)  # slot t pairs with q slot s-1-t
    inv = torch.where(weight > 0, 1.0 / weight.clamp_min(1), 0.0)  # (B, P)
    q_bar = q_bar.reshape(batch, hkv, group, p, stride * d) * inv[:, None, None, :, None]
    k_bar = k_bar.reshape(batch, hkv, 1, p, stride * d) * inv[:, None, None, :, None]
    bonus_bar = None
    if beta > 0:
        bonus = value_bonus(pad_to(v, npad), stride, tile_valid, beta)  # (B, Hkv, N/s), 0 on invalid tiles
        bonus_bar = bonus.view(batch, hkv, p, tiles).sum(-1) * inv[:, None, :]  # (B, Hkv, P)
    if impl == "triton":
        from stem_cli.kernels.block_scores import block_scores

        return block_scores(q_bar.view(batch, hq, p, stride * d), k_bar.view(batch, hkv, p, stride * d), bonus_bar,
                            weight, scale / stride)
    if impl != "torch":
        raise ValueError(f"impl={impl!r}: use 'torch' or 'triton'")
    logits = torch.matmul(q_bar, k_bar.transpose(-1, -2)).view(batch, hq, p, p) * (scale / stride)
    if bonus_bar is not None:
        logits = logits + bonus_bar.repeat_interleave(group, dim=1)[:, :, None, :]

    ids = torch.arange(p, device=q.device)
    choosable = (ids[None, :] <= ids[:, None])[None, None] & (weight[:, None, None, :] > 0) & (weight[:, None, :, None] > 0)
    return logits.masked_fill(~choosable, NEG_INF)
