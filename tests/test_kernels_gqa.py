"""The GQA-packed block-sparse attention kernel against the float64 reference (interpreter on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from stem_cli.index import BlockIndex
from stem_cli.kernels import reference as ref

pytest.importorskip("triton")
from stem_cli.kernels import block_sparse_attn as bsa  # noqa: E402
from stem_cli.kernels import block_sparse_attn_gqa as gqa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes in the input dtype: float32 there keeps the check tight.
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = 2e-2 if DEVICE == "cuda" else 1e-5


def kv_index(batch, hkv, n, block, budget, seed, empty_rows=0.0):
    """Per-KV-head index: each row keeps `budget` random causal blocks (all when larger), always
    including its diagonal; a share `empty_rows` of rows keep nothing."""
    g = torch.Generator().manual_seed(seed)
    p = math.ceil(n / block)
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    noise = torch.rand(batch, hkv, p, p, generator=g).masked_fill(~causal, -1.0)
    noise += 2 * torch.eye(p)  # the diagonal ranks first
    top = noise.topk(min(budget, p), dim=-1).indices
    mask = torch.zeros(batch, hkv, p, p, dtype=torch.bool).scatter_(-1, top, True) & causal
    mask &= ~(torch.rand(batch, hkv, p, 1, generator=g) < empty_rows)
    return BlockIndex.from_mask(mask, block, n)


def inputs(batch, hq, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]


def check(q, k, v, index, start, **kwargs):
    """The kernel (float32 in, NaN-poisoned output) against the float64 reference: output, lse, zero rows."""
    valid = None if start is None else torch.arange(q.shape[2])[None, :] >= start[:, None]
    want, want_lse = ref.block_sparse_attention(q, k, v, index, scale=0.25, key_valid=valid, return_lse=True)
    x = [t.to(DEVICE, DTYPE) for t in (q, k, v)]
    poison = torch.full_like(x[0], float("nan"))
    out, lse = gqa.block_sparse_attention(*x, index, scale=0.25, kv_start=None if start is None else start.to(DEVICE),
                                          return_lse=True, out=poison, **kwargs)
    out, lse = out.cpu().double(), lse.cpu().double()
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    err = (out - want).norm() / want.norm().clamp_min(1e-12)
    assert err < TOL, err
    has = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), has)
    torch.testing.assert_close(lse[has], want_lse[has], rtol=TOL, atol=TOL)
    assert (out[~has] == 0).all()  # rows without a key: zeros
    return out


CASES = [
    # batch, hq, hkv, n, d, block, budget, padded, empty_rows
    (1, 2, 2, 70, 64, 16, 99, False, 0.0),  # group 1, every causal block, odd N
    (1, 6, 2, 93, 64, 16, 2, False, 0.0),  # group 3: tiles cross head boundaries
    (2, 8, 2, 77, 128, 16, 3, True, 0.2),  # group 4, batch 2, left padding, empty rows
    (1, 8, 1, 45, 64, 32, 1, False, 0.0),  # group 8, one block (the diagonal) per row
    (2, 4, 1, 61, 64, 16, 99, True, 0.0),  # group 4, all blocks, padding past a whole block
]


@pytest.mark.parametrize("case", CASES, ids=[f"g{c[1] // c[2]}-d{c[4]}-n{c[3]}-k{c[6]}" for c in CASES])
def test_packed_kernel_matches_float64_reference(case):
    batch, hq, hkv, n, d, block, budget, padded, empty = case
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = inputs(batch, hq, hkv, n, d, seed)
    index = kv_index(batch, hkv, n, block, budget, seed, empty)
    start = None
    if padded:
        start = torch.tensor([0, n // 2 + 5])[:batch]  # the second sequence's first block is all padding
    check(q, k, v, index, start)


def test_longest_first_matches_reference_and_the_plain_kernel():
    """Program order changes the schedule, not one output value."""
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = inputs(2, 6, 2, 83, 64, seed)
    index = kv_index(2, 2, 83, 16, 3, seed, empty_rows=0.1)
    start = torch.tensor([3, 20])
    got = check(q, k, v, index, start, longest_first=True)
    plain = check(q, k, v, index, start)
    assert torch.equal(got, plain)


def test_head_dim_256_and_non_power_of_two_head_dim():
    seed = int(torch.randint(0, 2**31, ()))
    for d in (256, 48):
        q, k, v = inputs(1, 4, 1, 40, d, seed)
        check(q, k, v, kv_index(1, 1, 40, 16, 2, seed), None)


def test_agrees_with_the_per_head_kernel_on_a_kv_index():
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = (t.to(DEVICE, DTYPE) for t in inputs(1, 4, 2, 64, 32, seed))
    index = kv_index(1, 2, 64, 16, 2, seed)
    got = gqa.block_sparse_attention(q, k, v, index, scale=0.3)
    want = bsa.block_sparse_attention(q, k, v, index, scale=0.3)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_rejects_a_per_query_head_index():
    q, k, v = (t.to(DEVICE, DTYPE) for t in inputs(1, 4, 2, 32, 32, 0))
    per_query = kv_index(1, 4, 32, 16, 2, 0)
    with pytest.raises(ValueError, match="index per KV head"):
        gqa.block_sparse_attention(q, k, v, per_query)
    with pytest.raises(ValueError, match="head dim 512"):
        gqa.block_sparse_attention(*(torch.zeros(1, h, 16, 512) for h in (2, 1, 1)), kv_index(1, 1, 16, 16, 1, 0))


def test_pruning_keeps_configs_that_divide_the_group_and_fit_shared_memory():
    import triton

    configs = [triton.Config({"TILE_M": tm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for tm, bn, w, s in gqa.CONFIGS]
    for group, block, d in [(1, 128, 128), (3, 128, 128), (4, 128, 128), (8, 64, 256), (3, 16, 64)]:
        for c in gqa._prune(configs, {}, BLOCK=block, GROUP=group, HEAD_DIM=d):
            assert group * block % c.kwargs["TILE_M"] == 0 and c.kwargs["BLOCK_N"] <= block
            assert gqa.shared_memory_estimate(c.kwargs["TILE_M"], c.kwargs["BLOCK_N"], d, c.num_stages) <= gqa.SHARED_MEMORY_LIMIT
    kept = gqa._prune(configs, {}, BLOCK=128, GROUP=4, HEAD_DIM=128)
    assert any(c.kwargs["TILE_M"] == 256 for c in kept)  # the group's rows make 256-row tiles possible
    assert all(c.kwargs["TILE_M"] <= 128 for c in gqa._prune(configs, {}, BLOCK=128, GROUP=1, HEAD_DIM=128))


@pytest.mark.parametrize("group, block, config", [(4, 64, (32, 16, 4, 2)), (3, 32, (32, 8, 4, 2)), (4, 32, (128, 16, 8, 2))],
                         ids=["8-positions-per-tile", "g3-tiles-split-positions", "tile-is-the-whole-group"])
def test_tile_shapes_with_partial_diagonals(group, block, config):
    """Tiles smaller than the block walk only the diagonal key tiles up to their last position."""
    seed = int(torch.randint(0, 2**31, ()))
    n = 2 * block + 7
    q, k, v = inputs(1, group * 2, 2, n, 32, seed)
    check(q, k, v, kv_index(1, 2, n, block, 2, seed), None, config=config)


def test_a_config_that_does_not_tile_the_group_is_refused():
    q, k, v = (t.to(DEVICE, DTYPE) for t in inputs(1, 6, 2, 32, 32, 0))
    with pytest.raises(ValueError, match="TILE_M must divide"):
        gqa.block_sparse_attention(q, k, v, kv_index(1, 2, 32, 16, 1, 0), config=(64, 16, 4, 2))


def test_longest_first_order_is_a_permutation_by_descending_count():
    counts = torch.randint(0, 9, (2, 3, 11), dtype=torch.int32)
    order = gqa.longest_first_order(counts).long()
    assert torch.equal(order.sort().values, torch.arange(counts.numel()))
    ordered = counts.reshape(-1)[order]
    assert (ordered[:-1] >= ordered[1:]).all()


def test_executor_picks_the_packed_kernel_for_kv_indices_by_shape():
    from stem_cli.executor import sparse_kernel

    q, k, v = (torch.zeros(1, h, 32, 64) for h in (8, 2, 2))
    per_kv, per_query = kv_index(1, 2, 32, 16, 1, 0), kv_index(1, 8, 32, 16, 1, 0)
    assert sparse_kernel(q, k, v, per_kv) is gqa
    assert sparse_kernel(q, k, v, per_query) is bsa
    assert sparse_kernel(q, k, v, per_kv, packed=False) is bsa
    q1 = torch.zeros(1, 2, 32, 64)  # group 1: nothing to share
    assert sparse_kernel(q1, k, v, per_kv) is bsa
    with pytest.raises(ValueError, match="index per KV head"):
        sparse_kernel(q, k, v, per_query, packed=True)
