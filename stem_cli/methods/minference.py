"""minference: MInference's vertical-slash pattern (Jiang et al., 2024) on the shared block executor.

Definition as implemented (per batch and query head; spec section 2):
1. The last `last_q` (64) queries attend exactly (softmax, causal, valid keys only) to all keys:
   A (last_q x N).
2. Vertical score of key column c: sum over those rows of A[t, c]. Slash score of diagonal
   offset o >= 0 (the cells (r, r - o)): sum over the rows of A[t, pos_t - o].
3. Keep the top `vertical_size * budget_scale` columns and the top `slash_size * budget_scale`
   diagonals; the first `sink_columns` (30) valid columns and the `local_diagonals` (100)
   diagonals nearest the main one are always kept (ranked first). Counts never fall below
   those always-kept sets (MInference clamps to at least 30 columns and 50 diagonals; here
   the floor is the forced sets, so lowering budget_scale never drops a forced diagonal).
4. Exact conversion to the block grid: block (i, j), j <= i, is kept when it holds a kept
   column (a column of block j) or a cell of a kept diagonal: diagonal o meets block (i, j)
   iff (i-j) B - (B-1) <= o <= (i-j) B + (last row of block i - i B). The executor then
   computes whole blocks, so this over-covers MInference's token-level kernel (it computes
   only the kept columns and diagonals); BUD counts the blocks, i.e. what we compute.
5. The sink block and the diagonal block are always kept (implied by 3 at default settings);
   padded (left) key blocks and all-padding query rows keep nothing; columns in the padding
   and diagonals lying wholly in it are never chosen.
`select` = `choose(estimate(...))`: the scores do not depend on the sizes, so the budget
solver estimates once per layer and chooses for every knob value.

Deviations from the released MInference:
- One pattern for every head: MInference assigns each head a pattern and sizes from an
  offline search per model; its generic setting (and the spec's) is vertical-and-slash with
  1000 columns / 6096 diagonals, which we apply to all heads and layers.
- Block-granular execution (point 4), so at equal sizes we compute more than MInference.
- GQA: scored per query head (MInference repeats K/V per query head; same result).

Budget knob: `budget_scale` multiplies both sizes (their ratio stays MInference's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stem_cli.config import BlockConfig, ConfigError, param
from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref
from stem_cli.methods.knob import Knob


@dataclass(frozen=True)
class MInferenceConfig(BlockConfig):
    dense_layers: tuple = param(
        (0, 1), "layer indices that always run dense attention (Stem's layer schedule, so budgets compare)", "stem"
    )
    last_q: int = param(64, "last queries whose exact attention scores the columns and diagonals", "code")
    vertical_size: int = param(1000, "vertical columns kept per head (times budget_scale)", "code")
    slash_size: int = param(6096, "diagonals kept per head (times budget_scale)", "code")
    sink_columns: int = param(30, "first valid key columns always kept", "code")
    local_diagonals: int = param(100, "diagonals nearest the main one always kept (offsets 0..n-1)", "code")
    budget_scale: float = param(
        1.0, "multiplies vertical_size and slash_size (budget knob; 0 = only the always-kept columns/diagonals)", "stem"
    )

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("last_q", 1), ("vertical_size", 0), ("slash_size", 0), ("sink_columns", 0), ("local_diagonals", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} is not allowed: use a whole number >= {low}")
        if not isinstance(self.budget_scale, (int, float)) or isinstance(self.budget_scale, bool) or not 0 <= self.budget_scale < math.inf:
            raise ConfigError(f"budget_scale={self.budget_scale!r} is not allowed: use a finite number >= 0")


# ------------------------------------------------------------------ shared helpers (flexprefill uses them too)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    s[..., n - rows :].masked_fill_(ids[None, :] > ids[:, None], float("-inf"))  # causal: only the last keys
    if key_valid is not None:
        s.masked_fill_(~key_valid.to(q.device)[:, None, None, :], float("-inf"))
        return torch.softmax(s, dim=-1).nan_to_num_(0.0)
    return torch.softmax(s, dim=-1)


def last_rows_sums(q, k, rows: int, scale: float, key_valid, max_bytes: int = 512 << 20):
    """Column sums and diagonal sums of the last `rows` queries' exact attention: two
    (B, Hq, N) tensors (see last_rows_attention and diagonal_sums). KV heads go a chunk
    at a time so the (rows x N) attention of all heads (2 GiB at 128K, 32 heads, 128 rows)
    is never alive at once."""
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
    return mask & (x > float("-inf"))


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


def full_index(batch: int, heads: int, n: int, block_size: int, key_valid, device) -> BlockIndex:
    """Every causal block with a valid query and key, as an explicit (not `full`) index."""
    p = -(-n // block_size)
    allowed = choosable(valid_keys(key_valid, batch, n, device), block_size)
    return BlockIndex.from_mask(allowed.expand(batch, heads, p, p), block_size, n)


def finish(keep: torch.Tensor, key_valid, valid: torch.Tensor, block_size: int, n: int, sink_blocks: int = 1) -> BlockIndex:
    """OR in the sink block(s) and the diagonal, drop padded and non-causal blocks, build the index."""
    batch, p = keep.shape[0], keep.shape[-1]
    first = ref.first_valid_block(key_valid, batch, block_size, keep.device)
    keep = (keep | ref.forced_blocks(p, first, sink_blocks, 1)[:, None]) & choosable(valid, block_size)
    return BlockIndex.from_mask(keep, block_size, n)


# ------------------------------------------------------------------ selector


def select(q, k, v, *, layer: int, config: MInferenceConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    estimated = estimate(q, k, v, layer=layer, config=config, scale=scale, key_valid=key_valid)
    return choose(estimated, seq_len=q.shape[2], config=config, key_valid=key_valid)


def estimate(q, k, v, *, layer: int, config: MInferenceConfig, scale: float, key_valid: torch.Tensor | None):
    """(vertical, slash) scores, (B, Hq, N) each; independent of the sizes (the budget solver reuses them)."""
    return last_rows_sums(q, k, min(config.last_q, q.shape[2]), scale, key_valid)


def choose(estimated, *, seq_len: int, config: MInferenceConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    """Forced + top columns and diagonals, converted exactly to blocks."""
    vertical, slash = estimated
    batch, n = vertical.shape[0], seq_len
    valid = valid_keys(key_valid, batch, n, vertical.device)
    pos = torch.arange(n, device=vertical.device)
    first_token = torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), n)  # (B,)
    sink = (pos[None, :] >= first_token[:, None]) & (pos[None, :] < first_token[:, None] + config.sink_columns)
    vertical = vertical.masked_fill(sink[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
    slash = slash.masked_fill(pos < config.local_diagonals, float("inf")).masked_fill(~reachable_offsets(valid)[:, None], float("-inf"))

    n_columns = min(n, max(round(config.vertical_size * config.budget_scale), config.sink_columns))
    n_diagonals = min(n, max(round(config.slash_size * config.budget_scale), config.local_diagonals))
    keep = vertical_slash_blocks(top_count(vertical, n_columns), top_count(slash, n_diagonals), config.block_size)
    return finish(keep, key_valid, valid, config.block_size, n, sink_blocks=1 if config.sink_columns > 0 else 0)


DEFAULTS = MInferenceConfig()
DESCRIPTION = (
    "MInference vertical-slash: last 64 queries' exact attention picks 1000 columns + 6096 diagonals per head "
    "(first 30 columns, last 100 diagonals always), converted exactly to blocks (over-covers its token kernel)"
)
# 0.01 leaves only the forced 30 columns / 100 diagonals (6096 x 0.01 < 100); 32 covers 195K diagonals.
BUDGET_KNOB = Knob("budget_scale", 0.01, 32.0, integer=False)
