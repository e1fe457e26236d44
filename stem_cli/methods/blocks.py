"""What several selectors share: valid masks, forced blocks, budgets, top-k, coverage,
and the vertical-slash statistics of minference and flexprefill.

Shapes: q (B, Hq, N, d), k (B, Hkv, N, d); block size Bk, P = ceil(N / Bk) blocks.
Everything here is tested against the plain oracle in kernels/reference.py (budgets,
forced blocks, top-k) or against loops written in the tests (coverage, vertical-slash).

- Valid masks. A key is valid unless it is left padding; a block is valid when it holds
  a valid token; block pair (i, j) is choosable when j <= i and both blocks are valid.
- Forced blocks. Per query-block row i: the `sink_blocks` first blocks of the sequence
  (from its first valid block fb), the `window_blocks` nearest ones and the diagonal;
  causal only (fb <= j <= i).
- TPD budget. k(i) = k_start for the first k_start rows of the sequence's own blocks,
  then floor(linspace(k_start, mu k_start)) clamped to [1, k_start]; uniform (tpd off):
  max(1, floor(k_start (1 + mu) / 2)) everywhere. k_start from the schedule (k_start_for).
- Top-k. A row keeps min(max(k(i), forced), choosable) blocks: the forced ones first (they
  count inside k(i)), then the highest-scoring.
- Coverage. Keep the forced entries, then the others by decreasing mass while the mass kept
  before each is below threshold x total: the fewest entries reaching the threshold.
"""

from __future__ import annotations

import math

import torch

from stem_cli.index import PAD, BlockIndex

NEG_INF = float("-inf")


