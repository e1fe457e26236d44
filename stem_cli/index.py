"""BlockIndex: which key blocks each query block attends to, and what that costs.

The index is the contract between selectors and the executor. Per (batch, head,
query block) it holds a count and the sorted key-block ids, padded with -1 (the
layout of FlexAttention's kv_num_blocks / kv_indices, so any block-sparse kernel
can read it). `head` is either a query head or a KV head; the executor maps a
KV-head index onto every query head of its group.

Budget (BUD) is counted in tokens, not blocks: computed (query, key) pairs over
the causal pairs dense attention would compute, padded queries and keys left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1  # index slot past a row's count


@dataclass
class BlockIndex:
    counts: torch.Tensor  # (B, H, Pq) int32
    indices: torch.Tensor  # (B, H, Pq, K) int32, ascending in [:count], PAD after
    block_size: int
    seq_len: int
    full: bool = False  # every causal block is kept: the executor may run a dense kernel

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    @staticmethod
    def full_causal(batch: int, heads: int, seq_len: int, block_size: int, device=None) -> "BlockIndex":
        """Every causal block for every row (what dense attention computes)."""
        p = -(-seq_len // block_size)
        ids = torch.arange(p, device=device, dtype=torch.int32)
        rows = torch.where(ids[None, :] <= ids[:, None], ids[None, :], PAD)
        # Broadcast views: a dense layer at 128K must not allocate a (B, H, P, P) index.
        counts = (ids + 1).expand(batch, heads, p)
        return BlockIndex(counts, rows.expand(batch, heads, p, p), block_size, seq_len, full=True)

    @staticmethod
    def from_mask(mask: torch.Tensor, block_size: int, seq_len: int, width: int | None = None) -> "BlockIndex":
        """Block mask (B, H, Pq, Pk) bool -> index with sorted ids. `width`: a bound on every row's
        count known to the caller (no host read of the counts); None: the largest count."""
        pk = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        k = max(width if width is not None else int(counts.max()) if counts.numel() else 0, 1)
        # Sorting key: kept blocks by id, dropped blocks pushed past every id.
        ids = torch.arange(pk, device=mask.device, dtype=torch.int32)
        order = torch.where(mask, ids, pk + ids).sort(dim=-1).values[..., :k]
        indices = torch.where(order < pk, order, PAD).to(torch.int32)
        return BlockIndex(counts, indices, block_size, seq_len)

    def to_mask(self) -> torch.Tensor:
        """(B, H, Pq, Pk) bool block mask."""
        p = self.num_blocks
        b, h, pq, _ = self.indices.shape
        mask = torch.zeros(b, h, pq, p + 1, dtype=torch.bool, device=self.indices.device)
        slot = torch.where(self.indices >= 0, self.indices.long(), p)
        mask.scatter_(-1, slot, True)
        return mask[..., :p]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Block mask for query blocks [start, stop): (B, H, stop-start, Pk) bool."""
        p = self.num_blocks
        idx = self.indices[:, :, start:stop]
        mask = torch.zeros(*idx.shape[:-1], p + 1, dtype=torch.bool, device=idx.device)
        mask.scatter_(-1, torch.where(idx >= 0, idx.long(), p), True)
        return mask[..., :p]


def block_pair_counts(key_valid: torch.Tensor | None, batch: int, seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Valid causal (query, key) token pairs per block pair: (B, P, P) float64.

    Off the diagonal every pair of a block pair is causal, so the count is
    valid queries of block i times valid keys of block j; on the diagonal each
    valid query q sees the valid keys of its block up to q.
    """
    p = -(-seq_len // block_size)
    valid = torch.zeros(batch, p * block_size, dtype=torch.float64, device=device)
    if key_valid is None:
        valid[:, :seq_len] = 1
    else:
        valid[:, :seq_len] = key_valid.to(device=valid.device, dtype=torch.float64)
    per_block = valid.view(batch, p, block_size)
    n = per_block.sum(-1)  # valid tokens per block
    diag = (per_block * per_block.cumsum(-1)).sum(-1)  # valid q times valid k <= q, same block
    pairs = n[:, :, None] * n[:, None, :]
    pairs = torch.tril(pairs, diagonal=-1)
    return pairs + torch.diag_embed(diag)


def computed_pairs(index: BlockIndex, pair_counts: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Token pairs the index makes the executor compute, summed over query heads (0-dim float64).

    A gather of the selected blocks' pair counts: O(B H P K) on the index's device,
    never a dense (B, H, P, P) mask. Returned as a tensor so callers in the middle of a
    forward pass need not synchronise the device."""
    b, h, pq, _ = index.indices.shape
    p = pair_counts.shape[-1]
    counts = torch.cat([pair_counts, pair_counts.new_zeros(b, p, 1)], dim=-1)  # PAD reads the zero column
    ids = torch.where(index.indices >= 0, index.indices.long(), p)
    per_head = torch.gather(counts[:, None, :pq].expand(b, h, pq, p + 1), -1, ids).sum()
    group = query_heads // index.num_heads  # a KV-head index serves its whole group
    return per_head * group


def causal_pairs(pair_counts: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Causal token pairs of dense attention over query heads (0-dim float64)."""
    return pair_counts.sum() * query_heads
