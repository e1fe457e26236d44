"""Reference Stem in plain PyTorch: the oracle the kernels, the executor and the selection
helpers (methods/blocks.py, methods/score.py) are checked against.

Short and slow on purpose (selection one row at a time); runs on CPU and GPU. Only tests
and benchmarks import it: production code has its own fast versions, so the oracle
stays independent of what it checks.

Shapes: q (B, Hq, N, d), k and v (B, Hkv, N, d), GQA group g = Hq / Hkv, query head h
reads KV head h // g. Block size Bk, P = ceil(N / Bk) blocks, stride s.

1. Antidiagonal scores. Tile (a, b) of size s x s gets
       S[a, b] = scale / s * sum_{t<s} q[a s + s-1-t] . k[b s + t]
   i.e. the mean of the tile's antidiagonal of q.k^T * scale. With q and k
   regrouped as (N/s, s d) matrices this is one GEMM per head.
2. Value term (Output-Aware Metric). u[b] = max over the stride group of ||v_j||_2,
   then log(u + 1e-6), z-normalised over the valid tiles of the sequence (per batch
   and KV head), ReLU, times beta; added to every S[., b].
3. Block logits. M[i, j] = mean of S[a, b] + value term over the valid tiles of
   block pair (i, j); -inf above the diagonal and for blocks with no valid key.
4. TPD budget. k(i) per query block: k_start for the first k_start rows, then
   floor(linspace(k_start, mu k_start)) clamped to [1, k_start]; uniform: one
   budget max(1, floor(k_start (1 + mu) / 2)). With left padding the schedule runs
   over each sequence's own blocks, from its first valid block.
5. Selection (rule "code", the released code's): the k(i) best blocks by logit, then
   the forced blocks (sinks, local window, diagonal) added on top, so a row keeps
   between k(i) and k(i) + |forced| blocks; rule "inside": forced blocks rank first and
   the row keeps max(k(i), forced). Never more than its causal valid blocks.
6. Block-sparse attention. Exact softmax over the selected blocks' causal, valid
   keys; rows with no valid key give zeros.
"""

from __future__ import annotations

import math

import torch

from stem_cli.index import BlockIndex

NEG_INF = float("-inf")


