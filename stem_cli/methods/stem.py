"""Stem: Token Position-Decay budgets over Output-Aware block logits (spec section 1).

Where this follows the authors' released code and where not (checked on identical
q/k/v against it: the block logits agree within 1e-5, the selections at Jaccard >= 0.999):
- always-kept blocks: top-k(i) by the metric, then sinks, window and diagonal added on
  top (`forced_rule="code"`, the default, as released); `forced_rule="inside"` ranks them
  first and counts them inside k(i) (this project's earlier rule);
- value-norm z-score: the population standard deviation (N) here, the sample one (N - 1)
  there; over the N/s stride tiles (512 at 4K) the two differ by a factor of about
  1 + 1/(2N), far below the logits' bf16 rounding;
- a partial last block: its logit averages the valid tiles only here; there the sequence
  is zero-padded to a multiple of 2048 and the zero tiles are averaged in, which pulls the
  last block's logit towards 0 by an amount that depends on the padding, not the data.
  We follow the valid-tile mean so that the logit of a block does not depend on where
  the sequence happens to end; the diagonal block is always kept either way.
"""

from __future__ import annotations

import functools

import torch

from stem_cli.config import StemConfig
from stem_cli.index import BlockIndex
from stem_cli.methods import score
from stem_cli.methods.blocks import first_valid_block, forced_blocks, row_budgets, select_topk
from stem_cli.methods.estimate_path import estimate_path
from stem_cli.methods.knob import Knob


def select(q, k, v, *, layer: int, config: StemConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    logits = estimate(q, k, v, layer=layer, config=config, scale=scale, key_valid=key_valid)
    return choose(logits, seq_len=q.shape[2], config=config, key_valid=key_valid)


def estimate(q, k, v, *, layer: int, config: StemConfig, scale: float, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Output-Aware block logits (B, H, P, P), H = query heads or KV heads (gqa='kv')."""
    logits = score.block_logits(
        q, k, v, block_size=config.block_size, stride=config.stride, beta=config.beta, scale=scale, key_valid=key_valid,
        impl=estimate_path(config, q.device),
    )
    if config.gqa == "kv":
        # One selection per KV head: the group's mean logit (-inf stays -inf, since
        # every head of a group shares its causal and padding structure).
        batch, hq, p, _ = logits.shape
        logits = logits.view(batch, k.shape[1], hq // k.shape[1], p, p).mean(2)
    return logits


def choose(logits: torch.Tensor, *, seq_len: int, config: StemConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    return select_from_logits(logits, seq_len, config, key_valid)


def select_from_logits(logits: torch.Tensor, seq_len: int, config: StemConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    """TPD budget per row, forced sinks/window/diagonal, then top-k by the block logits.

    Budgets are data-independent, so they are built on the host; the Triton path keeps
    them on the device per (length, padding, schedule), so that without padding nothing
    here waits for the device: the forward keeps the GPU queue full."""
    batch, _, p, _ = logits.shape
    valid = None if key_valid is None else key_valid.cpu()
    first = first_valid_block(valid, batch, config.block_size, "cpu")
    lengths = torch.full((batch,), seq_len, device="cpu") if valid is None else valid.sum(-1)
    knobs = (config.schedule, config.mu, config.tpd, config.k_scale, config.k_start)
    budget = _budgets(p, tuple(lengths.tolist()), tuple(first.tolist()), knobs)  # cached: the same tensor per shape
    most = int(budget.max()) + config.sink_blocks + config.window_blocks + 1  # >= any row's count
    if estimate_path(config, logits.device) == "triton":
        from stem_cli.kernels import tpd_select

        shape_key = (p, tuple(lengths.tolist()), tuple(first.tolist()))
        return tpd_select.select(
            logits, _on_device(budget, ("budget", *shape_key, knobs), logits.device),
            _on_device(first, ("first", *shape_key), logits.device),
            sink_blocks=config.sink_blocks, window_blocks=config.window_blocks, width=most,
            block_size=config.block_size, seq_len=seq_len, rule=config.forced_rule,
        )
    forced = forced_blocks(p, first.to(logits.device), config.sink_blocks, config.window_blocks)
    return select_topk(logits, budget, forced, block_size=config.block_size, seq_len=seq_len, max_count=most,
                       rule=config.forced_rule)


@functools.lru_cache(maxsize=64)
def _budgets(p: int, lengths: tuple, first: tuple, knobs: tuple) -> torch.Tensor:
    schedule, mu, tpd, k_scale, k_start = knobs
    return row_budgets(p, torch.tensor(lengths), torch.tensor(first), schedule=schedule, mu=mu, tpd=tpd,
                       k_scale=k_scale, k_start=k_start)


_DEVICE_COPIES: dict[tuple, torch.Tensor] = {}


def _on_device(host: torch.Tensor, key: tuple, device: torch.device) -> torch.Tensor:
    """`host` copied to `device` once per key: the budgets depend on the shape, never the data."""
    key = (*key, str(device))
    if key not in _DEVICE_COPIES:
        if len(_DEVICE_COPIES) >= 64:
            _DEVICE_COPIES.clear()
        # Pinned and non-blocking: a plain .to(device) of pageable memory waits for the whole queue.
        pinned = host.pin_memory() if device.type == "cuda" else host
        _DEVICE_COPIES[key] = pinned.to(device, non_blocking=True)
    return _DEVICE_COPIES[key]


NOTES = (
    "always-kept blocks: top-k(i) by the metric, then sinks/window/diagonal on top (forced_rule=code, as the released code); "
    "forced_rule=inside counts them inside k(i)",
    "value-norm z-score: population std (N) here, sample std (N-1) in the released code (a 1 + 1/(2N) factor, N = stride tiles)",
    "partial last block: mean over its valid tiles here; the released code zero-pads to a multiple of 2048 and averages "
    "the zero tiles in (a logit that depends on where the sequence ends); followed: valid tiles",
    "estimate: estimate_impl=auto runs Triton on CUDA (causal block GEMM with TF32x3 dots, kernels/block_scores.py; "
    "top-k, ties to the lower block id, kernels/tpd_select.py) and torch ops on the CPU; the same index on distinct logits",
)
DEFAULTS = StemConfig()
DESCRIPTION = "Stem: TPD per-row budget (decays to mu*k_start) + Output-Aware Metric (score + beta*value norm)"
# k_scale multiplies k_start (clamped to [1, P]): 0.01 leaves the forced sinks/window/diagonal, 16 reaches
# k_start = P (dense) for every schedule up to 128K tokens (paper rule 0.1P needs 10, uniform 2/(1+mu) more).
BUDGET_KNOB = Knob("k_scale", 0.01, 16.0, integer=False)
