"""flexprefill: FlexPrefill's per-head pattern choice (Lai et al., ICLR 2025) on the shared executor.

Definition as implemented (per batch and query head; spec section 2). Let L be the last
min(block_size, N) queries (the released code's "last block": the last block_size tokens,
whatever the grid) and A their exact attention (softmax, causal, valid keys only).
1. Pattern choice. a_bar = the true block distribution of L: the mean over L's rows of A,
   summed per key block. a_hat = the estimate: softmax over key blocks of
   scale * mean(L's queries) . mean(keys of the block) (blocks without a valid key excluded).
   D = sqrt(JS(a_hat, a_bar)) with natural logarithms (so D <= sqrt(ln 2) ~ 0.83).
   D < tau: the head is query-aware, else vertical-slash.
2. Vertical-slash heads. Column scores = mean over L's rows of A (one per key token);
   diagonal scores = mean over L's rows of A[t, pos_t - o] (one per offset o >= 0).
   granularity = "block" (default, the released code): n_v = the fewest columns whose scores
   reach gamma (cumulative, largest first); keep the n_v // B + 1 column blocks with the
   largest block-summed column scores, at least ceil(min_budget / B) and at most P; the same
   for diagonals, in block-diagonal units (offset o counts for block diagonal o // B; block
   (i, j) is kept for block diagonal i - j). The first valid column block and block
   diagonal 0 rank first.
   granularity = "token" (the paper's text): keep the fewest columns reaching gamma, at
   least min_budget of them, and likewise diagonals; convert exactly to blocks (a block is
   kept if it holds a kept column or a cell of a kept diagonal; see blocks.vertical_slash_blocks).
3. Query-aware heads. Mean-pooled q and k per block (valid tokens only) give block logits
   scale * q_bar_i . k_bar_j; softmax per query-block row over causal valid blocks; the
   rows' distributions are pooled over the whole head (each valid row holds mass 1) and the
   fewest blocks of the head, largest first, that reach gamma of the head's mass are kept
   (coverage per head, as the paper's Algorithm 4 and the released code, not per row).
   The min_budget vertical-slash set of 2. is added (the released code keeps it for these
   heads too).
4. Always: the sink block (first block with a valid token) and the diagonal block; padded
   key blocks and all-padding query rows keep nothing, nor are padded columns or diagonals
   lying wholly in the padding chosen. gamma >= 1 keeps every causal block (exactly dense:
   no block with underflowed mass is dropped).
`select` = `choose(estimate(...))`: nothing estimated depends on gamma, so the budget solver
estimates once per layer and chooses for every knob value.

Estimate paths (estimate_impl): "triton" (auto on CUDA) computes the last block's column and
diagonal sums with kernels/last_rows.py (the exact attention never stored; up to 128 rows, i.e.
block_size <= 128, else torch with a notice under auto) and the pooled block softmax (P x P) with
kernels/pooled_block_softmax.py (the logits never stored); the divergence stays torch (O(P d) per
head). The choice on that path, for granularity "block": the coverage counts of the N column and
N diagonal scores (vertical-slash heads) and the head-wide coverage of the P x P masses
(query-aware heads) with kernels/coverage_threshold.py (a radix search of the threshold, no sort),
then the index straight from kernels/flexprefill_index.py (no P x P mask, no sort); the only host
read is the index width at the end. granularity "token" chooses with torch sorts on both paths.
What the definition costs beyond Stem's pooled estimate: the exact attention of the last block
(B x N x d x 2 per head, two passes), and for query-aware heads a coverage over all P^2 block pairs
of the head (not per row): nine passes over the P^2 masses (4 MB per head at 128K).

Deviations / simplifications: no max_budget (the
released default is unbounded); GQA scored per query head with K/V broadcast (the released
code repeats K/V: same result); our default keeps layers 0 and 1 dense as Stem does.

Budget knob: gamma in [0, 1] (0 = the min_budget set plus sinks and diagonals, 1 = dense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stem_cli.config import BlockConfig, ConfigError, check_estimate_impl, estimate_impl_param, param
from stem_cli.index import BlockIndex
from stem_cli.methods.blocks import (
    NEG_INF,
    block_valid,
    choosable,
    coverage,
    finish,
    first_valid_block,
    full_index,
    last_rows_sums,
    pad_to,
    reachable_offsets,
    top_count,
    valid_keys,
    vertical_slash_blocks,
    work_dtype,
)
from stem_cli.methods.estimate_path import estimate_path, last_rows_path
from stem_cli.methods.knob import Knob


@dataclass(frozen=True)
class FlexPrefillConfig(BlockConfig):
    dense_layers: tuple = param(
        (0, 1), "layer indices that always run dense attention (Stem's layer schedule, so budgets compare)", "stem"
    )
    gamma: float = param(0.9, "attention coverage each head keeps, in [0, 1]; 1 = dense", "paper+code")
    tau: float = param(0.1, "sqrt-JS divergence (nats) below which a head is query-aware, >= 0", "paper+code")
    min_budget: int = param(1024, "minimum tokens kept as columns and as diagonals (in 'block' granularity rounded up to blocks)", "code")
    granularity: str = param(
        "block",
        "'block' = columns/diagonals chosen as whole blocks / block diagonals (released code); "
        "'token' = token columns/diagonals converted exactly to blocks (paper text)",
        "code",
    )
    estimate_impl: str = estimate_impl_param("kernels/last_rows.py column and diagonal sums of the last block")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.gamma, (int, float)) or isinstance(self.gamma, bool) or not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma!r} is not allowed: gamma must lie in [0, 1] (0.9 = cover 90% of the attention)")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or not 0 <= self.tau < math.inf:
            raise ConfigError(f"tau={self.tau!r} is not allowed: tau must be a finite number >= 0 (0 = no query-aware heads)")
        if not isinstance(self.min_budget, int) or isinstance(self.min_budget, bool) or self.min_budget < 0:
            raise ConfigError(f"min_budget={self.min_budget!r} is not allowed: use a token count >= 0")
        if self.granularity not in ("block", "token"):
            raise ConfigError(f"granularity={self.granularity!r} is not allowed: use 'block' or 'token'")
        check_estimate_impl(self.estimate_impl)


def _block_sum(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., N) -> (..., P) sums over each block (a short last block zero-padded)."""
    n = x.shape[-1]
    p = -(-n // block_size)
    return torch.nn.functional.pad(x, (0, p * block_size - n)).view(*x.shape[:-1], p, block_size).sum(-1)


def _block_mean(x: torch.Tensor, valid: torch.Tensor, block_size: int, padded: bool = True) -> torch.Tensor:
    """(B, H, N, d) -> (B, H, P, d) in the work dtype: mean over each block's valid tokens (0
    where none). Accumulates in the work dtype without a full-precision copy of x; without
    padding (padded=False) not even a masked copy."""
    batch, heads, n, d = x.shape
    p = -(-n // block_size)
    work = work_dtype(x)
    w = torch.zeros(batch, p * block_size, dtype=work, device=x.device)
    w[:, :n] = valid.to(work)
    xp = pad_to(x, p * block_size)
    if padded:
        xp = xp * w[:, None, :, None].to(x.dtype)
    xs = xp.view(batch, heads, p, block_size, d).sum(3, dtype=work)
    count = w.view(batch, p, block_size).sum(-1)
    return xs / count.clamp_min(1)[:, None, :, None]


def sqrt_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) along the last dim."""
    m = (p + q) / 2

    def kl(a):  # KL(a || m), 0 log 0 = 0
        return torch.where(a > 0, a * (a / m).log(), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0).sqrt()


def head_divergence(q, k, *, block_size: int, scale: float, key_valid: torch.Tensor | None, impl: str = "torch",
                    k_bar: torch.Tensor | None = None):
    """(D, a_hat, a_bar, columns, diagonals): the pattern statistic per (batch, query head),
    its two distributions (B, Hq, P), and the mean column and diagonal scores (B, Hq, N) of
    the last min(block_size, N) queries' exact attention. k_bar: the keys' block means, if
    the caller has them (one pass over K fewer)."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    work = work_dtype(q)
    valid = valid_keys(key_valid, batch, n, q.device)
    rows = min(block_size, n)
    row_ok = valid[:, n - rows :]  # (B, R): a padded query sees no valid key
    nrows = row_ok.sum(-1).clamp_min(1).to(work)[:, None]  # (B, 1)
    columns, diagonals = last_rows_sums(q, k, rows, scale, key_valid, impl=impl)
    columns, diagonals = columns / nrows[..., None], diagonals / nrows[..., None]  # means over the rows
    a_bar = _block_sum(columns, block_size)  # (B, Hq, P)

    q_last = (q[:, :, n - rows :].to(work) * row_ok[:, None, :, None]).sum(2) / nrows[..., None]  # (B, Hq, d)
    if k_bar is None:
        k_bar = _block_mean(k, valid, block_size, key_valid is not None)  # (B, Hkv, P, d)
    logits = torch.matmul(q_last.view(batch, hkv, hq // hkv, 1, d), k_bar[:, :, None].transpose(-1, -2))
    logits = logits.view(batch, hq, -1) * scale
    logits = logits.masked_fill(~block_valid(valid, block_size)[:, None], NEG_INF)
    a_hat = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return sqrt_js(a_hat, a_bar), a_hat, a_bar, columns, diagonals


def _vertical_slash(columns, diagonals, n_col, n_diag, *, granularity, block_size, first_block, valid):
    """Column scores (B, H, N) and diagonal scores (B, H, N), counts (B, H) in the granularity's
    units -> (B, H, P, P) block mask."""
    reachable = reachable_offsets(valid)  # (B, N): diagonals with a valid cell
    if granularity == "token":
        columns = columns.masked_fill(~valid[:, None], NEG_INF)
        diagonals = diagonals.masked_fill(~reachable[:, None], NEG_INF)
        return vertical_slash_blocks(top_count(columns, n_col), top_count(diagonals, n_diag), block_size)
    col_b = _block_sum(columns, block_size)  # (B, H, P)
    diag_b = _block_sum(diagonals, block_size)  # block diagonal m holds offsets mB .. mB + B-1
    p = col_b.shape[-1]
    ids = torch.arange(p, device=columns.device)
    col_b = col_b.masked_fill((ids == first_block[:, None])[:, None], float("inf"))
    col_b = col_b.masked_fill(~block_valid(valid, block_size)[:, None], NEG_INF)
    diag_b = diag_b.masked_fill(ids == 0, float("inf"))
    diag_b = diag_b.masked_fill(~block_valid(reachable, block_size)[:, None], NEG_INF)
    col_keep, diag_keep = top_count(col_b, n_col), top_count(diag_b, n_diag)
    i, j = ids[:, None], ids[None, :]
    causal = j <= i
    return (col_keep[:, :, None, :] | diag_keep[:, :, (i - j).clamp_min(0)]) & causal


def select(q, k, v, *, layer: int, config: FlexPrefillConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    if config.gamma >= 1:  # every causal block: no estimate needed
        return full_index(q.shape[0], q.shape[1], q.shape[2], config.block_size, key_valid, q.device)
    estimated = estimate(q, k, v, layer=layer, config=config, scale=scale, key_valid=key_valid)
    return choose(estimated, seq_len=q.shape[2], config=config, key_valid=key_valid)


def estimate(q, k, v, *, layer: int, config: FlexPrefillConfig, scale: float, key_valid: torch.Tensor | None) -> dict:
    """Everything gamma does not touch (the budget solver reuses it): the divergence (B, Hq),
    mean column and diagonal scores (B, Hq, N) and the pooled block distributions (B, Hq, P, P)."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    bs = config.block_size
    p = -(-n // bs)
    valid = valid_keys(key_valid, batch, n, q.device)
    impl = last_rows_path(config, q.device, "flexprefill", min(bs, n))
    k_bar = _block_mean(k, valid, bs, key_valid is not None)  # (B, Hkv, P, d)
    div, _, _, columns, diagonals = head_divergence(q, k, block_size=bs, scale=scale, key_valid=key_valid, impl=impl,
                                                    k_bar=k_bar)
    q_bar = _block_mean(q, valid, bs, key_valid is not None)  # (B, Hq, P, d)
    if estimate_path(config, q.device, "flexprefill") == "triton":
        from stem_cli.kernels import pooled_block_softmax

        blocks = pooled_block_softmax.block_softmax(q_bar, k_bar, block_valid(valid, bs), scale)
    else:
        blocks = block_softmax_torch(q_bar, k_bar, valid, bs, scale)
    return {"divergence": div, "columns": columns, "diagonals": diagonals, "blocks": blocks}


def block_softmax_torch(q_bar, k_bar, valid, block_size: int, scale: float) -> torch.Tensor:
    """The pooled block distributions (B, Hq, P, P) in torch ops (kernels/pooled_block_softmax.py's definition):
    the causal row softmax of scale * q_bar . k_bar over the choosable block pairs, zeros elsewhere."""
    batch, hq, p, d = q_bar.shape
    hkv = k_bar.shape[1]
    logits = torch.matmul(q_bar.view(batch, hkv, hq // hkv, p, d), k_bar[:, :, None].transpose(-1, -2)).view(batch, hq, p, p)
    return torch.softmax((logits * scale).masked_fill(~choosable(valid, block_size), NEG_INF), dim=-1).nan_to_num_(0.0)


def choose(estimated: dict, *, seq_len: int, config: FlexPrefillConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    """Per head: query-aware coverage or vertical-slash coverage (module docstring, 1-4)."""
    columns, diagonals = estimated["columns"], estimated["diagonals"]
    batch, hq, n = columns.shape
    bs = config.block_size
    p = -(-n // bs)
    valid = valid_keys(key_valid, batch, n, columns.device)
    allowed = choosable(valid, bs)
    if config.gamma >= 1:
        return BlockIndex.from_mask(allowed.expand(batch, hq, p, p), bs, n)
    first_block = first_valid_block(key_valid, batch, bs, columns.device)
    query_aware = estimated["divergence"] < config.tau  # (B, Hq)
    if config.granularity == "block" and estimate_path(config, columns.device, "flexprefill") == "triton":
        return _choose_fused(estimated, query_aware, first_block, valid, config=config, seq_len=n)

    need_col = coverage(columns, config.gamma, valid[:, None]).sum(-1)  # tokens
    need_diag = coverage(diagonals, config.gamma, reachable_offsets(valid)[:, None]).sum(-1)
    if config.granularity == "block":
        floor = min(-(-config.min_budget // bs), p)  # blocks
        n_col, n_diag = (need_col // bs + 1).clamp(floor, p), (need_diag // bs + 1).clamp(floor, p)
        min_units = torch.full_like(n_col, floor)
    else:
        floor = min(config.min_budget, n)
        n_col, n_diag = need_col.clamp_min(floor), need_diag.clamp_min(floor)
        min_units = torch.full_like(n_col, floor)
    common = {"granularity": config.granularity, "block_size": bs, "first_block": first_block, "valid": valid}
    vs = _vertical_slash(columns, diagonals, n_col, n_diag, **common)

    if bool(query_aware.any()):
        vs_min = _vertical_slash(columns, diagonals, min_units, min_units, **common)
        flat = estimated["blocks"].reshape(batch, hq, p * p)
        flat_allowed = allowed.reshape(batch, 1, p * p)
        count = coverage(flat, config.gamma, flat_allowed).sum(-1)
        qa = top_count(flat.masked_fill(~flat_allowed, NEG_INF), count).view(batch, hq, p, p) | vs_min
        vs = torch.where(query_aware[:, :, None, None], qa, vs)
    return finish(vs, key_valid, valid, bs, n)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, largest first (top_count(x, c) = ranks < c where x > -inf)."""
    order = x.argsort(dim=-1, descending=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))


def _choose_fused(estimated: dict, query_aware, first_block, valid, *, config: FlexPrefillConfig, seq_len: int) -> BlockIndex:
    """choose on the kernels (granularity 'block'): coverage counts without a sort, the index without a mask."""
    from stem_cli.kernels import coverage_threshold, flexprefill_index

    columns, diagonals, blocks = estimated["columns"], estimated["diagonals"], estimated["blocks"]
    batch, hq, n = columns.shape
    bs = config.block_size
    p = -(-n // bs)
    reachable = reachable_offsets(valid)
    # Columns and diagonals of the vertical-slash heads in one call: rows (2, B, H), masks (2, B).
    scores = torch.stack([columns, diagonals]).view(2 * batch * hq, n)
    vs_heads = (~query_aware).reshape(1, -1).expand(2, -1).reshape(-1)
    need = coverage_threshold.threshold_rows(scores, torch.cat([valid, reachable]), config.gamma,
                                             active=vs_heads)["count"].view(2, batch, hq)
    floor = min(-(-config.min_budget // bs), p)  # blocks
    n_col, n_diag = (need[0] // bs + 1).clamp(floor, p), (need[1] // bs + 1).clamp(floor, p)

    ids = torch.arange(p, device=columns.device)
    col_b = _block_sum(columns, bs).masked_fill((ids == first_block[:, None])[:, None], float("inf"))
    col_b = col_b.masked_fill(~block_valid(valid, bs)[:, None], NEG_INF)
    diag_b = _block_sum(diagonals, bs).masked_fill(ids == 0, float("inf"))
    diag_b = diag_b.masked_fill(~block_valid(reachable, bs)[:, None], NEG_INF)
    col_rank, diag_rank = _ranks(col_b), _ranks(diag_b)
    col_ok, diag_ok = col_b > NEG_INF, diag_b > NEG_INF
    keeps = {"col": (col_rank < n_col[..., None]) & col_ok, "diag": (diag_rank < n_diag[..., None]) & diag_ok,
             "col_min": (col_rank < floor) & col_ok, "diag_min": (diag_rank < floor) & diag_ok}

    qa = coverage_threshold.threshold_rows(blocks.reshape(batch * hq, p * p), choosable(valid, bs).reshape(batch, p * p),
                                           config.gamma, active=query_aware.reshape(-1), segment=p)
    return flexprefill_index.build(blocks, query_aware, qa, keeps, block_valid(valid, bs), first_block,
                                   block_size=bs, seq_len=seq_len)


DEFAULTS = FlexPrefillConfig()
DESCRIPTION = (
    "FlexPrefill: per head, sqrt-JS(pooled vs true last-block distribution) < tau=0.1 -> query-aware blocks "
    "covering gamma=0.9, else vertical-slash covering gamma; min budget 1024 tokens; sink + diagonal always"
)
BUDGET_KNOB = Knob("gamma", 0.0, 1.0, integer=False)
