"""xattention: XAttention's threshold block selection (Xu et al., 2025) on the shared executor.

Definition as implemented (per batch and query head; spec section 2):
1. Antidiagonal tile scores with stride s (8; 16 allowed): tile (a, c) of s x s tokens scores
       S[a, c] = scale / s * sum_{t<s} q[a s + s-1-t] . k[c s + t]
   (the same S as the reference, kernels/reference.py; scale = the model's softmax scale).
2. Block mass, estimate = "tiles" (default: XAttention's paper and released code): every
   query tile row a takes a softmax of S[a, :] over its causal (c <= a), valid key tiles;
   the mass of block pair (i, j) is the sum of those probabilities over the tiles of the
   pair. Each query-block row then holds (number of valid tile rows) of mass.
   estimate = "pooled" (cheaper, not the published quantity): a softmax over key blocks of
   the pooled block logits of methods/score.py with beta = 0, i.e. of each block pair's
   *mean* tile score. The block mean of the logits equals the antidiagonal tile sum by
   linearity, but the softmax does not commute with it (a block's log-sum-exp of tile
   scores is at least their mean), so pooled masses are flatter and the same threshold
   keeps more blocks. Costs a (P x P) GEMM instead of (N/s)^2 per head.
3. Selection per query-block row, as the released selector does: the sink block(s) and the
   diagonal block are kept first and their mass counts; then the other causal blocks by
   decreasing mass, each kept while the mass kept before it is below tau * row mass. That
   is the fewest blocks (forced ones first) whose cumulative mass reaches tau
   (blocks.coverage). tau >= 1 keeps every causal block (exactly dense; no underflowed or rounded-off block dropped).
4. Left padding: tiles without a valid token are masked out of the softmax, blocks without
   one are never chosen, and all-padding query rows keep nothing; the sink is the first
   block holding a valid token (as Stem and streaming do).

Estimate paths (estimate_impl): "torch" is chunked plain PyTorch (GEMM per chunk of query
blocks, float32); "triton" (auto on CUDA) runs kernels/xattn_mass.py (the tile softmax summed
per block pair, the N x N/s scores never stored) and kernels/coverage_select.py (the
threshold selection without a sort; exact ties go to the lower block id). Both give the same
index up to exact ties and float rounding at the threshold. The definition costs twice the
causal half of an (N/s x N/s x s d) GEMM per head, 1/s of dense attention's QK^T per pass:
more than Stem's pooled (P x P) estimate by about (Bk/s)^2 / 2 in FLOPs.

Deviations from the released XAttention: it scores per
query head with K/V broadcast over the GQA group (XAttention repeats K/V per query head:
same result). XAttention keeps every layer sparse; our default keeps layers 0 and 1 dense
as Stem does, so budgets compare.

Budget knob: threshold in [0, 1] (0 = sink + diagonal only, 1 = dense). `select` =
`choose(estimate(...))`; the mass does not depend on the threshold, so the budget solver
estimates once per layer and chooses for every knob value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_cli.config import BlockConfig, ConfigError, check_estimate_impl, estimate_impl_param, param
from stem_cli.index import BlockIndex
from stem_cli.methods import score
from stem_cli.methods.blocks import (
    NEG_INF,
    choosable,
    coverage,
    block_valid,
    first_valid_block,
    forced_blocks,
    full_index,
    pad_to,
    valid_keys,
    work_dtype,
)
from stem_cli.methods.estimate_path import estimate_path, kernel_path
from stem_cli.methods.knob import Knob


@dataclass(frozen=True)
class XAttentionConfig(BlockConfig):
    dense_layers: tuple = param(
        (0, 1), "layer indices that always run dense attention (Stem's layer schedule, so budgets compare)", "stem"
    )
    stride: int = param(8, "antidiagonal stride s (power of two dividing block_size; XAttention uses 8, or 16)", "paper")
    threshold: float = param(0.9, "cumulative block mass tau each query-block row keeps, in [0, 1]; 1 = dense", "paper+code")
    sink_blocks: int = param(1, "first key blocks always kept (the released selector keeps block 0 and the diagonal)", "code")
    estimate: str = param(
        "tiles",
        "'tiles' = softmax over antidiagonal tile scores per tile row, summed per block (paper+code); "
        "'pooled' = softmax over pooled block logits (cheaper; flatter, keeps more at equal threshold)",
        "paper+code",
    )
    estimate_impl: str = estimate_impl_param("kernels/xattn_mass.py tile softmax, kernels/coverage_select.py threshold")

    def __post_init__(self):
        super().__post_init__()
        s = self.stride
        if not isinstance(s, int) or isinstance(s, bool) or s < 1 or s & (s - 1) or s > self.block_size:
            raise ConfigError(
                f"stride={s!r} is not allowed: use a power of two that divides block_size ({self.block_size}), e.g. 8 or 16"
            )
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold={self.threshold!r} is not allowed: threshold must lie in [0, 1] (0.9 = keep 90% of the mass)")
        if not isinstance(self.sink_blocks, int) or isinstance(self.sink_blocks, bool) or self.sink_blocks < 0:
            raise ConfigError(f"sink_blocks={self.sink_blocks!r} is not allowed: use a block count >= 0")
        if self.estimate not in ("tiles", "pooled"):
            raise ConfigError(f"estimate={self.estimate!r} is not allowed: use 'tiles' or 'pooled'")
        check_estimate_impl(self.estimate_impl)


def tile_block_mass(q, k, *, block_size: int, stride: int, scale: float, key_valid, chunk_blocks: int | None = None):
    """XAttention's block mass (B, Hq, P, P): per tile row softmax of the antidiagonal tile
    scores over causal valid key tiles, summed over each block pair's tiles. Chunked over
    query blocks (keys only up to the chunk's end) so no (N/s)^2 slab is alive per head."""
    batch, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    p = -(-n // block_size)
    npad = p * block_size
    tiles = block_size // stride
    nt = npad // stride
    work = work_dtype(q)

    tile_ok = tile_valid(key_valid, batch, n, block_size, stride, q.device)  # (B, N/s)
    masked = key_valid is not None or n < npad  # tiles to mask beyond the causal ones
    kr = pad_to(k, npad).to(work).reshape(batch, hkv, nt, stride * d)  # K once; Q a chunk at a time
    tid = torch.arange(nt, device=q.device)
    out = torch.zeros(batch, hq, p, p, dtype=work, device=q.device)
    if chunk_blocks is None:
        per_block = batch * hq * tiles * nt * 4 * 3  # scores, mask and probabilities alive together
        budget = (1 << 30) if q.is_cuda else (256 << 20)  # fewer, larger GEMMs where memory allows
        # At least 8 chunks: each reads keys only up to its end, so the GEMM is ~56% of the square.
        chunk_blocks = max(1, min(-(-p // 8), budget // max(per_block, 1)))
    for i0 in range(0, p, chunk_blocks):
        i1 = min(p, i0 + chunk_blocks)
        a0, a1 = i0 * tiles, i1 * tiles
        # Query tile a holds q[a s + s-1-t] at slot t; the group's tiles stacked into one GEMM per
        # KV head (a broadcast K would be copied per query head).
        qc = pad_to(q[:, :, a0 * stride : a1 * stride], (a1 - a0) * stride).to(work) * (scale / stride)
        qa = qc.view(batch, hq, a1 - a0, stride, d).flip(3).reshape(batch, hkv, group * (a1 - a0), stride * d)
        s = torch.matmul(qa, kr[:, :, :a1].transpose(-1, -2)).view(batch, hq, a1 - a0, a1)
        # Causality only cuts the chunk's own square (earlier key tiles are all before its rows).
        s[..., a0:a1].masked_fill_(tid[None, a0:a1] > tid[a0:a1, None], NEG_INF)
        if masked:
            ok = tile_ok[:, None, :a1] & tile_ok[:, a0:a1, None]  # (B, rows, keys)
            s.masked_fill_(~ok[:, None], NEG_INF)
        probs = torch.softmax(s, dim=-1).nan_to_num_(0.0)
        out[:, :, i0:i1, :i1] = probs.view(batch, hq, i1 - i0, tiles, i1, tiles).sum((3, 5))
    return out


def select(q, k, v, *, layer: int, config: XAttentionConfig, scale: float, key_valid: torch.Tensor | None) -> BlockIndex:
    if config.threshold >= 1:  # every causal block: no estimate needed
        return full_index(q.shape[0], q.shape[1], q.shape[2], config.block_size, key_valid, q.device)
    mass = estimate(q, k, v, layer=layer, config=config, scale=scale, key_valid=key_valid)
    return choose(mass, seq_len=q.shape[2], config=config, key_valid=key_valid)


def estimate(q, k, v, *, layer: int, config: XAttentionConfig, scale: float, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Block mass (B, Hq, P, P); independent of the threshold (the budget solver reuses it)."""
    path = mass_path(config, q.device)
    if config.estimate == "tiles":
        if path == "triton":
            from stem_cli.kernels import xattn_mass

            return xattn_mass.tile_block_mass(q, k, tile_valid(key_valid, q.shape[0], q.shape[2], config.block_size,
                                                                         config.stride, q.device),
                                              block_size=config.block_size, stride=config.stride, scale=scale)
        return tile_block_mass(q, k, block_size=config.block_size, stride=config.stride, scale=scale, key_valid=key_valid)
    logits = score.block_logits(q, k, v, block_size=config.block_size, stride=config.stride, beta=0.0, scale=scale,
                                key_valid=key_valid, impl=path)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def mass_path(config: XAttentionConfig, device) -> str:
    """estimate_path, and torch (said once) under 'auto' where the tile kernel does not cover the grid."""
    if config.estimate != "tiles":
        return estimate_path(config, device, "xattention")

    def covers():
        from stem_cli.kernels import xattn_mass

        tiles = config.block_size // config.stride
        return (xattn_mass.supported(config.block_size, config.stride),
                f"block_size / stride = {tiles} tiles per block (the kernel takes <= {xattn_mass.MAX_TILES})")

    return kernel_path(config, device, "xattention", covers)


def tile_valid(key_valid, batch: int, n: int, block_size: int, stride: int, device) -> torch.Tensor:
    """(B, P Bk / s) bool: the stride tile holds a valid token (the sequence zero-padded to whole blocks)."""
    npad = -(-n // block_size) * block_size
    valid = torch.zeros(batch, npad, dtype=torch.bool, device=device)
    valid[:, :n] = True if key_valid is None else key_valid.to(device)
    return valid.view(batch, npad // stride, stride).any(-1)


def choose(mass: torch.Tensor, *, seq_len: int, config: XAttentionConfig, key_valid: torch.Tensor | None) -> BlockIndex:
    """Forced sinks + diagonal, then the fewest blocks reaching the threshold, per query-block row."""
    batch, _, p, _ = mass.shape
    bs = config.block_size
    valid = valid_keys(key_valid, batch, seq_len, mass.device)
    first = first_valid_block(key_valid, batch, bs, mass.device)
    if config.threshold < 1 and estimate_path(config, mass.device, "xattention") == "triton":
        from stem_cli.kernels import coverage_select

        return coverage_select.select(mass, block_valid(valid, bs), first, threshold=config.threshold,
                                      sink_blocks=config.sink_blocks, block_size=bs, seq_len=seq_len)
    allowed = choosable(valid, bs)  # (B, 1, P, P)
    forced = forced_blocks(p, first, config.sink_blocks, 1)[:, None]  # sinks + diagonal
    keep = coverage(mass, config.threshold, allowed, forced)
    return BlockIndex.from_mask(keep & allowed, bs, seq_len)


DEFAULTS = XAttentionConfig()
DESCRIPTION = (
    "XAttention: antidiagonal (stride 8) block mass, per query-block row the fewest blocks reaching "
    "threshold 0.9 of it, sink + diagonal always"
)
BUDGET_KNOB = Knob("threshold", 0.0, 1.0, integer=False)
