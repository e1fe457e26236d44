"""One executor for every method: attend(q, k, v, index) -> output.

The executor never decides what to keep; it computes exactly what the index
says, by the fastest path it has:
- a full index (dense method, dense layers): PyTorch SDPA with native GQA
  (cuDNN / FlashAttention on GPU);
- any other index on a GPU: the Triton block-sparse flash-attention kernel
  (bf16/fp16, left padding); an index per KV head (gqa='kv') with a query-head
  group >= 2 runs the GQA-packed kernel (kernels/block_sparse_attn_gqa.py: one
  K/V tile load for the group's rows); what they cannot take falls back to masked
  SDPA with a one-time notice, since that is the slow path there;
- attn_dtype "fp8" (StemConfig.attn_dtype): the FP8 block-sparse kernel
  (kernels/block_sparse_attn_fp8.py) for every index that is not full, on a GPU of
  compute capability >= 8.9 or the CPU under TRITON_INTERPRET=1; anywhere else a
  ConfigError, never a quiet bf16 run. Full indices stay on bf16 dense SDPA;
- on the CPU: SDPA with the index expanded to a token mask, a chunk of query
  rows at a time. It computes every causal pair (no time saved), but it runs
  PyTorch's fused CPU attention: 3x faster than the reference's explicit
  softmax at 4K tokens, which stays the oracle the tests compare against.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F

from stem_cli.config import ATTN_DTYPES, ConfigError
from stem_cli.index import BlockIndex

_warned: set[str] = set()


def notice_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def dense_attention(q, k, v, *, scale: float, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over valid keys via SDPA; rows with no valid key give zeros."""
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return _sdpa_masked_rows(q, k, v, causal[None, None] & key_valid[:, None, None, :], scale)