def pad_to(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    """x zero-padded along `dim` to `length` (x itself when already that long)."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: the precision estimates run in."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ valid masks


def valid_keys(key_valid: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """(B, N) bool, all True without padding."""
    if key_valid is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return key_valid.to(device=device, dtype=torch.bool)


def block_valid(valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, P) bool: the block holds a valid token."""
    batch, n = valid.shape
    p = -(-n // block_size)
    padded = torch.zeros(batch, p * block_size, dtype=torch.bool, device=valid.device)
    padded[:, :n] = valid
    return padded.view(batch, p, block_size).any(-1)


def choosable(valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, 1, P, P) bool: causal block pairs whose query and key blocks both hold a valid token."""
    bv = block_valid(valid, block_size)
    p = bv.shape[-1]
    ids = torch.arange(p, device=valid.device)
    causal = ids[None, :] <= ids[:, None]
    return (causal[None] & bv[:, None, :] & bv[:, :, None])[:, None]


def first_valid_block(key_valid: torch.Tensor | None, batch: int, block_size: int, device) -> torch.Tensor:
    """(B,) index of the first block holding a valid token (left padding moves it right)."""
    if key_valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    first_token = torch.where(key_valid.any(-1), key_valid.to(torch.int8).argmax(-1), key_valid.shape[-1])
    return (first_token // block_size).to(device)


# ------------------------------------------------------------------ forced blocks, budgets, top-k


def forced_blocks(num_blocks: int, first_block: torch.Tensor, sink_blocks: int, window_blocks: int) -> torch.Tensor:
    """(B, P, P) bool: sinks (first blocks of each sequence), local window and diagonal, causal only."""
    ids = torch.arange(num_blocks, device=first_block.device)
    i, j = ids[:, None], ids[None, :]
    fb = first_block[:, None, None]
    sinks = (j >= fb) & (j < fb + sink_blocks)
    window = (j > i - window_blocks) | (j == i)
    return (sinks | window) & (j <= i) & (j >= fb)


def k_start_for(num_blocks: int, seq_len: int, schedule: str, k_scale: float = 1.0, k_start: int = 0) -> int:
    """Initial per-row budget in blocks (see StemConfig.schedule)."""
    p = num_blocks
    if k_start > 0:
        base = k_start
    elif schedule == "code":
        if p < 56:
            base = p
        elif p < 160:
            base = math.floor(0.2 * p + 30)
        else:
            base = math.floor(0.1 * p) + 30
    elif schedule == "paper":
        # The paper states 0.2P for 8K-16K and 0.1P above; we extend 0.2P below 8K.
        base = math.floor((0.2 if seq_len <= 16384 else 0.1) * p)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return int(min(p, max(1, round(base * k_scale))))


def tpd_budget(num_blocks: int, k_start: int, mu: float, tpd: bool = True) -> torch.Tensor:
    """Blocks to keep per query-block row: (P,) int64 (before clamping to the causal count)."""
    p = num_blocks
    if not tpd:
        return torch.full((p,), max(1, math.floor(k_start * (1 + mu) / 2)), dtype=torch.long, device="cpu")
    budget = torch.full((p,), k_start, dtype=torch.long, device="cpu")  # host: budgets are data-independent
    if p > k_start:
        decay = torch.linspace(k_start, mu * k_start, p - k_start, dtype=torch.float64, device="cpu").floor().long()
        budget[k_start:] = decay.clamp(1, k_start)
    return budget


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
    """(B, P) budget per sequence. The schedule runs over each sequence's own blocks
    (from its first valid block), so left padding shifts it rather than spending
    budget on padding rows; `lengths` (B,) are the sequences' valid token counts."""
    rows = []
    for fb, length in zip(first_block.tolist(), lengths.tolist()):
        own = num_blocks - fb
        budget = torch.zeros(num_blocks, dtype=torch.long, device="cpu")
        if own > 0:
            budget[fb:] = tpd_budget(own, k_start_for(own, int(length), schedule, k_scale, k_start), mu, tpd)
        rows.append(budget)
    return torch.stack(rows).to(first_block.device)


FORCED_RULES = ("code", "inside")


def select_topk(
    logits: torch.Tensor,
    budget: torch.Tensor,
    forced: torch.Tensor,
    *,
    block_size: int,
    seq_len: int,
    max_count: int | None = None,
    rule: str = "code",
) -> BlockIndex:
    """Per row the top-k(i) blocks by logit and the forced blocks (sinks, window, diagonal).

    rule "code" (the authors' released code): the budget(i) best-scoring blocks, then the
    forced ones OR-ed in on top, so a row keeps between budget(i) and budget(i) + |forced|.
    rule "inside": the forced blocks rank first and count inside the budget: max(budget,
    forced) blocks in all. Either way a row never keeps more than its choosable blocks.
    logits (B, H, P, P) with -inf for blocks that may not be chosen; budget (B, P);
    forced (B, P, P). `max_count`, an upper bound on any row's count known on the host,
    spares a device sync.
    """
    p = logits.shape[-1]
    budget = budget.to(logits.device)[:, None]
    choosable_count = (logits > NEG_INF).sum(-1)
    if rule == "inside":
        ranked = logits.masked_fill(forced[:, None] & (logits > NEG_INF), float("inf"))
        counts = torch.minimum(torch.maximum(budget, forced.sum(-1)[:, None]), choosable_count).to(torch.int32)
        kmax = min(max_count, p) if max_count is not None else max(int(counts.max()), 1)
        top = ranked.topk(kmax, dim=-1, sorted=True).indices
        keep = torch.arange(kmax, device=logits.device) < counts[..., None]
        # int32 ids: sorting them instead of topk's int64 cut selection at 128K from 4.1 to 3.4 ms (H100).
        ids = torch.where(keep, top, p + top).to(torch.int32).sort(-1).values
        return BlockIndex(counts, torch.where(ids < p, ids, PAD), block_size, seq_len)
    if rule != "code":
        raise ValueError(f"unknown forced-block rule {rule!r}; rules: {', '.join(FORCED_RULES)}")
    take = torch.minimum(budget, choosable_count)  # (B, H, P)
    kmax = max(1, min(int(budget.max()), p))  # budgets live on the host: no device sync
    top = logits.topk(kmax, dim=-1, sorted=True).indices  # sorted: the first take(i) are the best
    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    keep.scatter_(-1, top, torch.arange(kmax, device=logits.device) < take[..., None])
    keep |= forced[:, None] & (logits > NEG_INF)
    counts = keep.sum(-1).to(torch.int32)
    width = min(max_count, p) if max_count is not None else max(int(counts.max()), 1)
    # The kept ids in increasing order: the `width` largest of (p - j) over the kept j.
    order = torch.where(keep, p - torch.arange(p, device=logits.device, dtype=torch.int32), 0)
    first = order.topk(width, dim=-1, sorted=True).values
    indices = torch.where(first > 0, p - first, PAD).to(torch.int32)
    return BlockIndex(counts, indices, block_size, seq_len)


def top_count(x: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Bool mask of the `count` largest entries along the last dim (per row counts allowed);
    -inf entries are never taken."""
    order = x.argsort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1], device=x.device)
    if isinstance(count, torch.Tensor):
        take = ranks < count[..., None]
    else:
        take = (ranks < count).expand_as(x)
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, take)
    return mask & (x > NEG_INF)


# ------------------------------------------------------------------ coverage


def coverage(mass: torch.Tensor, threshold: float, allowed: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The fewest allowed entries (forced ones first) whose cumulative mass reaches
    threshold x the allowed total: bool (..., M). threshold >= 1 keeps every allowed entry.

    Kept: the forced entries, then the others by decreasing mass, each while the mass kept
    before it is below threshold x total. mass (..., M) >= 0; allowed and forced broadcast
    to it (no forced entries when forced is None). `.sum(-1)` is the count."""
    allowed = allowed.expand_as(mass)
    if threshold >= 1:
        return allowed.clone()
    forced = torch.zeros_like(allowed) if forced is None else forced.expand_as(mass) & allowed
    mass = mass.masked_fill(~allowed, 0.0)
    total = mass.sum(-1, keepdim=True)
    kept = mass.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
    others = mass.masked_fill(forced | ~allowed, -1.0)  # not a candidate: sorts last
    values, order = others.sort(dim=-1, descending=True)
    before = torch.nn.functional.pad(values.clamp_min(0).cumsum(-1)[..., :-1], (1, 0))
    take = (values >= 0) & (kept + before < threshold * total)
    return torch.zeros_like(allowed).scatter_(-1, order, take) | forced


# ------------------------------------------------------------------ building indices


def full_index(batch: int, heads: int, n: int, block_size: int, key_valid, device) -> BlockIndex:
    """Every causal block with a valid query and key, as an explicit (not `full`) index."""
    p = -(-n // block_size)
    allowed = choosable(valid_keys(key_valid, batch, n, device), block_size)
    return BlockIndex.from_mask(allowed.expand(batch, heads, p, p), block_size, n)


def finish(keep: torch.Tensor, key_valid, valid: torch.Tensor, block_size: int, n: int, sink_blocks: int = 1) -> BlockIndex:
    """OR in the sink block(s) and the diagonal, drop padded and non-causal blocks, build the index."""
    batch, p = keep.shape[0], keep.shape[-1]
    first = first_valid_block(key_valid, batch, block_size, keep.device)
    keep = (keep | forced_blocks(p, first, sink_blocks, 1)[:, None]) & choosable(valid, block_size)
    return BlockIndex.from_mask(keep, block_size, n)


# ------------------------------------------------------------------ vertical-slash statistics (minference, flexprefill)


def last_rows_attention(q, k, rows: int, scale: float, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Exact softmax of the last `rows` queries over all keys, causal and valid only.

    q (B, Hq, N, d), k (B, Hkv, N, d) -> (B, Hq, rows, N) in float32 (float64 for float64
    inputs); a row with no valid key is zeros. K/V are never repeated over the GQA group."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    work = work_dtype(q)
    # The group's rows stacked into one GEMM per KV head (a broadcast K would be copied per head).
    ql = (q[:, :, n - rows :].to(work) * scale).reshape(batch, hkv, hq // hkv * rows, d)
    s = torch.matmul(ql, k.to(work).transpose(-1, -2)).view(batch, hq, rows, n)
    ids = torch.arange(rows, device=q.device)
    s[..., n - rows :].masked_fill_(ids[None, :] > ids[:, None], NEG_INF)  # causal: only the last keys
    if key_valid is not None:
        s.masked_fill_(~key_valid.to(q.device)[:, None, None, :], NEG_INF)
        return torch.softmax(s, dim=-1).nan_to_num_(0.0)
    return torch.softmax(s, dim=-1)


def last_rows_sums(q, k, rows: int, scale: float, key_valid, max_bytes: int = 512 << 20, impl: str = "torch"):
    """Column sums and diagonal sums of the last `rows` queries' exact attention: two
    (B, Hq, N) tensors (see last_rows_attention and diagonal_sums). KV heads go a chunk
    at a time so the (rows x N) attention of all heads (2 GiB at 128K, 32 heads, 128 rows)
    is never alive at once. impl "triton": kernels/last_rows.py (float32, the attention never stored)."""
    if impl == "triton":
        from stem_cli.kernels import last_rows

        return last_rows.last_rows_sums(q, k, rows, scale, key_valid)
    if impl != "torch":
        raise ValueError(f"impl={impl!r}: use 'torch' or 'triton'")
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    per_kv = batch * group * rows * (n + rows) * 4 * 3  # scores, probabilities, sheared copy
    step = max(1, min(hkv, max_bytes // max(per_kv, 1)))
    columns, diagonals = [], []
    for h0 in range(0, hkv, step):
        h1 = min(hkv, h0 + step)
        a = last_rows_attention(q[:, h0 * group : h1 * group], k[:, h0:h1], rows, scale, key_valid)
        columns.append(a.sum(-2))
        diagonals.append(diagonal_sums(a))
        del a
    return torch.cat(columns, 1), torch.cat(diagonals, 1)


def diagonal_sums(a: torch.Tensor) -> torch.Tensor:
    """(..., R, N) attention of the last R of N positions -> (..., N): out[o] = sum_t a[t, pos_t - o].

    A shear, not a scatter: with R zeros in front of each row (z[t, R + c] = a[t, c]), a view
    whose rows step one element further (stride N + R + 1) reads z[t, j + t] = a[t, j + t - R],
    whose offset pos_t - c is N - j for every t; so column j of the view holds diagonal N - j."""
    *lead, r, n = a.shape
    z = torch.cat([a.new_zeros(*lead, r, r), a], dim=-1).contiguous()  # (..., R, N + R)
    strides = z.stride()
    sheared = z.as_strided((*lead, r, n + 1), (*strides[:-2], n + r + 1, 1))  # last read: R (N + R) - 1
    return sheared[..., 1:].sum(-2).flip(-1)


def reachable_offsets(valid: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: diagonal offset o has a valid cell (o <= N-1 - first valid token); the
    others lie wholly in the left padding and are never chosen."""
    n = valid.shape[-1]
    first_token = torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), n)
    return torch.arange(n, device=valid.device)[None, :] <= n - 1 - first_token[:, None]


def vertical_slash_blocks(columns: torch.Tensor, diagonals: torch.Tensor, block_size: int) -> torch.Tensor:
    """Kept key columns and diagonal offsets (both (B, H, N) bool) -> (B, H, P, P) causal block mask.

    Block (i, j), j <= i, is kept iff it holds a kept column or a cell (r, r - o) of a kept
    diagonal o. Rows r of block i run from iB to iB + last_i (last_i = B-1 except for a
    short final block) and columns c of block j from jB to jB + B-1, so the differences
    r - c fill the interval [(i-j)B - (B-1), (i-j)B + last_i]: a prefix count of the kept
    offsets answers each block pair in O(1)."""
    batch, heads, n = columns.shape
    p = -(-n // block_size)
    dev = columns.device
    padded = torch.zeros(batch, heads, p * block_size, dtype=torch.bool, device=dev)
    padded[..., :n] = columns
    col_blocks = padded.view(batch, heads, p, block_size).any(-1)  # (B, H, P)
    ids = torch.arange(p, device=dev)
    i, j = ids[:, None], ids[None, :]
    causal = j <= i
    delta = (i - j).clamp_min(0)
    last = torch.clamp(n - 1 - i * block_size, max=block_size - 1)  # (P, 1)
    lo = (delta * block_size - (block_size - 1)).clamp(0, n)
    hi = torch.minimum(delta * block_size + last, torch.tensor(n - 1, device=dev))
    prefix = torch.nn.functional.pad(diagonals.to(torch.int32).cumsum(-1), (1, 0))  # (B, H, N + 1)
    upper = (hi + 1).reshape(1, 1, p * p).expand(batch, heads, p * p)
    lower = lo.reshape(1, 1, p * p).expand(batch, heads, p * p)
    hits = prefix.gather(-1, upper) - prefix.gather(-1, lower)
    diag_blocks = (hits > 0).view(batch, heads, p, p) & (lo <= hi)
    return (col_blocks[:, :, None, :] | diag_blocks) & causal
