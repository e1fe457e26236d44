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

Estimate paths (estimate_impl): "torch" materialises the last rows' attention a few KV heads
at a time; "triton" (auto on CUDA) runs kernels/last_rows.py (two passes over K, the attention
never stored; the top picks stay torch sorts of N scores per head). Same scores to float32
rounding, so the same index on inputs without near-ties at the last pick.

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

from stem_cli.config import BlockConfig, ConfigError, check_estimate_impl, estimate_impl_param, param
from stem_cli.index import BlockIndex
from stem_cli.methods.blocks import (
    NEG_INF,
    finish,
    last_rows_sums,
    reachable_offsets,
    top_count,
    valid_keys,
    vertical_slash_blocks,
)
from stem_cli.methods.estimate_path import last_rows_path
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
    estimate_impl: str = estimate_impl_param("kernels/last_rows.py column and diagonal sums")

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("last_q", 1), ("vertical_size", 0), ("slash_size", 0), ("sink_columns", 0), ("local_diagonals", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}={value!r} is not allowed: use a whole number >= {low}")
        if not isinstance(self.budget_scale, (int, float)) or isinstance(self.budget_scale, bool) or not 0 <= self.budget_scale < math.inf:
            raise ConfigError(f"budget_scale={self.budget_scale!r} is not allowed: use a finite number >= 0")
        check_estimate_impl(self.estimate_impl)


# ------------------------------------------------------------------ selector


def select(q, k, v, *, layer: int, config: MInferenceConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    estimated = estimate(q, k, v, layer=layer, config=config, scale=scale, key_valid=key_valid)
    return choose(estimated, seq_len=q.shape[2], config=config, key_valid=key_valid)


def estimate(q, k, v, *, layer: int, config: MInferenceConfig, scale: float, key_valid: torch.Tensor | None):
    """(vertical, slash) scores, (B, Hq, N) each; independent of the sizes (the budget solver reuses them)."""
    rows = min(config.last_q, q.shape[2])
    return last_rows_sums(q, k, rows, scale, key_valid, impl=last_rows_path(config, q.device, "minference", rows))


def choose(estimated, *, seq_len: int, config: MInferenceConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    """Forced + top columns and diagonals, converted exactly to blocks."""
    vertical, slash = estimated
    batch, n = vertical.shape[0], seq_len
    valid = valid_keys(key_valid, batch, n, vertical.device)
    pos = torch.arange(n, device=vertical.device)
    first_token = torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), n)  # (B,)
    sink = (pos[None, :] >= first_token[:, None]) & (pos[None, :] < first_token[:, None] + config.sink_columns)
    vertical = vertical.masked_fill(sink[:, None], float("inf")).masked_fill(~valid[:, None], NEG_INF)
    slash = slash.masked_fill(pos < config.local_diagonals, float("inf")).masked_fill(~reachable_offsets(valid)[:, None], NEG_INF)

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