def _sdpa_masked_rows(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA under a boolean mask; rows with no allowed key give zeros (SDPA alone would give NaN)."""
    has_key = mask.any(-1, keepdim=True)
    mask = mask | ~has_key & (torch.arange(mask.shape[-1], device=q.device) == 0)  # let them see key 0, zeroed after
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.masked_fill(~has_key, 0.0)


def left_padding_start(key_valid: torch.Tensor) -> torch.Tensor | None:
    """(B,) first valid key when every sequence is left padded (valid = a suffix), else None."""
    start = (~key_valid).sum(-1)
    suffix = torch.arange(key_valid.shape[-1], device=key_valid.device)[None, :] >= start[:, None]
    return start if torch.equal(suffix, key_valid) else None


def check_attn_dtype(attn_dtype: str, device) -> None:
    """A ConfigError when `attn_dtype` is not one the executor knows or cannot run on `device`."""
    if attn_dtype not in ATTN_DTYPES:
        raise ConfigError(f"attn_dtype={attn_dtype!r} is not allowed: use {', '.join(map(repr, ATTN_DTYPES))}")
    if attn_dtype == "fp8":
        if importlib.util.find_spec("triton") is None:
            reason = "the FP8 attention kernel needs triton, which is not installed"
        else:
            from stem_cli.kernels import block_sparse_attn_fp8

            reason = block_sparse_attn_fp8.unsupported_reason(torch.device(device))
        if reason is not None:
            raise ConfigError(f"attn_dtype='fp8' cannot run here: {reason}; use attn_dtype=bf16")


def attend(q, k, v, index: BlockIndex, *, scale: float, key_valid: torch.Tensor | None = None,
           attn_dtype: str = "bf16") -> torch.Tensor:
    """q (B, Hq, N, d), k/v (B, Hkv, N, d) -> (B, Hq, N, d), exact over the index's blocks
    (with attn_dtype "fp8": over their e4m3-rounded operands)."""
    if attn_dtype != "bf16":
        check_attn_dtype(attn_dtype, q.device)
    if index.full:
        return dense_attention(q, k, v, scale=scale, key_valid=key_valid)
    if attn_dtype == "fp8":
        return _attend_fp8(q, k, v, index, scale=scale, key_valid=key_valid)
    if q.is_cuda:
        start = None if key_valid is None else left_padding_start(key_valid)
        reason = _kernel_unsupported(q, index, key_valid is not None and start is None)
        if reason is None:
            return sparse_kernel(q, k, v, index).block_sparse_attention(q, k, v, index, scale=scale, kv_start=start)
        notice_once(
            f"masked:{reason}",
            f"stem: {reason}; running masked SDPA on the GPU (exact, but it computes every causal pair: do not read its timings as the method's speed)",
        )
    return masked_sdpa(q, k, v, index, scale=scale, key_valid=key_valid)


def _attend_fp8(q, k, v, index: BlockIndex, *, scale: float, key_valid: torch.Tensor | None) -> torch.Tensor:
    """The FP8 kernel; what it cannot take runs masked SDPA in the input dtype, with a one-time notice."""
    start = None if key_valid is None else left_padding_start(key_valid)
    reason = _kernel_unsupported(q, index, key_valid is not None and start is None, fp8=True)
    if reason is None:
        from stem_cli.kernels import block_sparse_attn_fp8

        return block_sparse_attn_fp8.block_sparse_attention(q, k, v, index, scale=scale, kv_start=start)
    notice_once(
        f"fp8-masked:{reason}",
        f"stem: {reason}; running masked SDPA in {q.dtype} instead of FP8 attention (exact, not FP8, and it computes "
        "every causal pair: do not read its timings or errors as the FP8 path's)",
    )
    return masked_sdpa(q, k, v, index, scale=scale, key_valid=key_valid)


def masked_sdpa(q, k, v, index: BlockIndex, *, scale: float, key_valid: torch.Tensor | None = None,
                chunk_elements: int = 1 << 26) -> torch.Tensor:
    """Exact attention over the index's blocks by SDPA with a token mask, a chunk of query blocks at a time.

    The chunk's mask is its rows of the block mask, expanded to tokens, and-ed with causality
    and the valid keys; keys past the chunk's last row are never read. Rows with no
    allowed key give zeros, as in the reference. Differentiable in q, k and v (router
    training runs its sparse modes through it).
    """
    batch, hq, n, _ = q.shape
    bs = index.block_size
    per_index = hq // index.num_heads
    valid = None if key_valid is None else key_valid.to(q.device)
    rows = max(1, chunk_elements // max(batch * hq * n * bs, 1)) * bs  # query rows per chunk, whole blocks
    out = torch.empty_like(q)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        blocks = index.rows(r0 // bs, -(-r1 // bs)).to(q.device)  # (B, Hi, chunk blocks, P)
        mask = blocks.repeat_interleave(bs, dim=2)[:, :, : r1 - r0]  # r0 starts a block: rows = whole blocks
        mask = mask.repeat_interleave(bs, dim=3)[..., :r1]  # (B, Hi, rows, keys up to r1)
        causal = torch.arange(r1, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
        mask = mask & causal
        if valid is not None:
            mask = mask & valid[:, None, None, :r1]
        mask = mask.repeat_interleave(per_index, dim=1) if per_index > 1 else mask
        out[:, :, r0:r1] = _sdpa_masked_rows(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], mask, scale)
    return out


# The GQA-packed kernel for per-KV-head indices from this group size up, at head dims up to this.
# Head dim 256 keeps the descriptor kernel (measured faster there); the packed kernel's 256-row
# tiles need 16 warps at 128 registers each. Selection by shape only (see sparse_kernel).
PACKED_MIN_GROUP = 2
PACKED_MAX_HEAD_DIM = 128


def sparse_kernel(q, k, v, index: BlockIndex | None = None, *, packed: bool | None = None):
    """The Triton attention module for these tensors and this index.

    Descriptor (TMA) loads measured 10-15% faster at head dim 256 on an H100 and no better
    (within run-to-run spread) at 64 and 128: profiles/attn-tma-vs-pointers.md.
    An index per KV head with a group of >= PACKED_MIN_GROUP query heads goes to the GQA-packed
    kernel. `packed` forces it (True: a ValueError where it cannot run) or the per-head kernels
    (False), for benchmarks; None chooses by shape.
    """
    from stem_cli.kernels import block_sparse_attn, block_sparse_attn_gqa, block_sparse_attn_tma

    if packed is None:
        group = q.shape[1] // k.shape[1]
        packed = (index is not None and index.num_heads == k.shape[1] and group >= PACKED_MIN_GROUP
                  and q.shape[-1] <= PACKED_MAX_HEAD_DIM)
    if packed:
        reason = "no index given" if index is None else block_sparse_attn_gqa.unsupported_reason(q, k, index)
        if reason is not None:
            raise ValueError(f"the GQA-packed kernel cannot run this call: {reason}")
        return block_sparse_attn_gqa
    if q.shape[-1] >= 256 and block_sparse_attn_tma.supported(q, k, v):
        return block_sparse_attn_tma
    return block_sparse_attn


def _kernel_unsupported(q, index: BlockIndex, other_padding: bool, fp8: bool = False) -> str | None:
    """Why the Triton kernel (the FP8 one with `fp8`) cannot run this call, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.dtype not in (torch.bfloat16, torch.float16) and q.is_cuda:  # the CPU reaches here only under the interpreter
        return f"the Triton kernel takes bfloat16/float16, not {q.dtype}"
    smallest = 32 if fp8 and q.is_cuda else 16  # an e4m3 tensor-core dot reduces over >= 32 elements
    if index.block_size < smallest:
        return f"the Triton kernel needs block_size >= {smallest}, not {index.block_size}"
    if other_padding:
        return "the padding is not left padding"
    return None
