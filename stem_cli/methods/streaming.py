"""streaming: attention sinks + a local window (StreamingLLM / MInference A-shape pre-fill)."""

from __future__ import annotations

import torch

from stem_cli.config import StreamingConfig
from stem_cli.index import BlockIndex
from stem_cli.methods.blocks import first_valid_block, forced_blocks
from stem_cli.methods.knob import Knob


def select(q, k, v, *, layer: int, config: StreamingConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    batch, n = q.shape[0], q.shape[2]
    p = -(-n // config.block_size)
    first = first_valid_block(key_valid, batch, config.block_size, q.device)
    keep = forced_blocks(p, first, config.sink_blocks, config.window_blocks)  # (B, P, P), data-independent
    return BlockIndex.from_mask(keep[:, None].expand(batch, k.shape[1], p, p), config.block_size, n)


DEFAULTS = StreamingConfig()
DESCRIPTION = "attention sinks + local window (StreamingLLM / A-shape); data-independent"
# window_blocks 1 = sinks + diagonal; 1024 blocks covers every row up to 128K tokens at block 128.
BUDGET_KNOB = Knob("window_blocks", 1, 1024, integer=True)