def _pad_to(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def value_bonus(v: torch.Tensor, stride: int, tile_valid: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * ReLU(z-normalised log of the stride-max value norm): (B, Hkv, N/s) float32, 0 on invalid tiles."""
    batch, hkv, n, _ = v.shape
    bonus = torch.zeros(batch, hkv, n // stride, dtype=torch.float32, device=v.device)
    for b in range(batch):
        ok = tile_valid[b]
        if not bool(ok.any()):
            continue
        for h in range(hkv):
            logs = torch.log(v[b, h].float().norm(dim=-1).view(-1, stride).amax(-1) + 1e-6)
            mean, std = logs[ok].mean(), logs[ok].std(correction=0)
            bonus[b, h, ok] = beta * torch.relu((logs[ok] - mean) / (std + 1e-6))
    return bonus


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
    chunk_blocks: int | None = None,
) -> torch.Tensor:
    """Output-Aware block logits (B, Hq, P, P) float32; -inf where a block may not be chosen.

    Chunked over query blocks so nothing of size (N/s)^2 per head is alive at once.
    """
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    p = -(-n // block_size)
    npad = p * block_size
    tiles_per_block = block_size // stride
    nt = npad // stride

    valid = torch.zeros(batch, npad, dtype=torch.bool, device=q.device)
    valid[:, :n] = True if key_valid is None else key_valid.to(q.device)
    tile_valid = valid.view(batch, nt, stride).any(-1)  # (B, N/s)
    wt = tile_valid.float()

    # Regroup: query tile a holds q[a s + s-1-t] at slot t, key tile b holds k[b s + t].
    qr = _pad_to(q, npad).float().reshape(batch, hq, nt, stride, d).flip(3).reshape(batch, hq, nt, stride * d)
    kr = _pad_to(k, npad).float().reshape(batch, hkv, nt, stride * d)
    bonus = value_bonus(_pad_to(v, npad), stride, tile_valid, beta) if beta > 0 else None

    # Weighted block mean: sum of valid tiles' scores / number of valid tile pairs.
    wk_block = wt.view(batch, p, tiles_per_block).sum(-1)  # (B, P)
    wq_block = wk_block
    out = torch.full((batch, hq, p, p), NEG_INF, dtype=torch.float32, device=q.device)
    if chunk_blocks is None:
        # Keep the live (chunk tiles x all tiles) score slab around 256 MiB.
        per_block = batch * hq * tiles_per_block * nt * 4
        chunk_blocks = max(1, min(p, (256 << 20) // max(per_block, 1)))
    for i0 in range(0, p, chunk_blocks):
        i1 = min(p, i0 + chunk_blocks)
        keys = i1 * tiles_per_block  # causal: no key tile past the chunk's last block
        qa = qr[:, :, i0 * tiles_per_block : i1 * tiles_per_block].view(batch, hkv, group, -1, stride * d)
        s = torch.matmul(qa, kr[:, :, None, :keys].transpose(-1, -2)) * (scale / stride)
        if bonus is not None:
            s = s + bonus[:, :, None, None, :keys]
        s = s.view(batch, hq, -1, keys)
        s = s * wt[:, None, i0 * tiles_per_block : i1 * tiles_per_block, None] * wt[:, None, None, :keys]
        sums = s.view(batch, hq, i1 - i0, tiles_per_block, i1, tiles_per_block).sum((3, 5))
        denom = wq_block[:, None, i0:i1, None] * wk_block[:, None, None, :i1]
        out[:, :, i0:i1, :i1] = torch.where(denom > 0, sums / denom.clamp_min(1), NEG_INF)
    causal = torch.ones(p, p, dtype=torch.bool, device=q.device).tril()
    return out.masked_fill(~causal, NEG_INF)


def first_valid_block(key_valid: torch.Tensor | None, batch: int, block_size: int, device) -> torch.Tensor:
    """(B,) block of each sequence's first valid token (N // block_size when it has none)."""
    firsts = []
    for b in range(batch):
        if key_valid is None:
            first_token = 0
        else:
            positions = key_valid[b].nonzero().flatten().tolist()
            first_token = positions[0] if positions else key_valid.shape[-1]
        firsts.append(first_token // block_size)
    return torch.tensor(firsts, dtype=torch.long, device=device)


def forced_blocks(num_blocks: int, first_block: torch.Tensor, sink_blocks: int, window_blocks: int) -> torch.Tensor:
    """(B, P, P) bool: row i forces the sequence's first `sink_blocks` blocks (from its first
    valid block fb), the blocks j > i - window_blocks and the diagonal, all with fb <= j <= i."""
    p = num_blocks
    rows = []
    for fb in first_block.tolist():
        rows.append([[fb <= j <= i and (j < fb + sink_blocks or j > i - window_blocks or j == i) for j in range(p)] for i in range(p)])
    return torch.tensor(rows, dtype=torch.bool, device=first_block.device).view(-1, p, p)


def k_start_for(num_blocks: int, seq_len: int, schedule: str, k_scale: float = 1.0, k_start: int = 0) -> int:
    """Initial per-row budget in blocks: k_start when given, else the schedule's rule
    ("code": P below 56 blocks, floor(0.2 P + 30) below 160, floor(0.1 P) + 30 above;
    "paper": floor(0.2 P) up to 16K tokens, floor(0.1 P) above); times k_scale, in [1, P]."""
    p = num_blocks
    if k_start > 0:
        base = k_start
    elif schedule == "code":
        base = p if p < 56 else math.floor(0.2 * p + 30) if p < 160 else math.floor(0.1 * p) + 30
    elif schedule == "paper":
        base = math.floor((0.2 if seq_len <= 16384 else 0.1) * p)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return int(min(p, max(1, round(base * k_scale))))


def tpd_budget(num_blocks: int, k_start: int, mu: float, tpd: bool = True) -> torch.Tensor:
    """(P,) int64 blocks per row: k_start for rows 0 .. k_start-1, then
    floor(linspace(k_start, mu k_start)) over the remaining rows, clamped to [1, k_start];
    uniform (tpd False): max(1, floor(k_start (1 + mu) / 2)) for every row."""
    p = num_blocks
    if not tpd:
        return torch.tensor([max(1, math.floor(k_start * (1 + mu) / 2))] * p, dtype=torch.long)
    decay = torch.linspace(k_start, mu * k_start, max(p - k_start, 0), dtype=torch.float64).tolist()
    budget = [k_start if i < k_start else min(k_start, max(1, math.floor(decay[i - k_start]))) for i in range(p)]
    return torch.tensor(budget, dtype=torch.long)


def row_budgets(
    num_blocks: int,
    lengths: torch.Tensor,
    first_block: torch.Tensor,
    *,
    schedule: str,
    mu: float,
    tpd: bool,
    k_scale: float = 1.0,
    k_start: int = 0,
) -> torch.Tensor:
    """(B, P): 0 on the rows before the sequence's first valid block fb; from fb on, the
    schedule run over the sequence's own P - fb blocks with its valid length `lengths[b]`."""
    rows = []
    for fb, length in zip(first_block.tolist(), lengths.tolist()):
        own = num_blocks - fb
        k0 = k_start_for(own, int(length), schedule, k_scale, k_start) if own > 0 else 0
        rows.append([0] * fb + (tpd_budget(own, k0, mu, tpd).tolist() if own > 0 else []))
    return torch.tensor(rows, dtype=torch.long, device=first_block.device).view(-1, num_blocks)


def select_topk(logits: torch.Tensor, budget: torch.Tensor, forced: torch.Tensor, *, block_size: int, seq_len: int,
                rule: str = "code") -> BlockIndex:
    """One row at a time, among the choosable blocks (finite logit):
    rule "code": the budget(i) best by logit, then every forced one added (released code);
    rule "inside": the forced ones, then the others by decreasing logit, min(max(budget, forced),
    choosable) of them in all.

    logits (B, H, P, P), -inf where a block may not be chosen; budget (B, P); forced (B, P, P)."""
    batch, heads, p, _ = logits.shape
    keep = torch.zeros(batch, heads, p, p, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(p):
                row = logits[b, h, i].tolist()
                cands = [j for j in range(p) if row[j] > NEG_INF]
                first = [j for j in cands if forced[b, i, j]]
                if rule == "code":
                    best = sorted(cands, key=lambda j: -row[j])[: int(budget[b, i])]
                    keep[b, h, i, sorted(set(best) | set(first))] = True
                    continue
                others = sorted((j for j in cands if not forced[b, i, j]), key=lambda j: -row[j])
                count = min(max(int(budget[b, i]), len(first)), len(cands))
                keep[b, h, i, (first + others)[:count]] = True
    return BlockIndex.from_mask(keep.to(logits.device), block_size, seq_len)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    chunk_rows: int | None = None,
):
    """Exact causal softmax attention restricted to the index's blocks: (B, Hq, N, d).

    One chunk of query rows at a time (keys only up to the chunk's last row); the
    block, causal and padding masks are applied by broadcasting. Computes in
    float32 (float64 for float64 inputs); GQA by broadcasting, never repeating K/V.
    """
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bs = index.block_size
    scale = d**-0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    out = torch.zeros(batch, hq, n, v.shape[-1], dtype=work, device=q.device)
    lse = torch.full((batch, hq, n), NEG_INF, dtype=work, device=q.device)
    valid = torch.ones(batch, n, dtype=torch.bool, device=q.device) if key_valid is None else key_valid.to(q.device)
    per_index_head = hq // index.num_heads  # 1 for query-head indices, g for KV-head indices
    p = index.num_blocks
    npad = p * bs
    kf, vf = _pad_to(kf, npad), _pad_to(vf, npad)
    valid = torch.cat([valid, valid.new_zeros(batch, npad - n)], dim=1)
    if chunk_rows is None:
        # ~32 MiB of live scores: cache-sized chunks ran 2.8x faster than 256 MiB ones on the CPU.
        chunk_rows = (32 << 20) // max(batch * hq * npad * 4, 1)
    chunk_rows = max(bs, chunk_rows // bs * bs)
    pos = torch.arange(npad, device=q.device)
    for r0 in range(0, npad, chunk_rows):
        r1 = min(npad, r0 + chunk_rows)
        rows, b0, b1 = r1 - r0, r0 // bs, r1 // bs
        # Causality: no key past the chunk's last row is ever needed.
        qc = _pad_to(qf[:, :, r0:min(r1, n)], rows).reshape(batch, hkv, group, rows, d)
        scores = torch.matmul(qc, kf[:, :, None, :r1].transpose(-1, -2)).view(batch, hq, rows, r1) * scale
        # Masks applied by broadcasting, never materialised per token and head.
        blocks = index.rows(b0, b1)[..., :b1].to(q.device).repeat_interleave(per_index_head, dim=1)  # (B, Hq, rows/bs, b1)
        scores.view(batch, hq, b1 - b0, bs, b1, bs).masked_fill_(~blocks[:, :, :, None, :, None], NEG_INF)
        allowed = (pos[None, :r1] <= pos[r0:r1, None])[None, None] & valid[:, None, None, :r1]
        scores.masked_fill_(~allowed, NEG_INF)
        row_lse = torch.logsumexp(scores, dim=-1)
        has_key = row_lse > NEG_INF
        probs = torch.exp(scores - torch.where(has_key, row_lse, 0.0)[..., None])
        chunk = torch.matmul(probs.view(batch, hkv, group, rows, r1), vf[:, :, None, :r1]).view(batch, hq, rows, -1)
        stop = min(r1, n) - r0
        out[:, :, r0 : r0 + stop] = torch.where(has_key[..., None], chunk, 0.0)[:, :, :stop]
        lse[:, :, r0 : r0 + stop] = row_lse[:, :, :stop]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
