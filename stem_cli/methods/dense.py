"""dense: exact causal attention; the executor runs the fastest dense kernel for a full index."""

from __future__ import annotations

import torch

from stem_cli.config import DenseConfig
from stem_cli.index import BlockIndex


def select(q, k, v, *, layer: int, config: DenseConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    return BlockIndex.full_causal(q.shape[0], k.shape[1], q.shape[2], 128, device=q.device)


DEFAULTS = DenseConfig()
DESCRIPTION = "exact causal attention (SDPA: cuDNN / FlashAttention on GPU)"
